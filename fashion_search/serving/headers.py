"""Photo headers read without a decoder, for the gate (fashion_search.serving.gate): each allowed format's size, the
bytes that are not pixels (bounded before any parser sees them), and the file cut after its first frame."""
from __future__ import annotations

import struct

from fashion_search.serving.errors import QueryError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
MAX_METADATA_BYTES = 1 << 20  # everything but pixels: a large ICC profile is ~0.5 MB
MAX_CHUNKS = 20_000  # PNG chunks / WebP chunks: a 10 MB PNG in 8 KB IDAT chunks has ~1,300
MAX_JPEG_SCANS = 100  # a progressive JPEG has ~10; each scan is a pass over the whole image

MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"))
KNOWN_OTHERS = ((b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"), (b"\x00\x00\x01\x00", "ICO"),
                (b"8BPS", "PSD"), (b"%PDF", "PDF"), (b"<svg", "SVG"), (b"<?xml", "SVG/XML"))


def refused(message: str) -> QueryError:
    return QueryError(f"not a readable image ({message})")


def sniff(data: bytes) -> str:
    for magic, name in MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    other = next((name for magic, name in KNOWN_OTHERS if data.lstrip()[:5].startswith(magic)), None)
    allowed = ", ".join(ALLOWED_FORMATS)
    if other:
        raise refused(f"{other} is not taken; send {allowed}")
    raise refused(f"not a {allowed} file" if data else "empty file")


def _metadata(total: int):
    if total > MAX_METADATA_BYTES:
        raise refused(f"{total:,} bytes of metadata; the limit is {MAX_METADATA_BYTES:,}")


def _jpeg(data: bytes):
    pos, metadata, frame = 2, 0, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise refused("damaged JPEG header")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2:
            raise refused("damaged JPEG header")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame segment
            segment = data[pos + 4:pos + 10]
            if len(segment) < 6:
                raise refused("damaged JPEG header")
            frame = (int.from_bytes(segment[3:5], "big"), int.from_bytes(segment[1:3], "big"), max(1, segment[5]))
        elif 0xE0 <= marker <= 0xEF or marker == 0xFE:  # APPn (EXIF, ICC, XMP, ...) and comments
            metadata += length
            _metadata(metadata)
        elif marker == 0xDA:  # start of scan: the pixels begin
            break
        pos += 2 + length
    if frame is None:
        raise refused("no JPEG frame header")
    if data.count(b"\xff\xda") > MAX_JPEG_SCANS:  # 0xFF in entropy-coded data is always followed by 0x00
        raise refused(f"more than {MAX_JPEG_SCANS} JPEG scans")
    return frame[0], frame[1], frame[2], data


def _png(data: bytes):
    pos, metadata, chunks, size, end = 8, 0, 0, None, None
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, following = data[pos + 4:pos + 8], pos + 12 + length
        chunks += 1
        if chunks > MAX_CHUNKS:
            raise refused(f"more than {MAX_CHUNKS:,} PNG chunks")
        if kind == b"IHDR" and length >= 13:
            size = (int.from_bytes(data[pos + 8:pos + 12], "big"), int.from_bytes(data[pos + 12:pos + 16], "big"))
        elif kind == b"IDAT":
            end = following
        elif end is not None:  # the first image's data has ended: later frames and trailing chunks are cut
            break
        elif kind not in (b"PLTE", b"tRNS", b"acTL", b"fcTL"):
            metadata += length
            _metadata(metadata)
        pos = following
    if size is None:
        raise refused("no PNG header")
    if end is None:
        raise refused("no PNG image data")
    iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", 0xAE426082)
    return size[0], size[1], 4, data[:end] + iend


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    while pos < len(data) and data[pos]:
        pos += data[pos] + 1
    if pos >= len(data):
        raise refused("truncated GIF")
    return pos + 1


def _gif(data: bytes):
    width, height = struct.unpack("<HH", data[6:10])
    flags, pos, metadata = data[10] if len(data) > 10 else 0, 13, 0
    if flags & 0x80:
        pos += 3 * (2 << (flags & 7))  # global colour table
    while pos < len(data):
        block = data[pos]
        if block == 0x21:  # extension: comment, application, plain text, graphic control
            start = pos
            pos = _skip_sub_blocks(data, pos + 2)
            if data[start + 1] != 0xF9:  # graphic control (transparency) is a few bytes the first frame needs
                metadata += pos - start
                _metadata(metadata)
        elif block == 0x2C:  # the first frame: Pillow's canvas spans the screen and this frame
            if pos + 10 > len(data):
                raise refused("truncated GIF")
            left, top, frame_width, frame_height, local = struct.unpack("<HHHHB", data[pos + 1:pos + 10])
            width, height = max(width, left + frame_width), max(height, top + frame_height)
            pos += 10 + (3 * (2 << (local & 7)) if local & 0x80 else 0)
            pos = _skip_sub_blocks(data, pos + 1)  # after the LZW code size
            return width, height, 4, data[:pos] + b"\x3b"  # the trailer: a one-frame GIF
        elif block == 0x3B:
            break
        else:
            raise refused("damaged GIF")
    raise refused("GIF without a frame")


def _webp(data: bytes):
    pos, metadata, chunks, size = 12, 0, 0, None
    while pos + 8 <= len(data):
        kind, length = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        payload = data[pos + 8:pos + 8 + min(length, 16)]
        chunks += 1
        if chunks > MAX_CHUNKS:
            raise refused(f"more than {MAX_CHUNKS:,} WebP chunks")
        if kind == b"VP8X" and len(payload) >= 10:  # the canvas
            size = (1 + int.from_bytes(payload[4:7], "little"), 1 + int.from_bytes(payload[7:10], "little"))
        elif kind == b"VP8 " and size is None and len(payload) >= 10:
            size = tuple(v & 0x3FFF for v in struct.unpack("<HH", payload[6:10]))
        elif kind == b"VP8L" and size is None and len(payload) >= 5:
            bits = int.from_bytes(payload[1:5], "little")
            size = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        elif kind not in (b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ANIM", b"ANMF"):
            metadata += length
            _metadata(metadata)
        pos += 8 + length + (length & 1)
    if size is None:
        raise refused("no WebP image size")
    return size[0], size[1], 4, data


_HEADERS = {"JPEG": _jpeg, "PNG": _png, "GIF": _gif, "WEBP": _webp}


def read(data: bytes) -> tuple[str, int, int, int, bytes]:
    """(format, width, height, bytes per decoded pixel, the bytes to decode) from the header alone; QueryError for
    another format, a damaged header or too much metadata."""
    kind = sniff(data)
    return (kind, *_HEADERS[kind](data))
