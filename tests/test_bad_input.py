"""Bad and unusual image files, generated here, through the shared decoder (scripts and app use the same one) and
through the app's search: every one gets a clear message or a correct result, never a crash."""
import io

import numpy as np
import pytest
from PIL import Image

from fashion_search.images import square_uint8
from fashion_search.photos.pool import decode_square
from fashion_search.errors import QueryError


def encode(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def pattern(size=(48, 32)):
    """A picture with no symmetry, so that a wrong rotation or flip shows."""
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[: size[1] // 2, : size[0] // 3] = (220, 20, 20)
    array[size[1] // 2:, size[0] // 3:] = (20, 20, 220)
    return Image.fromarray(array)


def exif_rotated():
    """The pattern stored rotated by 90 degrees with EXIF orientation 6, which says 'rotate back when showing'."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(pattern().transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif, quality=95)


def animated(fmt):
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


GOOD = {
    "1x1": lambda: encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"),
    "20000x20": lambda: encode(Image.new("RGB", (20000, 20), (10, 20, 30)), "PNG"),
    "cmyk": lambda: encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG"),
    "16-bit": lambda: encode(Image.fromarray(np.linspace(0, 65535, 1600, dtype=np.uint16).reshape(40, 40)), "PNG"),
    "palette": lambda: encode(pattern().convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
    "palette+transparency": lambda: encode(pattern().convert("P"), "GIF", transparency=0),
    "rgba": lambda: encode(Image.new("RGBA", (40, 40), (255, 0, 0, 128)), "PNG"),
    "greyscale": lambda: encode(Image.new("L", (40, 40), 128), "JPEG"),
    "1-bit": lambda: encode(Image.new("1", (40, 40), 1), "PNG"),
    "animated gif": lambda: animated("GIF"),
    "animated webp": lambda: animated("WEBP"),
    "exif-rotated": exif_rotated,
}

BAD = {
    "zero bytes": lambda: b"",
    "truncated jpeg": lambda: encode(pattern((200, 200)), "JPEG")[:300],
    "corrupt jpeg header": lambda: b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF" + b"\x13" * 400,
    "truncated png": lambda: encode(pattern((200, 200)), "PNG")[:100],
    "corrupt png crc": lambda: (lambda d: d[:29] + bytes([d[29] ^ 0xFF]) + d[30:])(encode(pattern(), "PNG")),
    "text named .jpg": lambda: b"this is not an image, just text\n" * 10,
    "svg": lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
    "html": lambda: b"<!doctype html><html><body>hi</body></html>",
    "decompression bomb": lambda: encode(Image.new("1", (10_000, 5_000)), "PNG"),
    "tiff (not a format product photos come in)": lambda: encode(pattern(), "TIFF"),
    "bmp": lambda: encode(pattern(), "BMP"),
}


@pytest.mark.parametrize("name", list(GOOD))
def test_unusual_images_decode(name):
    pixels = decode_square(GOOD[name](), 32)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == np.uint8


@pytest.mark.parametrize("name", list(BAD))
def test_bad_images_get_a_clear_message(name):
    with pytest.raises(ValueError, match="not a readable image|too large"):
        decode_square(BAD[name](), 32)


def test_exif_orientation_is_applied():
    upright = square_uint8(pattern(), 48)
    rotated = decode_square(exif_rotated(), 48)
    assert np.abs(upright.astype(int) - rotated.astype(int)).mean() < 12  # JPEG noise only
    unrotated = square_uint8(pattern().transpose(Image.Transpose.ROTATE_90), 48)
    assert np.abs(unrotated.astype(int) - rotated.astype(int)).mean() > 40


def test_animated_images_use_the_first_frame():
    red = decode_square(animated("GIF"), 16)
    assert red[0].mean() > 200 and red[1].mean() < 60


def test_transparency_is_composed_over_white():
    pixels = decode_square(encode(Image.new("RGBA", (20, 20), (0, 0, 0, 0)), "PNG"), 16)
    assert pixels.min() == 255


@pytest.mark.parametrize("name", list(GOOD) + list(BAD))
def test_every_file_through_the_app(service, name):

    data = (GOOD | BAD)[name]()
    if name in GOOD:
        results = service.search_image_bytes(data)
        assert len(results) == 5
    else:
        with pytest.raises(QueryError, match="not a readable image|too large"):
            service.search_image_bytes(data)
