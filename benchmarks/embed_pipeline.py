"""Where a catalog build's time goes, stage by stage, on any device: decoding (JPEG bytes -> uint8 224 px squares, on
one thread and on the build's decode threads), the copy to the device (pinned uint8 batches), the model alone (batches
already on the device), and the build end to end (serving.build.embed_in_chunks, what app.py runs at a first start:
decode threads overlapping the model, JPEG bytes in, unit vectors out). The slowest stage is the build's limit.
Random weights of the real architectures (ViT-B/32 as a CLIP tower, ResNet-50), synthetic 60x80 product photos (the
catalog's own size): no download, no data set.

Usage: python benchmarks/embed_pipeline.py [--device cuda] [--photos 8192] [--models clip resnet]
"""
import argparse
import io
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageDraw

from embed_throughput import Wrapped, build, sync
from fashion_search import inference, runtime
from fashion_search.data import decode_cells
from fashion_search.photos.headers import read as read_header
from fashion_search.photos.pool import WORKERS as pool_size
from fashion_search.photos.pool import decode_square
from fashion_search.photos.worker import decode as decode_header
from fashion_search.serving.build import embed_in_chunks
from fashion_search.transforms import normalize


def product_photos(count: int, seed=0) -> list[bytes]:
    """JPEGs at 60x80 like the catalog's: a coloured garment-like shape on white, each different."""
    rng = np.random.default_rng(seed)
    photos = []
    for _ in range(count):
        image = Image.new("RGB", (60, 80), "white")
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        x0, y0 = rng.integers(2, 20, 2)
        ImageDraw.Draw(image).rounded_rectangle((x0, y0, 60 - rng.integers(2, 20), 80 - rng.integers(2, 20)),
                                                radius=int(rng.integers(2, 12)), fill=colour)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        photos.append(buffer.getvalue())
    return photos


class BuildJob(Wrapped):
    """A model as embed_in_chunks takes it (an Encoder's image_size, device, dtype, dim and embed_pixels)."""

    def __init__(self, model, mean, std, cnn, device, dim):
        super().__init__(model, mean, std, cnn)
        self.image_size, self.device, self.dtype, self.dim = 224, device, runtime.autocast_dtype(device), dim

    def embed_pixels(self, images, progress=False, compiled=None):
        return inference.embed_images(self, images, self.device, self.dtype, progress=False, compiled=compiled)


def rate(count, fn, device):
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return count / (time.perf_counter() - started)


def stages(name, photos, device, batch):
    model, _, _, mean, std, cnn = build(name)
    dim = 2048 if cnn else model.config.projection_dim
    job = BuildJob(model, mean, std, cnn, device, dim).to(device)
    if cnn:
        job.backbone = job.for_inference().backbone
        job.to(memory_format=torch.channels_last)
    elif job.dtype == torch.bfloat16:
        job.to(torch.bfloat16)  # as the app's Encoder: bf16 weights for the ViT
    threads = runtime.decode_threads(beside=device)
    figures = {"decode threads": threads}
    headers = [read_header(p) for p in photos]
    figures["decode in this process, 1 thread (no pool)"] = rate(
        len(photos), lambda: [decode_header(h, 224) for h in headers], device)
    cells = [{"bytes": p, "path": None} for p in photos]
    decode_cells(cells[:pool_size], 224)  # the workers start before the clock does
    for count in sorted({1, threads}):
        with ThreadPoolExecutor(count) as pool:  # as the build decodes: batches of photos, one worker task each
            figures[f"decode in the worker pool ({pool_size} workers), threads: {count}"] = rate(
                len(photos), lambda: decode_cells(cells, 224, pool), device)
    pixels = np.stack([decode_square(p, 224) for p in photos[:batch]])
    host = torch.from_numpy(pixels)
    rounds = max(1, len(photos) // batch)
    if device.type == "cuda":
        host = host.pin_memory()
        figures["copy to device"] = rate(batch * rounds, lambda: [host.to(device, non_blocking=True)
                                                                   for _ in range(rounds)], device)
    on_device = normalize(host, mean, std, device, cnn)

    def forward():
        with torch.inference_mode(), runtime.autocast(device, job.dtype):
            for _ in range(rounds):
                job.embed(on_device)
    forward()  # warm-up: kernels chosen per shape
    figures["model alone (eager)"] = rate(batch * rounds, forward, device)
    splits = {"all": photo_dataset(photos)}
    with tempfile.TemporaryDirectory() as folder:
        figures["end to end (the build)"] = rate(len(photos), lambda: embed_in_chunks(splits, job, folder), device)
    return figures


def photo_dataset(photos):
    import datasets

    features = datasets.Features({"id": datasets.Value("int64"), "image": datasets.Image()})
    return datasets.Dataset.from_dict({"id": list(range(len(photos))),
                                       "image": [{"bytes": p, "path": None} for p in photos]}, features=features)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--photos", type=int, default=2048)
    parser.add_argument("--models", nargs="+", default=["clip", "resnet"])
    args = parser.parse_args(argv)
    device = runtime.resolve_device(args.device)
    batch = inference.embed_batch_size(device)
    photos = product_photos(args.photos)
    print(f"torch {torch.__version__}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"{torch.get_num_threads()} CPU threads, batch {batch}, {len(photos)} photos at 60x80 -> 224 px\n")
    for name in args.models:
        figures = stages(name, photos, device, batch)
        threads = figures.pop("decode threads")
        stages_of_the_build = [k for k in figures if k != "end to end (the build)" and
                               (k != "decode, 1 thread" or threads == 1)]
        limit = min(stages_of_the_build, key=figures.get)
        print(f"| {name} on {device.type} | photos/s |\n|---|---:|")
        for stage, value in figures.items():
            print(f"| {stage} | {value:,.0f} |")
        plural = "s" if threads > 1 else ""
        print(f"\nslowest stage: {limit} (decoding on {threads} thread{plural}); the build reaches "
              f"{figures['end to end (the build)'] / figures[limit]:.0%} of it\n", flush=True)


if __name__ == "__main__":
    main()
