"""Hostile photos, small on the wire and costly to a naive decoder, for testing the gate (tests/test_gate.py) and
for the load run (benchmarks/load.py): test data, kept out of the package. Each is built in well under a second."""
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


def tiff_repeated_entries(entries: int, value_bytes: int, tag_base=0x9000) -> bytes:
    """A little-endian TIFF structure (the body of EXIF) whose IFD0 holds ``entries`` entries that all point at the
    same ``value_bytes`` bytes: small on the wire, entries x value_bytes to a parser that copies every value."""
    value_at = 8 + 2 + 12 * entries + 4
    ifd = struct.pack("<H", entries) + b"".join(
        struct.pack("<HHII", tag_base + i, 7, value_bytes, value_at) for i in range(entries)) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"v" * value_bytes


def png_exif_copies(entries=2000, value_bytes=450_000) -> bytes:
    """A 1 x 1 PNG whose eXIf chunk (under 1 MB) holds ``entries`` entries sharing one value: ~0.9 GB of copies."""
    return png(1, 1, 8, 2, [_chunk(b"eXIf", tiff_repeated_entries(entries, value_bytes))])


def _jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def jpeg(width=16, height=16, quality=75, progressive=False) -> bytes:
    """A plain grey JPEG made by Pillow."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (128, 128, 128)).save(buffer, "JPEG", quality=quality, progressive=progressive)
    return buffer.getvalue()


def jpeg_with(segments: bytes, base: bytes | None = None) -> bytes:
    """A JPEG with ``segments`` placed right after its start-of-image marker."""
    base = base or jpeg()
    return base[:2] + segments + base[2:]


def jpeg_exif_copies(entries=1000, value_bytes=50_000) -> bytes:
    """A 16 x 16 JPEG whose APP1 EXIF segment holds ``entries`` entries sharing one value (~50 MB of copies)."""
    return jpeg_with(_jpeg_segment(0xE1, b"Exif\0\0" + tiff_repeated_entries(entries, value_bytes)))


def jpeg_mpf(entries=1000, value_bytes=50_000) -> bytes:
    """A 16 x 16 JPEG with an APP2 MPF segment of entries sharing one value: MPO parsing copies them at open."""
    return jpeg_with(_jpeg_segment(0xE2, b"MPF\0" + tiff_repeated_entries(entries, value_bytes, 0xB000)))


def webp_exif_copies(entries=2000, value_bytes=450_000) -> bytes:
    """A 1 x 1 lossless WebP (VP8X, then an EXIF chunk of shared values, then the bitstream)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (128, 128, 128)).save(buffer, "WEBP", lossless=True)
    bitstream = buffer.getvalue()[12:]  # the VP8L chunk of a simple-format file
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0x08, 0, 0, 0]) + (0).to_bytes(3, "little") * 2
    exif = tiff_repeated_entries(entries, value_bytes)
    chunks = vp8x + b"EXIF" + struct.pack("<I", len(exif)) + exif + b"\0" * (len(exif) & 1) + bitstream
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WEBP" + chunks


def _vp8l(width: int, height: int) -> bytes:
    """A VP8L chunk naming width x height (its pixel data is a stub: the header is what matters)."""
    bits = (width - 1) | (height - 1) << 14 | 1 << 28  # alpha hint, version 0
    payload = b"\x2f" + struct.pack("<I", bits) + b"\0" * 16
    return b"VP8L" + struct.pack("<I", len(payload)) + payload


def webp_late_vp8x(side=8900) -> bytes:
    """59 bytes: a lossless WebP whose bitstream names side x side, then a VP8X naming 1 x 1, which libwebp never
    reads."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0, 0, 0, 0]) + (0).to_bytes(3, "little") * 2
    chunks = _vp8l(side, side) + vp8x
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WEBP" + chunks


def png_late_ihdr(side=8900) -> bytes:
    """A PNG of side x side RGBA, with a second, 1 x 1 IHDR after its image data (Pillow reads the first)."""
    first = png(side, side, 8, 6)
    late = _chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0))
    return first[:-12] + late + first[-12:]


def jpeg_hidden_frame(side=8900) -> bytes:
    """A JPEG whose real frame header (side x side) hides behind an FF 00 pair after a decoy 100 x 100 frame header
    inside APP1: decoders skip the pair as junk, a naive parser reads it as a marker with a length."""
    base = jpeg(64, 64)
    sof = base.index(b"\xff\xc0")
    length = int.from_bytes(base[sof + 2:sof + 4], "big")
    real = base[sof:sof + 2 + length]
    real = real[:5] + struct.pack(">HH", side, side) + real[9:]
    decoy = real[:5] + struct.pack(">HH", 100, 100) + real[9:]
    # FF 00 then two bytes a naive parser takes as the length of a segment that swallows the APP1 holding the decoy
    app1 = _jpeg_segment(0xE1, b"pad" + decoy)
    junk = b"\xff\x00" + struct.pack(">H", 2 + len(app1) - 4)
    return base[:sof] + junk + app1 + real + base[sof + 2 + length:]


def jpeg_fill_bytes(megabytes=9) -> bytes:
    """A 64 x 64 JPEG behind megabytes of 0xFF fill bytes before its first marker after SOI."""
    base = jpeg(64, 64)
    return base[:2] + b"\xff" * (megabytes << 20) + base[2:]


def png_icc_chunks(count=989) -> bytes:
    """A 1 x 1 PNG with ``count`` iCCP chunks (each a parser call and a decompression in Pillow)."""
    profile = _chunk(b"iCCP", b"icc\0\0" + zlib.compress(b"\0" * 4096))
    return png(1, 1, 8, 2, [profile] * count)


def gif_header_only() -> bytes:
    return b"GIF89a"


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
    ("png eXIf of 2,000 shared entries", png_exif_copies, "x.png", "results"),
    ("jpeg EXIF of 1,000 shared entries", jpeg_exif_copies, "x.jpg", "results"),
    ("jpeg MPF of 1,000 shared entries", jpeg_mpf, "x.jpg", "results"),
    ("webp EXIF of 2,000 shared entries", webp_exif_copies, "x.webp", "results"),
    ("webp 8900x8900 with a late 1x1 VP8X", webp_late_vp8x, "x.webp", "too large"),
    ("png 8900x8900 with a late 1x1 IHDR", png_late_ihdr, "x.png", "too large"),
    ("jpeg frame hidden behind FF 00", jpeg_hidden_frame, "x.jpg", "not a marker"),
    ("jpeg behind 9 MB of fill bytes", jpeg_fill_bytes, "x.jpg", "fill bytes"),
    ("png with 989 iCCP chunks", png_icc_chunks, "x.png", "results"),
    ("gif of 6 bytes", gif_header_only, "x.gif", "truncated GIF"),
)
