"""Photo headers read without a decoder: the format (from the magic bytes), the size in pixels, the orientation, and
the file rewritten for the decoder with everything but pixels removed (EXIF, MPF, XMP, ICC, comments, text chunks,
later frames), so that no parser reads a byte the checks here did not. Each format is read as its decoder reads it:
a PNG's IHDR only as its first chunk, a WebP's VP8X only as its first, nothing past the RIFF's end, and no bytes that
are not markers between JPEG segments. Anything these parsers cannot read is a refusal, never an exception."""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from fashion_search.errors import QueryError
from fashion_search.photos import exif

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
MAX_IMAGE_PIXELS = 40_000_000  # width x height from the header; a 40 MP RGBA decode is 160 MB
MAX_METADATA_BYTES = 1 << 20  # everything but pixels: a large ICC profile is ~0.5 MB
MAX_CHUNKS = 20_000  # PNG chunks / WebP chunks: a 10 MB PNG in 8 KB IDAT chunks has ~1,300
MAX_JPEG_SCANS = 100  # a progressive JPEG has ~10; each scan is a pass over the whole image
MAX_FILL_BYTES = 64  # 0xFF padding before JPEG markers: encoders write none; each costs Pillow a Python call

MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"))
KNOWN_OTHERS = ((b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"), (b"\x00\x00\x01\x00", "ICO"),
                (b"8BPS", "PSD"), (b"%PDF", "PDF"), (b"<svg", "SVG"), (b"<?xml", "SVG/XML"))
# What a decode holds per pixel of the full-size image, beyond JPEG's reduced output: Pillow keeps RGB(A) at 4 bytes
# a pixel; libwebp decodes to its own RGBA canvas with YUV buffers beside it, then Pillow copies the canvas.
BYTES_PER_PIXEL = {"PNG": 4, "GIF": 4, "WEBP": 16}
_FILL = re.compile(rb"\xff+")


@dataclass(frozen=True)
class Header:
    """What the header says, and the bytes to hand the decoder (cleaned, cut after the first frame). ``buffered``: a
    progressive or multi-scan JPEG, whose decoder keeps every coefficient at full size whatever the draft scale."""
    format: str
    width: int
    height: int
    orientation: int
    data: bytes
    components: int = 4
    buffered: bool = False

    def memory(self, size: int = 0) -> int:
        """Bytes the decode takes, for a decode reduced towards ``size`` (JPEG draft mode; 0: full size)."""
        if self.format != "JPEG":
            return self.width * self.height * BYTES_PER_PIXEL[self.format]
        scale = jpeg_draft_scale(self.width, self.height, size)
        output = -(-self.width // scale) * -(-self.height // scale) * 4
        return output + (self.width * self.height * self.components * 2 if self.buffered else 0)


def jpeg_draft_scale(width: int, height: int, size: int) -> int:
    """The factor JPEG draft mode decodes at for a requested (size, size): the largest of 8, 4, 2 that keeps both
    sides at least ``size`` (Pillow's rule), else 1."""
    if size <= 0:
        return 1
    fit = min(width // size, height // size)
    return next((scale for scale in (8, 4, 2) if scale <= fit), 1)


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


class _Metadata:
    """The running count of bytes that are not pixels, refused past MAX_METADATA_BYTES."""

    def __init__(self):
        self.total = 0

    def add(self, count: int):
        self.total += count
        if self.total > MAX_METADATA_BYTES:
            raise refused(f"{self.total:,} bytes of metadata; the limit is {MAX_METADATA_BYTES:,}")


def _jpeg(data: bytes) -> Header:
    pos, fill, metadata, kept = 2, 0, _Metadata(), [b"\xff\xd8"]
    frame, orientation = None, 1
    while True:
        if pos + 2 > len(data) or data[pos] != 0xFF:
            raise refused("bytes that are not a marker between JPEG segments" if pos + 2 <= len(data)
                          else "truncated JPEG header")
        run = _FILL.match(data, pos).end()  # the marker's 0xFF, with any fill bytes before it
        fill += run - pos - 1
        if fill > MAX_FILL_BYTES:
            raise refused(f"more than {MAX_FILL_BYTES} fill bytes between JPEG segments")
        pos = run - 1
        if pos + 2 > len(data):
            raise refused("truncated JPEG header")
        marker = data[pos + 1]
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length, meaningless before a scan
            pos += 2
            continue
        if marker == 0x00:  # an escaped 0xFF: decoders skip it as junk, so its "length" means nothing
            raise refused("bytes that are not a marker between JPEG segments")
        if marker in (0xD8, 0xD9):
            raise refused(f"JPEG marker 0x{marker:02X} before the image data")
        if pos + 4 > len(data):
            raise refused("truncated JPEG header")
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        segment = data[pos:pos + 2 + length]
        if length < 2 or len(segment) < 2 + length:
            raise refused("damaged JPEG header")
        if marker == 0xDA:  # start of scan: the pixels follow, to the end of the file
            if frame is None:
                raise refused("no JPEG frame header")
            kept.append(data[pos:])
            break
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame segment
            if frame is not None or length < 8:
                raise refused("two JPEG frame headers" if frame else "damaged JPEG frame header")
            height, width = struct.unpack(">HH", segment[5:9])
            frame = (width, height, max(1, segment[9]), marker in (0xC2, 0xC6, 0xCA, 0xCE))
            kept.append(segment)
        elif marker in (0xC4, 0xCC, 0xDB, 0xDD):  # Huffman and arithmetic tables, quantisation tables, restarts
            kept.append(segment)
        elif marker == 0xEE and segment[4:9] == b"Adobe" and length <= 64:  # the colour transform of CMYK JPEGs
            kept.append(segment)
        else:  # APPn (EXIF, MPF, ICC, XMP, ...), comments and anything else: dropped, counted
            metadata.add(length)
            if marker == 0xE1 and segment[4:10] == b"Exif\0\0" and orientation == 1:
                orientation = exif.orientation(segment[4:])
        pos += 2 + length
    scans = data.count(b"\xff\xda", pos)  # 0xFF in entropy-coded data is always followed by 0x00
    if scans > MAX_JPEG_SCANS:
        raise refused(f"more than {MAX_JPEG_SCANS} JPEG scans")
    width, height, components, progressive = frame
    return Header("JPEG", width, height, orientation, b"".join(kept), components, progressive or scans > 1)


def _png_chunk(kind: bytes, payload: bytes, crc: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + crc


def _png(data: bytes) -> Header:
    if data[12:16] != b"IHDR" or int.from_bytes(data[8:12], "big") != 13:
        raise refused("a PNG's first chunk is not its header")
    width, height = struct.unpack(">II", data[16:24])
    pos, metadata, chunks, orientation, kept, pixels = 33, _Metadata(), 1, 1, [data[:33]], False
    while True:
        if pos + 12 > len(data):
            raise refused("truncated PNG" if pixels else "no PNG image data")
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        following = pos + 12 + length
        if following > len(data):
            raise refused("truncated PNG")
        chunks += 1
        if chunks > MAX_CHUNKS:
            raise refused(f"more than {MAX_CHUNKS:,} PNG chunks")
        if kind == b"IDAT":
            pixels = True
            kept.append(data[pos:following])
        elif pixels:  # the first image's data has ended: later frames and trailing chunks are cut
            break
        elif kind == b"IHDR":
            raise refused("a second PNG header")
        elif kind in (b"PLTE", b"tRNS"):
            kept.append(data[pos:following])
        elif kind not in (b"acTL", b"fcTL"):  # an animation's control chunks are dropped, not metadata
            metadata.add(length)
            if kind == b"eXIf" and orientation == 1:
                orientation = exif.orientation(data[pos + 8:pos + 8 + length])
        pos = following
    kept.append(_png_chunk(b"IEND", b"", struct.pack(">I", 0xAE426082)))
    return Header("PNG", width, height, orientation, b"".join(kept))


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    while pos < len(data) and data[pos]:
        pos += data[pos] + 1
    if pos >= len(data):
        raise refused("truncated GIF")
    return pos + 1


def _gif(data: bytes) -> Header:
    if len(data) < 13:
        raise refused("truncated GIF")
    width, height = struct.unpack("<HH", data[6:10])
    flags, pos, metadata = data[10], 13, _Metadata()
    if flags & 0x80:
        pos += 3 * (2 << (flags & 7))  # global colour table
    kept = [data[:pos]]
    while pos < len(data):
        block = data[pos]
        if block == 0x21 and pos + 2 <= len(data):  # extension: comment, application, plain text, graphic control
            start = pos
            pos = _skip_sub_blocks(data, pos + 2)
            if data[start + 1] == 0xF9 and len(kept) == 1:  # graphic control (transparency) of the first frame
                kept.append(data[start:pos])
            else:
                metadata.add(pos - start)
        elif block == 0x2C:  # the first frame: Pillow's canvas spans the screen and this frame
            if pos + 10 > len(data):
                raise refused("truncated GIF")
            left, top, frame_width, frame_height, local = struct.unpack("<HHHHB", data[pos + 1:pos + 10])
            width, height = max(width, left + frame_width), max(height, top + frame_height)
            start = pos
            pos += 10 + (3 * (2 << (local & 7)) if local & 0x80 else 0)
            pos = _skip_sub_blocks(data, pos + 1)  # after the LZW code size
            kept.append(data[start:pos] + b"\x3b")  # the trailer: a one-frame GIF
            return Header("GIF", width, height, 1, b"".join(kept))
        elif block == 0x3B:
            break
        else:
            raise refused("damaged GIF")
    raise refused("GIF without a frame")


def _webp_chunk(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("<I", len(payload)) + payload + b"\0" * (len(payload) & 1)


def _bitstream_size(kind: bytes, payload: bytes) -> tuple[int, int]:
    """(width, height) of a VP8 or VP8L bitstream, as libwebp reads it."""
    if kind == b"VP8 " and len(payload) >= 10 and payload[3:6] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", payload[6:10])
        return width & 0x3FFF, height & 0x3FFF
    if kind == b"VP8L" and len(payload) >= 5 and payload[0] == 0x2F:
        bits = int.from_bytes(payload[1:5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    raise refused("damaged WebP bitstream header")


def _webp_chunks(data: bytes, pos: int, end: int):
    """(kind, payload) of each chunk from ``pos`` to ``end``; refused past MAX_CHUNKS or past the end."""
    count = 0
    while pos + 8 <= end:
        kind, length = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if pos + 8 + length > end:
            raise refused("truncated WebP")
        count += 1
        if count > MAX_CHUNKS:
            raise refused(f"more than {MAX_CHUNKS:,} WebP chunks")
        yield kind, data[pos + 8:pos + 8 + length]
        pos += 8 + length + (length & 1)


def _webp(data: bytes) -> Header:
    end = min(len(data), 8 + int.from_bytes(data[4:8], "little"))  # nothing past the RIFF's end is read
    chunks = _webp_chunks(data, 12, end)
    kind, payload = next(chunks, (b"", b""))
    if kind in (b"VP8 ", b"VP8L"):  # the simple format: one bitstream, and nothing after it is read
        width, height = _bitstream_size(kind, payload)
        return Header("WEBP", width, height, 1, _riff(_webp_chunk(kind, payload)))
    if kind != b"VP8X" or len(payload) < 10:
        raise refused("a WebP's first chunk is not its header")
    flags = payload[0]
    width, height = 1 + int.from_bytes(payload[4:7], "little"), 1 + int.from_bytes(payload[7:10], "little")
    metadata, orientation, kept = _Metadata(), 1, []
    for kind, body in chunks:
        if kind in (b"ALPH", b"ANIM") or kind in (b"VP8 ", b"VP8L") and not flags & 0x02:
            kept.append(_webp_chunk(kind, body))
            if kind in (b"VP8 ", b"VP8L") and _bitstream_size(kind, body) != (width, height):
                raise refused("the WebP's bitstream and its canvas differ in size")
        elif kind == b"ANMF" and flags & 0x02:  # an animation's first frame, within the canvas; later ones are cut
            frame = [(k, p) for k, p in _webp_chunks(body, 16, len(body)) if k in (b"VP8 ", b"VP8L")]
            left, top = 2 * int.from_bytes(body[0:3], "little"), 2 * int.from_bytes(body[3:6], "little")
            for sub_kind, sub_payload in frame[:1]:
                frame_width, frame_height = _bitstream_size(sub_kind, sub_payload)
                if left + frame_width > width or top + frame_height > height:
                    raise refused("a WebP frame outside its canvas")
            kept.append(_webp_chunk(kind, body))
            break
        elif kind in (b"VP8X", b"VP8 ", b"VP8L"):
            raise refused("a WebP with a second header or a stray bitstream")
        else:  # ICCP, EXIF, XMP and unknown chunks: dropped, counted
            metadata.add(len(body))
            if kind == b"EXIF" and orientation == 1:
                orientation = exif.orientation(body)
    if not any(chunk[:4] in (b"VP8 ", b"VP8L", b"ANMF") for chunk in kept):
        raise refused("no WebP image data")
    header = bytes([flags & ~0x2C]) + payload[1:10]  # without the ICC (0x20), EXIF (0x08) and XMP (0x04) flags
    return Header("WEBP", width, height, orientation, _riff(_webp_chunk(b"VP8X", header) + b"".join(kept)))


def _riff(chunks: bytes) -> bytes:
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WEBP" + chunks


_HEADERS = {"JPEG": _jpeg, "PNG": _png, "GIF": _gif, "WEBP": _webp}


def read(data: bytes) -> Header:
    """The header of a photo, checked: an allowed format, a size within MAX_IMAGE_PIXELS, metadata within
    MAX_METADATA_BYTES. QueryError for anything else, including a file the parsers cannot make sense of."""
    kind = sniff(data)
    try:
        header = _HEADERS[kind](data)
    except QueryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a parser slip on hostile bytes (IndexError, struct.error) is a refusal
        raise refused(f"damaged {kind} header ({type(exc).__name__})") from None
    if header.width <= 0 or header.height <= 0:
        raise refused("no image size in its header")
    if header.width * header.height > MAX_IMAGE_PIXELS:
        raise QueryError(f"image is too large ({header.width}x{header.height} pixels; the limit is "
                         f"{MAX_IMAGE_PIXELS:,})")
    return header
