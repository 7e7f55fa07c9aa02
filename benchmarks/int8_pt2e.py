"""int8 against bf16 for the ViT: static int8 post-training quantisation (accel.quantize_int8: PT2E, torchao's
X86InductorQuantizer, calibration on product photos, Inductor with frozen weights, bf16 autocast around it) against
the frozen bf16 graph (accel.CompiledEmbed), per batch size, interleaved rounds in one process. With --run, also
the retrieval metrics of a trained run (any of the four scripts) both ways (test queries against the train gallery),
since a speed-up that moves the neighbours is not one.

Usage: python benchmarks/int8_pt2e.py [--model /tmp/clip-b32] [--batch-sizes 1 8 64] [--run runs/from-scratch/clip]
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fashion_search import accel, backbones, checkpoint, data, errors, inference, pipeline, transforms
from fashion_search.photos import pool as photos
from embed_throughput import jpegs  # product photos of the shared data set, or random ones


class ImageEmbed(torch.nn.Module):
    """fn(model, pixels) -> embeddings as a module holding the model: torch.export sees its weights as parameters,
    which the quantizer needs (weights a lambda merely captures stay unquantised). .embed is what
    accel.CompiledEmbed calls."""

    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def embed(self, pixels):
        return self.fn(self.model, pixels)

    forward = embed


def run_embed(fn, pixels: torch.Tensor, batch_size: int) -> np.ndarray:
    """Normalised pixels [N, 3, S, S] -> unit float32 [N, D] at one static batch shape (the last batch padded)."""
    out = []
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        for start in range(0, len(pixels), batch_size):
            batch = pixels[start:start + batch_size]
            rows = len(batch)
            # A copy made here is an inference tensor, as embed_images passes; a view of `pixels` would recompile.
            batch = torch.cat([batch, batch.new_zeros(batch_size - rows, *batch.shape[1:])])
            out.append(F.normalize(fn(batch)[:rows].float(), dim=1))
    return torch.cat(out).numpy()


def timed(fn, batch, repeats=4) -> float:
    """Median ms per call after one warm call."""
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        batch = batch.clone()  # an inference tensor, as in run_embed
        fn(batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(batch)
            times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def speed(args):
    from transformers import CLIPModel

    clip = backbones.load_pretrained(CLIPModel.from_pretrained, args.model, "CLIP model").eval()
    size = clip.config.vision_config.image_size
    photos = np.stack([photos.decode_square(data, size) for data in jpegs(128)])
    pixels = transforms.normalize(torch.from_numpy(np.array(photos, order="C")), backbones.CLIP_MEAN, backbones.CLIP_STD,
                              torch.device("cpu"))
    exact = run_embed(lambda x: backbones.clip_image_features(clip, x), pixels, len(pixels))  # fp32 weights, autocast
    clip_bf16 = CLIPModel.from_pretrained(args.model).eval().to(dtype=torch.bfloat16)
    with accel.CompiledEmbed(ImageEmbed(clip_bf16, backbones.clip_image_features)) as bf16:
        for batch_size in args.batch_sizes:
            calibration = list(pixels[:len(pixels) // batch_size * batch_size].split(batch_size))[:16]
            int8 = accel.quantize_int8(ImageEmbed(clip, backbones.clip_image_features), calibration, torch.bfloat16)
            cosines = {name: (run_embed(fn, pixels, batch_size) * exact).sum(1).min() for name, fn in
                       (("bf16", bf16), ("int8", int8))}
            print(f"batch {batch_size}: min cosine to fp32 weights: bf16 {cosines['bf16']:.5f}, "
                  f"int8 {cosines['int8']:.5f}")
            for round_ in range(args.rounds):
                batch = pixels[:batch_size]
                ms_bf16, ms_int8 = timed(bf16, batch), timed(int8, batch)
                print(f"  round {round_}: bf16 {ms_bf16:7.1f} ms ({batch_size * 1000 / ms_bf16:5.1f} img/s)  "
                      f"int8 {ms_int8:7.1f} ms ({batch_size * 1000 / ms_int8:5.1f} img/s)  {ms_bf16 / ms_int8:.2f}x")


def retrieval(args):
    """The retrieval metrics of a trained run (any model script), embedded as a very big catalog job embeds on this
    CPU (embed.job_graph: an int8 graph calibrated on the job's first batch, inference.EMBED_BATCH photos) against
    bf16 autocast."""
    import importlib

    from fashion_search import metrics

    cpu = torch.device("cpu")
    name = checkpoint.load(Path(args.run) / "best.pt")["script"]
    script = importlib.import_module(f"fashion_search.cli.{name}")
    model, state = pipeline.load_trained(args.run, name, script.build_model, cpu, script.Options)
    model = model.eval().for_inference()  # as every export does
    dataset, _ = data.load_processed(args.data)
    images = {split: data.image_cache(dataset[split], state["image_size"], args.cache_dir)[0]
              for split in ("train", "test")}
    labels = {split: np.array(dataset[split]["label"]) for split in ("train", "test")}
    batch = inference.EMBED_BATCH
    int8 = accel.int8_embed_graph(model, images["train"][:batch], batch, cpu, torch.bfloat16)
    if int8 is None:
        raise SystemExit(f"{name}: no int8 graph (the reason is printed above)")
    for label, compiled in (("bf16 autocast", None), ("int8", int8)):
        embeddings = {split: inference.embed_images(model, images[split], cpu, torch.bfloat16, batch, progress=False,
                                                    compiled=compiled)
                      for split in ("train", "test")}
        result = metrics.evaluate(embeddings["test"], labels["test"], embeddings["train"], labels["train"])
        print(f"{name} {label}: precision@5 {result['precision@5']:.4f}  macro_precision@5 "
              f"{result['macro_precision@5']:.4f}  map@r {result['map@r']:.4f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="/tmp/clip-b32",
                        help="a CLIP save_pretrained folder (benchmarks/make_clip_b32.py makes a random ViT-B/32)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64],
                        help="the app's two query sizes and the catalog export's")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds per batch size")
    parser.add_argument("--run", help="a trained run folder: compare its retrieval metrics too")
    parser.add_argument("--no-speed", dest="speed", action="store_false", help="with --run: the metrics only")
    parser.add_argument("--data", default="data/processed", help="the processed data set the run was trained on")
    parser.add_argument("--cache-dir", default="data/cache", help="decoded-image cache (as the model scripts use)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.run:
        retrieval(args)
    if args.speed:
        speed(args)


if __name__ == "__main__":
    errors.cli(main)
