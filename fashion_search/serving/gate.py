"""The one way in for what comes from outside: photos (uploads on the page and the JSON API, URL bodies, catalog
folders and datasets, catalog.py add), item ids and upload bodies. Every route calls these functions, and nothing
else decodes outside bytes.

Photos. Pillow's parsers can cost far more than a file's size (a GIF comment is joined quadratically, ``n_frames``
walks every frame, a tiny palette PNG can name 80 MP), so a photo is checked from its own header before Pillow sees
it (serving.headers reads it): the format is one of ALLOWED_FORMATS (by its magic bytes, not its name), the pixel
count is within MAX_IMAGE_PIXELS, the bytes that are not pixels (EXIF, ICC, XMP, comments, text chunks) stay under
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
import os
import re
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from fashion_search.images import square_uint8, to_rgb
from fashion_search.serving import headers
from fashion_search.serving.errors import Busy, QueryError
from fashion_search.serving.headers import refused

MAX_IMAGE_PIXELS = 40_000_000  # width x height from the header; a 40 MP RGBA decode is 160 MB
DECODES_AT_ONCE = max(2, min(16, os.cpu_count() or 2))  # one per core: a catalog build on a GPU decodes on many
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

@dataclass(frozen=True)
class Header:
    """What the header says: the format, the size in pixels (the canvas, for an animation), the memory a decode
    takes, and the bytes to hand the decoder (cut after the first frame)."""
    format: str
    width: int
    height: int
    memory: int
    data: bytes


def inspect(data: bytes, size: int = 0) -> Header:
    """Check a photo from its header alone: format, pixel count, metadata bytes; QueryError if any fails.
    ``size``: the side the decode will reduce to (JPEG draft mode then decodes at 1/2, 1/4 or 1/8)."""
    kind, width, height, bytes_per_pixel, body = headers.read(bytes(data))
    if width <= 0 or height <= 0:
        raise refused("no image size in its header")
    if width * height > MAX_IMAGE_PIXELS:
        raise QueryError(f"image is too large ({width}x{height} pixels; the limit is {MAX_IMAGE_PIXELS:,})")
    scale = jpeg_draft_scale(width, height, size) if kind == "JPEG" else 1
    memory = -(-width // scale) * -(-height // scale) * bytes_per_pixel
    return Header(kind, width, height, memory, body)


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
