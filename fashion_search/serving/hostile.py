"""Hostile photos, small on the wire and costly to a naive decoder, for testing the gate (tests/test_gate.py) and
for the load run (benchmarks/load.py). Each is built from bytes in well under a second."""
from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png(width: int, height: int, bit_depth: int, colour_type: int, extra_chunks=()) -> bytes:
    """A blank PNG of any size, compressed row by row (a 6000 x 6000 16-bit one is ~80 KB)."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour_type]
    row = b"\0" * (1 + -(-width * channels * bit_depth // 8))  # filter byte + pixels
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    palette = [_chunk(b"PLTE", b"\0\0\0\xff\xff\xff")] if colour_type == 3 else []
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + b"".join(palette) + b"".join(extra_chunks)
            + _chunk(b"IDAT", body) + _chunk(b"IEND", b""))


def palette_png(width=6300, height=6300) -> bytes:
    """A 1-bit palette PNG just under the 40 MP cap (a few KB): Gradio's RGB conversion made it hundreds of MB."""
    return png(width, height, 1, 3)


def png_16bit(width=6000, height=6000) -> bytes:
    """A 16-bit greyscale PNG near the pixel cap (~80 KB): full-size float64 copies are 288 MB each."""
    return png(width, height, 16, 0)


def png_with_text(megabytes=9) -> bytes:
    """A 1 x 1 PNG carrying megabytes of text chunks."""
    text = _chunk(b"tEXt", b"Comment\0" + b"x" * (1 << 20))
    return png(1, 1, 8, 2, [text] * megabytes)


def _sub_blocks(data: bytes) -> bytes:
    return b"".join(bytes([len(data[i:i + 255])]) + data[i:i + 255] for i in range(0, len(data), 255)) + b"\0"


def _gif_frame(left=0, top=0) -> bytes:
    # a 1 x 1 frame: image descriptor, LZW code size 2, then clear code, pixel 0 and end code packed in one byte
    return b"\x2c" + struct.pack("<HHHHB", left, top, 1, 1, 0) + b"\x02" + _sub_blocks(b"\x44\x01")


def gif(width=1, height=1, frames=1, comment_bytes=0) -> bytes:
    """A GIF with a logical screen of width x height, ``frames`` 1 x 1 frames and a comment of ``comment_bytes``."""
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    comment = b"\x21\xfe" + _sub_blocks(b"c" * comment_bytes) if comment_bytes else b""
    return head + comment + _gif_frame() * frames + b"\x3b"


def gif_comment(megabytes=9) -> bytes:
    """A 1 x 1 GIF made of one comment: Pillow joins it 255 bytes at a time (quadratic: tens of seconds)."""
    return gif(comment_bytes=megabytes << 20)


def gif_canvas(side=6000, frames=100) -> bytes:
    """A 7 KB GIF with a huge logical screen and many 1 x 1 frames: copying every frame at full canvas size took an
    app past 16 GB."""
    return gif(side, side, frames)


def gif_trailing_comment(megabytes=9) -> bytes:
    """One good frame, then a comment after it (the gate cuts the file after the first frame)."""
    return gif(8, 8, 1)[:-1] + b"\x21\xfe" + _sub_blocks(b"c" * (megabytes << 20)) + b"\x3b"


def tiff_pages(pages=30_000) -> bytes:
    """A TIFF of tens of thousands of 1 x 1 pages (~3 MB): n_frames re-parses every directory (quadratic)."""
    entries = [(256, 3, 1, 1), (257, 3, 1, 1), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 8),
               (278, 3, 1, 1), (279, 4, 1, 1)]
    size = 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", 9) + b"\0")  # header, then the one pixel at offset 8
    for page in range(pages):
        start = len(out)
        following = 0 if page == pages - 1 else start + size
        out += struct.pack("<H", len(entries))
        for tag, kind, count, value in entries:
            out += struct.pack("<HHII", tag, kind, count, value)
        out += struct.pack("<I", following)
    return bytes(out)


# (name, builder, file name the Gradio route is sent, what the gate answers: "results" or a message fragment)
CASES = (
    ("gif with a 9 MB comment", gif_comment, "x.gif", "metadata"),
    ("gif 6000x6000 canvas, 100 frames", gif_canvas, "x.gif", "results"),
    ("gif frame then a 9 MB comment", gif_trailing_comment, "x.gif", "results"),
    ("palette png 39.7 MP", palette_png, "x.bmp", "results"),
    ("palette png 80 MP", lambda: palette_png(8000, 10000), "x.bmp", "too large"),
    ("16-bit png 36 MP", png_16bit, "x.png", "results"),
    ("png with 9 MB of text", png_with_text, "x.webp", "metadata"),
    ("tiff of 30,000 pages", tiff_pages, "x.tiff", "TIFF is not taken"),
)
