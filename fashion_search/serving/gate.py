"""The one way in for what comes from outside: photos (uploads on the page and the JSON API, URL bodies, catalog
folders and datasets, catalog.py add), item ids and upload bodies. Every route calls these functions, and nothing
else decodes outside bytes.

Photos. Pillow's parsers can cost far more than a file's size (a GIF comment is joined quadratically, ``n_frames``
walks every frame, a tiny palette PNG can name 80 MP), so a photo is checked from its own header before Pillow sees
it: the format is one of ALLOWED_FORMATS (by its magic bytes, not its name), the pixel count is within
MAX_IMAGE_PIXELS, the bytes that are not pixels (EXIF, ICC, XMP, comments, text chunks) stay under
MAX_METADATA_BYTES, and the file is cut after its first frame, so that nothing after it is ever parsed. The decode
itself reduces to about the model's size as early as the decoder allows (JPEG draft mode, then ``reduce``) and runs
under a bound on concurrent decodes and on the memory they may take together.

Ids. An item id is data: normalised to its key text, bounded in length, and never spliced into a query expression
(the stores pass it as a value; stores.milvus_store escapes it in its one place).

Upload bodies. ``read_body`` reads a request body within a size cap, a deadline and a shared bound on the memory
that all unfinished uploads hold.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import re
import struct
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from fashion_search.images import square_uint8, to_rgb
from fashion_search.serving.errors import Busy, QueryError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
MAX_IMAGE_PIXELS = 40_000_000  # width x height from the header; a 40 MP RGBA decode is 160 MB
MAX_METADATA_BYTES = 1 << 20  # everything but pixels: a large ICC profile is ~0.5 MB
MAX_CHUNKS = 20_000  # PNG chunks / WebP chunks: a 10 MB PNG in 8 KB IDAT chunks has ~1,300
MAX_JPEG_SCANS = 100  # a progressive JPEG has ~10; each scan is a pass over the whole image
DECODES_AT_ONCE = 2
DECODE_MEMORY = 256 << 20  # what concurrent decodes may hold together (estimated from their headers)
DECODE_WAIT = 10.0  # seconds a decode waits for its turn before the request is refused as busy
MAX_ID_BYTES = 512  # as the Milvus key field (stores.milvus_store.KEY_LENGTH)
# Upload bodies of the JSON route: a body must arrive within UPLOAD_DEADLINE; unfinished bodies hold at most
# UPLOAD_MEMORY together.
UPLOAD_DEADLINE = 30.0
UPLOAD_MEMORY = 128 << 20
MAX_QUERY_BYTES = 16 << 20  # a JSON query (its photos in base64) or a batch of photos
MAX_BATCH = 64  # photos in one batch request (a supplier feed is matched in such batches)

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # Pillow's own check stays on as a second line
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half a picture

MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"))
KNOWN_OTHERS = ((b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"), (b"\x00\x00\x01\x00", "ICO"),
                (b"8BPS", "PSD"), (b"%PDF", "PDF"), (b"<svg", "SVG"), (b"<?xml", "SVG/XML"))


@dataclass(frozen=True)
class Header:
    """What the header says: the format, the size in pixels (the canvas, for an animation), the memory a decode
    takes, and the bytes to hand the decoder (cut after the first frame)."""
    format: str
    width: int
    height: int
    memory: int
    data: bytes


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


def inspect(data: bytes, size: int = 0) -> Header:
    """Check a photo from its header alone: format, pixel count, metadata bytes; QueryError if any fails.
    ``size``: the side the decode will reduce to (JPEG draft mode then decodes at 1/2, 1/4 or 1/8)."""
    data = bytes(data)
    kind = sniff(data)
    width, height, bytes_per_pixel, body = _HEADERS[kind](data)
    if width <= 0 or height <= 0:
        raise refused("no image size in its header")
    if width * height > MAX_IMAGE_PIXELS:
        raise QueryError(f"image is too large ({width}x{height} pixels; the limit is {MAX_IMAGE_PIXELS:,})")
    scale = jpeg_draft_scale(width, height, size) if kind == "JPEG" else 1
    memory = -(-width // scale) * -(-height // scale) * bytes_per_pixel
    return Header(kind, width, height, memory, body)


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


def jpeg_draft_scale(width: int, height: int, size: int) -> int:
    """The factor JPEG draft mode decodes at for a requested (size, size): the largest of 8, 4, 2 that keeps both
    sides at least ``size`` (Pillow's rule), else 1."""
    if size <= 0:
        return 1
    fit = min(width // size, height // size)
    return next((scale for scale in (8, 4, 2) if scale <= fit), 1)


class DecodeLimiter:
    """At most ``at_once`` decodes run together, and the memory their headers say they take stays within ``memory``
    bytes; a decode that cannot start within ``wait`` seconds is refused as busy."""

    def __init__(self, at_once=DECODES_AT_ONCE, memory=DECODE_MEMORY, wait=DECODE_WAIT):
        self.at_once, self.memory, self.wait = at_once, memory, wait
        self.running, self.held = 0, 0
        self.changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, memory: int):
        memory = min(memory, self.memory)  # one decode larger than the budget runs alone
        with self.changed:
            if not self.changed.wait_for(lambda: self.running < self.at_once and self.held + memory <= self.memory,
                                         timeout=self.wait):
                raise Busy("busy decoding other photos, try again in a moment")
            self.running, self.held = self.running + 1, self.held + memory
        try:
            yield
        finally:
            with self.changed:
                self.running, self.held = self.running - 1, self.held - memory
                self.changed.notify_all()


LIMITER = DecodeLimiter()
_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def _open(header: Header, size: int, box=None) -> Image.Image:
    """The decoded first frame, upright, cut to ``box`` (x0, y0, x1, y1 in the upright photo's pixels) if given, and
    reduced (a few times at most) to at least ``size`` on the long side of what is kept."""
    with LIMITER.hold(header.memory):
        try:
            image = Image.open(io.BytesIO(header.data), formats=[header.format])
            upright = (header.height, header.width) if image.getexif().get(0x0112) in (5, 6, 7, 8) else \
                (header.width, header.height)
            # the box's share of the photo's long side: keep enough pixels for the cut to reach ``size``
            share = max(box[2] - box[0], box[3] - box[1]) / max(upright) if box else 1.0
            need = int(size / min(1.0, max(share, 1e-3))) if size else 0
            if header.format == "JPEG" and need:
                image.draft("RGB", (need, need))
            image.load()
            factor = max(image.size) // (2 * need) if need else 1
            if factor >= 2:  # box-filter down to between 2x and 4x the target while the copy is still small
                if image.mode in ("1", "P", "I;16", "I;16B", "I;16L", "I;16N"):  # modes reduce() does not take
                    image = image.resize((-(-image.width // factor), -(-image.height // factor)),
                                         Image.Resampling.BOX)
                else:
                    image = image.reduce(factor)
            image = ImageOps.exif_transpose(image)
            if box:
                image = crop(image, box, upright)
            return image
        except (Busy, QueryError):
            raise
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types (KeyError, AttributeError, ...) on bad files
            detail = _REPR.sub("the file", str(exc))[:160]
            raise refused(f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__) from None


def crop(image: Image.Image, box, upright: tuple[int, int]) -> Image.Image:
    """``box`` in the upright photo's pixels, on ``image`` (the photo, maybe reduced), clipped to the photo."""
    x0, y0, x1, y1 = (min(v, limit) for v, limit in zip(box, upright * 2))
    if x1 <= x0 or y1 <= y0:
        raise QueryError(f"the box lies outside the photo ({upright[0]}x{upright[1]} pixels)")
    sx, sy = image.width / upright[0], image.height / upright[1]
    return image.crop((int(x0 * sx), int(y0 * sy), max(int(x0 * sx) + 1, round(x1 * sx)),
                       max(int(y0 * sy) + 1, round(y1 * sy))))


def decode_square(data: bytes, size: int, box=None) -> np.ndarray:
    """A photo from outside -> uint8 [3, size, size], through every check above (``box``: only that part of it).
    QueryError (a ValueError) with a readable message for anything refused or undecodable."""
    header = inspect(data, 0 if box else size)  # with a box, draft mode keeps more: count the memory at full size
    return square_uint8(to_rgb(_open(header, size, box)), size)


def open_rgb(data: bytes, max_side: int = 0) -> Image.Image:
    """A photo from outside as an upright RGB image, through the same checks, at most about 4 x ``max_side`` on its
    long side (0: full size), for display."""
    return to_rgb(_open(inspect(data, max_side), max_side))


def item_id(value) -> str:
    """The look-up key of an item id: ids may be numbers (the hub dataset) or file names (a folder of photos), and a
    number may arrive as 10003, 10003.0 or "10003". Any text is a valid id; it stays data wherever it goes."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    key = str(value.item() if hasattr(value, "item") else value).strip()
    if not key:
        raise QueryError("give an item id")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise QueryError(f"an item id is at most {MAX_ID_BYTES} bytes long")
    return key


class UploadBudget:
    """Bytes that unfinished uploads hold, together: one more chunk past the limit refuses its upload as busy."""

    def __init__(self, limit=UPLOAD_MEMORY):
        self.limit, self.held = limit, 0

    def take(self, count: int):
        if self.held + count > self.limit:
            raise Busy("busy receiving other uploads, try again in a moment")
        self.held += count

    def give(self, count: int):
        self.held -= count


UPLOADS = UploadBudget()  # one event loop takes and gives: no lock


class TooLarge(QueryError):
    status = 413


class TooSlow(QueryError):
    status = 408


async def read_body(request, max_bytes: int, deadline: float | None = None, budget: UploadBudget = UPLOADS) -> bytes:
    """A request body within ``max_bytes``, arriving whole within ``deadline`` seconds, while every unfinished upload
    together holds at most ``budget``. TooLarge (413), TooSlow (408) or Busy (503) otherwise."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise TooLarge(f"the image is over {max_bytes // 2**20} MB")
    data = bytearray()

    async def receive():
        from starlette.requests import ClientDisconnect

        try:
            async for chunk in request.stream():  # counted as it arrives
                if len(data) + len(chunk) > max_bytes:
                    raise TooLarge(f"the image is over {max_bytes // 2**20} MB")
                budget.take(len(chunk))
                data.extend(chunk)
        except ClientDisconnect:
            raise QueryError("the upload was interrupted") from None

    deadline = UPLOAD_DEADLINE if deadline is None else deadline
    try:
        await asyncio.wait_for(receive(), deadline)
    except asyncio.TimeoutError:
        raise TooSlow(f"the upload did not arrive within {deadline:g} s") from None
    finally:
        budget.give(len(data))
    if not data:
        raise QueryError("send the image file as the request body")
    return bytes(data)


async def read_photos(request, max_photos: int, max_photo_bytes: int) -> list[bytes]:
    """The photos of a multipart/form-data body (every file part, in order), read whole through ``read_body``
    (within MAX_QUERY_BYTES, its deadline and the upload budget) before any part is parsed."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise QueryError("send the photos as multipart/form-data, one file part each")
    body = await read_body(request, MAX_QUERY_BYTES)

    async def stream():
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=max_photos, max_fields=max_photos).parse()
    except MultiPartException as exc:
        raise QueryError(f"the multipart body cannot be read ({exc.message}); at most {max_photos} photos") from None
    files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
    if not files:
        raise QueryError("send at least one photo as a file part")
    photos = []
    for upload in files:
        data = await upload.read(max_photo_bytes + 1)
        await upload.close()
        if len(data) > max_photo_bytes:
            raise TooLarge(f"a photo is over {max_photo_bytes // 2**20} MB")
        photos.append(data)
    return photos
