"""Pixel work on decoded photos: any Pillow mode to RGB, and padding to the square input size. Bytes from outside are
decoded only by the gate (fashion_search.serving.gate), which checks them first."""
from __future__ import annotations

import numpy as np
from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB: transparency composed over white, CMYK/palette converted, 16/32-bit greyscale scaled from its
    real range (rather than clipped at 255). Call it on an image already reduced to about the model's size: the
    high-bit conversion makes float copies."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        image = Image.fromarray(array.astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def square_uint8(image: Image.Image, size: int) -> np.ndarray:
    """Pad to a square on white (product photos have white backgrounds, so nothing is cropped away),
    resize to size x size and return uint8 [3, size, size]."""
    if image.size == (size, size):
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)  # already the input size: nothing to resample
    # ImageOps.pad's arithmetic, with each side at least 1 pixel (it fails on e.g. 20000 x 20).
    scale = size / max(image.width, image.height)
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    resized = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(resized, (round((size - width) / 2), round((size - height) / 2)))
    return np.asarray(canvas, dtype=np.uint8).transpose(2, 0, 1)
