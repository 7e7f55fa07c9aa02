"""Embedding photos in batches: uint8 pixels in, unit vectors out."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fashion_search.runtime import autocast
from fashion_search.transforms import normalize


# Photos per forward pass of a batch job (--eval-batch-size): on a CPU, int8 graphs ran faster at 64 than at 256 and
# bf16 ones no slower (BENCHMARKS.md, section 1); a data-centre GPU needs hundreds per pass to be kept busy.
EMBED_BATCH = 64
GPU_EMBED_BATCH = 512


def photos_224px(images: int, image_size: int) -> float:
    """A job's size in 224 px photos, what the compile and int8 thresholds count: a photo's cost grows with its
    pixels (a 64 px one costs ~12x less than a 224 px one)."""
    return images * (image_size / 224) ** 2


def embed_batch_size(device) -> int:
    return GPU_EMBED_BATCH if torch.device(device).type == "cuda" else EMBED_BATCH


@torch.inference_mode()
def embed_images(model, images: np.ndarray, device, dtype, batch_size=None, desc="embed", progress=True,
                 compiled=None) -> np.ndarray:
    """uint8 [N, 3, S, S] -> float32 [N, D], L2-normalised, in batches under inference_mode + autocast, for any
    fashion_search.model.Embedder (its normalisation and memory format).
    With ``compiled`` (a CompiledEmbed or an int8 graph of model.embed), every batch runs through it at one shape
    (the last one padded with zeros) so that it compiles once. ``batch_size``: embed_batch_size(device) unless given."""
    model.eval()
    batch_size = batch_size or embed_batch_size(device)
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False,
                      disable=None if progress else True):
        # A C-order copy: decoded photos are channels-last views ([3, S, S] over [S, S, 3]), and a compiled graph is
        # specialised to its input's strides, so a real photo after a warm-up on a blank one would recompile.
        pixels = np.array(images[start:start + batch_size], order="C")
        rows = len(pixels)
        if compiled is not None and rows < batch_size:
            pixels = np.concatenate([pixels, np.zeros((batch_size - rows, *pixels.shape[1:]), pixels.dtype)])
        batch = normalize(torch.from_numpy(pixels), model.mean, model.std, device, model.channels_last)
        with autocast(device, dtype):
            features = (compiled or model.embed)(batch)[:rows]
        chunks.append(F.normalize(features.float(), dim=1).cpu())
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(chunks).numpy().astype(np.float32)
