"""Decoding photos whatever the file holds, and padding them to the square input size."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFile, ImageOps

# A photo larger than this (width x height) is refused before it is decoded (decompression bombs).
MAX_IMAGE_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half a picture


def open_image(source) -> Image.Image:
    """Decode bytes, a path or a PIL image into an RGB image, whatever the file holds: EXIF orientation
    applied, first frame of animations, transparency composed over white, CMYK/16-bit/palette converted.
    Raises ValueError with a readable message for anything that is not a decodable raster image."""
    try:
        if isinstance(source, Image.Image):
            image = source
        else:
            stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
            image = Image.open(stream)
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ValueError(f"image is too large ({width}x{height} pixels; the limit is {MAX_IMAGE_PIXELS:,})")
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except ValueError:
        raise
    except (OSError, SyntaxError, Image.DecompressionBombError, EOFError, TypeError) as exc:
        raise ValueError(f"not a readable image ({type(exc).__name__}: {exc})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit greyscale: scale the real range to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        image = Image.fromarray(array.astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
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


def decode_square(data: bytes, size: int) -> np.ndarray:
    """JPEG bytes -> uint8 [3, size, size]. ``draft`` lets the JPEG decoder downscale by 2/4/8 while it
    decodes, which is several times faster than decoding at full size and resizing afterwards."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.format == "JPEG" and getattr(image, "n_frames", 1) == 1:
            image.draft("RGB", (size, size))
    except (OSError, SyntaxError, Image.DecompressionBombError, EOFError, TypeError) as exc:
        raise ValueError(f"not a readable image ({type(exc).__name__}: {exc})") from None
    return square_uint8(open_image(image), size)
