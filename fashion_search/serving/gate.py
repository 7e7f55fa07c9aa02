"""The one way in for what comes from outside: item ids and upload bodies here, and photos through
fashion_search.photos (headers read and cleaned here, decoded in worker processes under limits the operating system
enforces: photos.pool). Every route calls these, and nothing else decodes outside bytes.

Ids. An item id is data: normalised to its key text, bounded in length, and never spliced into a query expression
(the stores pass it as a value; stores.milvus_store escapes it in its one place).

Upload bodies. ``read_body`` reads a request body within a size cap, a deadline and a shared bound on the memory
that all unfinished uploads hold.
"""
from __future__ import annotations

import asyncio
import re
import time

import numpy as np

from fashion_search.errors import Busy, QueryError
from fashion_search.stores import MAX_KEY_BYTES

# Upload bodies of the JSON routes: a body must arrive within UPLOAD_DEADLINE, at MIN_UPLOAD_RATE once UPLOAD_GRACE
# has passed; unfinished bodies hold at most UPLOAD_MEMORY together.
UPLOAD_DEADLINE = 30.0
UPLOAD_GRACE = 5.0  # seconds before a body must keep to MIN_UPLOAD_RATE (a slow start, a mobile link)
MIN_UPLOAD_RATE = 8 << 10  # bytes a second on average (64 kbit/s): a body one byte a second is cut off at UPLOAD_GRACE
UPLOAD_MEMORY = 128 << 20
MAX_QUERY_BYTES = 16 << 20  # a JSON query (its photos in base64) or a batch of photos
MAX_BATCH = 64  # photos in one batch request (a supplier feed is matched in such batches)
MAX_WORDS = 1000  # characters in one text part: far more than a description needs; words cost their length to read


def text(value: str, what: str) -> str:
    """Text from outside (an id, a filter column or value, a query's words) as the stores and JSON can carry it: no
    C0 control characters but tab, newline and carriage return (Milvus cannot fetch an id holding one), and no lone
    surrogates (UTF-8 cannot encode them). The message never repeats the text."""
    if _CONTROL.search(value):
        raise QueryError(f"{what} holds a control character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise QueryError(f"{what} is not valid Unicode text (a lone surrogate)") from None
    return value


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def words(value: str) -> str:
    """A query's words: text (as ``text`` checks it) of at most MAX_WORDS characters. They reach the lexical engine
    as tokens (fashion_search.lexical), never as query text."""
    if len(value) > MAX_WORDS:
        raise QueryError(f"a text part is at most {MAX_WORDS:,} characters")
    return text(value, "a text part")


def item_id(value) -> str:
    """The look-up key of an item id: ids may be numbers (the hub dataset) or file names (a folder of photos), and a
    number may arrive as 10003, 10003.0 or "10003". Any text is a valid id; it stays data wherever it goes."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    key = text(str(value.item() if hasattr(value, "item") else value).strip(), "an item id")
    if not key:
        raise QueryError("give an item id")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise QueryError(f"an item id is at most {MAX_KEY_BYTES} bytes long")
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
    """A request body within ``max_bytes``, arriving whole within ``deadline`` seconds and, after UPLOAD_GRACE
    seconds, at least MIN_UPLOAD_RATE bytes a second on average, while every unfinished upload together holds at most
    ``budget``. TooLarge (413), TooSlow (408) or Busy (503) otherwise."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise TooLarge(f"the image is over {max_bytes // 2**20} MB")
    deadline = UPLOAD_DEADLINE if deadline is None else deadline
    data, started = bytearray(), time.monotonic()
    chunks = request.stream().__aiter__()
    try:
        while True:
            # the next bytes are due when the body would fall below the minimum rate, and at the deadline at last
            due = min(deadline, UPLOAD_GRACE + (len(data) + 1) / MIN_UPLOAD_RATE)
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), max(0.0, started + due - time.monotonic()))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                if due >= deadline:
                    raise TooSlow(f"the upload did not arrive within {deadline:g} s") from None
                raise TooSlow(f"the upload arrived slower than {MIN_UPLOAD_RATE // 1024} KB/s") from None
            except ClientDisconnect:
                raise QueryError("the upload was interrupted") from None
            if len(data) + len(chunk) > max_bytes:  # counted as it arrives
                raise TooLarge(f"the image is over {max_bytes // 2**20} MB")
            budget.take(len(chunk))
            data.extend(chunk)
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
