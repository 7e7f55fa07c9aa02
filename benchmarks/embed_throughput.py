"""Embedding throughput, end to end (JPEG bytes in, unit vectors out), per backbone at its input size:
naive (fp32, the Hugging Face / torchvision preprocessing image by image) against ours (batched draft-mode JPEG
decode, pre-decoded uint8 tensors, inference_mode, bf16 autocast where the CPU has it, channels_last for CNNs), eager
compiled (accel.CompiledEmbed, what a catalog export uses; the compile time is reported apart), and int8 (what a
very big catalog job uses on a CPU with int8 matrix units: embed.job_graph).
Also the machine's measured matmul peak and each model's share of it (FLOPs per image x images/s).
Random weights from the real configurations: same compute as the pretrained models, no download.

Usage: python benchmarks/embed_throughput.py [--images 256] [--models clip resnet]
"""
import argparse
import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fashion_search import accel, backbones, inference, runtime
from fashion_search.photos import pool as photos
from fashion_search.model import EmbeddingModel

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-product-images-small"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype, device, size=2048, repeats=10):
    size = size * 4 if device.type == "cuda" else size
    a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
    torch.matmul(a, b)
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def flops_per_image(fn, size, device):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn(torch.randn(1, 3, size, size, device=device))
    return counter.get_total_flops()


def jpegs(count):
    import datasets
    from datasets import Image as ImageFeature

    if SHARED.exists():
        ds = datasets.load_dataset(str(SHARED), split="train").cast_column("image", ImageFeature(decode=False))
        return [cell["bytes"] for cell in ds.select(range(count))["image"]]
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        out.append(buffer.getvalue())
    return out


def build(name):
    if name == "clip":
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

        # openai/clip-vit-base-patch32's vision tower and projection (its config, random weights).
        config = CLIPConfig(vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                               num_attention_heads=12, image_size=224, patch_size=32),
                            projection_dim=512)
        model = CLIPModel(config).eval()
        processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})

        def embed(x):
            return backbones.clip_image_features(model, x)

        def naive_preprocess(data):
            return processor(images=Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="pt")["pixel_values"]
        return model, embed, naive_preprocess, backbones.CLIP_MEAN, backbones.CLIP_STD, False
    import torchvision

    model = torchvision.models.resnet50().eval()
    model.fc = torch.nn.Identity()
    transform = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()

    def naive_preprocess(data):
        return transform(Image.open(io.BytesIO(data)).convert("RGB"))[None]
    return model, model, naive_preprocess, backbones.IMAGENET_MEAN, backbones.IMAGENET_STD, True


class Wrapped(EmbeddingModel):
    """The ViT as a .model; the CNN as a .backbone, so that accel.fold_batchnorm applies to it. embed() reaches the
    weights through self, so that a copy of the module (the int8 path exports an fp32 copy) embeds with its own."""
    def __init__(self, model, mean, std, cnn):
        super().__init__()
        self.mean, self.std, self.cnn, self.channels_last = mean, std, cnn, cnn
        if cnn:
            self.backbone = model
        else:
            self.model = model

    def embed(self, x):
        return self.backbone(x) if self.cnn else backbones.clip_image_features(self.model, x)

    def for_inference(self):  # as every export does: the CNN's BatchNorm folded into its convolutions
        return accel.fold_batchnorm(self) if self.cnn else self


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--naive-images", type=int, default=64, help="the naive path is slow: fewer images")
    parser.add_argument("--models", nargs="+", default=["clip", "resnet"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = runtime.resolve_device(args.device)
    dtype = runtime.autocast_dtype(device)
    data = jpegs(args.images)
    # bf16 only where it is native: emulated, a CPU takes minutes over the 2048^3 products
    fp32_peak = matmul_peak(torch.float32, device)
    bf16_peak = matmul_peak(torch.bfloat16, device) if dtype == torch.bfloat16 else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, autocast {dtype}")
    print(f"matmul peak: fp32 {fp32_peak:.0f} GFLOP/s" + (f", bf16 {bf16_peak:.0f} GFLOP/s" if bf16_peak else
                                                          " (no native bf16)"), flush=True)
    print("| model | size | naive img/s | ours eager img/s | ours compiled img/s | speed-up | compile s (+1 batch) | "
          "ours int8 img/s | int8 / compiled | int8 setup s | GFLOP/img | share of peak (compiled) | "
          "decode ms/img |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        model, embed, naive_preprocess, mean, std, channels_last = build(name)
        model.to(device)
        size = 224
        flops = flops_per_image(embed, size, device)
        # Naive: one image at a time, fp32, library preprocessing.
        with torch.inference_mode():
            embed(naive_preprocess(data[0]).to(device))
            started = time.perf_counter()
            for item in data[:args.naive_images]:
                torch.nn.functional.normalize(embed(naive_preprocess(item).to(device)), dim=1).cpu()
            naive = args.naive_images / (time.perf_counter() - started)
        # Ours: batched decode to uint8, then the shared embed_images (inference_mode, autocast, channels_last,
        # and for the CNN BatchNorm folded into the convolutions, as every export does).
        wrapped = Wrapped(model, mean, std, cnn=channels_last).for_inference()
        if name == "clip" and dtype == torch.bfloat16:
            wrapped.to(torch.bfloat16)  # what app.py does: bf16 weights beat autocast for the ViT (not for the CNN)
        if channels_last:
            wrapped.to(memory_format=torch.channels_last)
        def decode_and_embed(blobs, compiled=None):  # -> seconds spent decoding
            started = time.perf_counter()
            pixels = np.stack([photos.decode_square(d, size) for d in blobs])
            decoded = time.perf_counter()
            inference.embed_images(wrapped, pixels, device, dtype, args.batch_size, progress=False, compiled=compiled)
            return decoded - started

        decode_and_embed(data[:args.batch_size])  # warm-up at the timed batch size: oneDNN builds kernels per shape
        started = time.perf_counter()
        decode_seconds = decode_and_embed(data)
        eager = len(data) / (time.perf_counter() - started)
        # What a big catalog job does (embed.job_graph): Inductor with frozen weights, compiled once up front.
        with accel.CompiledEmbed(wrapped) as compiled:
            started = time.perf_counter()
            decode_and_embed(data[:args.batch_size], compiled)
            compile_seconds = time.perf_counter() - started
            started = time.perf_counter()
            decode_and_embed(data, compiled)
            ours = len(data) / (time.perf_counter() - started)
        # What a very big catalog job does on a CPU with int8 units (embed.job_graph): an int8 graph, calibrated on
        # the first batch and checked against the model (setup timed apart, as the compile above).
        int8, int8_setup = None, 0.0
        if device.type == "cpu" and runtime.cpu_supports_int8():
            started = time.perf_counter()
            first = np.stack([photos.decode_square(d, size) for d in data[:args.batch_size]])
            graph = accel.int8_embed_graph(wrapped, first, args.batch_size, device, dtype)
            int8_setup = time.perf_counter() - started
            if graph is not None:
                started = time.perf_counter()
                decode_and_embed(data, graph)
                int8 = len(data) / (time.perf_counter() - started)
            torch.compiler.reset()
        decode_ms = decode_seconds / len(data) * 1000
        peak = bf16_peak or fp32_peak
        int8_cells = f"{int8:.1f} | {int8 / ours:.2f}x | {int8_setup:.0f}" if int8 else "– | – | –"
        print(f"| {name} | {size} | {naive:.1f} | {eager:.1f} | {ours:.1f} | {ours / naive:.1f}x | "
              f"{compile_seconds:.0f} | {int8_cells} | {flops / 1e9:.2f} | {flops * ours / 1e9 / peak:.0%} | "
              f"{decode_ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
