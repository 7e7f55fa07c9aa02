"""What runs inside a decode worker process (fashion_search.photos.pool starts them): Pillow on a photo's cleaned bytes,
under the address-space limit that ``start`` sets. This module imports Pillow and NumPy only, never torch.

A decode that runs out of its memory exits the worker (the pool reports the photo as too costly and starts another);
one that runs out of time is killed by the pool."""
from __future__ import annotations

import io
import os
import re
import resource
import warnings

from PIL import Image, ImageFile

from fashion_search.errors import QueryError
from fashion_search.images import square_uint8, to_rgb
from fashion_search.photos import exif
from fashion_search.photos.headers import MAX_IMAGE_PIXELS, Header, refused

OUT_OF_MEMORY = 75  # the exit status of a worker whose decode passed its memory limit

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # Pillow's own check stays on as a second line
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half a picture
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}
_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def start(memory: int):
    """A worker's first step: its address space may grow by ``memory`` bytes past what it holds now (the
    interpreter, Pillow and NumPy), and it writes no core files."""
    with open("/proc/self/status") as status:
        held = next(int(line.split()[1]) << 10 for line in status if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (held + memory, held + memory))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run(header: Header, size: int, box, square: bool):
    """The task a worker runs: ``decode``, with a memory error ending the worker (its heap may be left in pieces)."""
    try:
        return decode(header, size, box, square)
    except MemoryError:
        os._exit(OUT_OF_MEMORY)


def run_batch(headers: list[Header], size: int) -> list:
    """The task of a batch (catalog builds, the image cache): each photo's uint8 [3, size, size], or the QueryError
    that refused it, in order; a memory error ends the worker, as in ``run``."""
    answers = []
    for header in headers:
        try:
            answers.append(decode(header, size))
        except QueryError as exc:
            answers.append(exc)
        except MemoryError:
            os._exit(OUT_OF_MEMORY)
    return answers


def decode(header: Header, size: int, box=None, square: bool = True):
    """The photo's first frame, upright, cut to ``box`` if given: uint8 [3, size, size] when ``square``, else the
    RGB image (reduced to about 2-4 x ``size`` on its long side; 0: full size) as (width, height, bytes)."""
    try:
        with warnings.catch_warnings():  # a worker decodes one photo at a time: no other thread shares the filters
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # past the cap is a refusal, not a warning
            image = upright(header, size, box)
        if square:
            return square_uint8(to_rgb(image), size)
        image = to_rgb(image)
        return image.width, image.height, image.tobytes()
    except (MemoryError, QueryError):
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types (KeyError, AttributeError, ...) on bad files
        detail = _REPR.sub("the file", str(exc))[:160]
        raise refused(f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__) from None


def upright(header: Header, size: int, box=None) -> Image.Image:
    """The decoded first frame, turned upright by the header's orientation, cut to ``box`` (x0, y0, x1, y1 in the
    upright photo's pixels) if given, and reduced (a few times at most) to at least ``size`` on the long side of
    what is kept."""
    image = Image.open(io.BytesIO(header.data), formats=[header.format])
    if image.size != (header.width, header.height):  # the decoder read another size than the checks did
        raise refused(f"its header says {header.width}x{header.height}, its decoder {image.width}x{image.height}")
    upright_size = (header.height, header.width) if exif.sideways(header.orientation) else \
        (header.width, header.height)
    # the box's share of the photo's long side: keep enough pixels for the cut to reach ``size``
    share = max(box[2] - box[0], box[3] - box[1]) / max(upright_size) if box else 1.0
    need = int(size / min(1.0, max(share, 1e-3))) if size else 0
    if header.format == "JPEG" and need:
        image.draft("RGB", (need, need))
    image.load()
    factor = max(image.size) // (2 * need) if need else 1
    if factor >= 2:  # box-filter down to between 2x and 4x the target while the copy is still small
        if image.mode in ("1", "P", "I;16", "I;16B", "I;16L", "I;16N"):  # modes reduce() does not take
            image = image.resize((-(-image.width // factor), -(-image.height // factor)), Image.Resampling.BOX)
        else:
            image = image.reduce(factor)
    if header.orientation in TRANSPOSE:
        image = image.transpose(TRANSPOSE[header.orientation])
    return crop(image, box, upright_size) if box else image


def crop(image: Image.Image, box, upright_size: tuple[int, int]) -> Image.Image:
    """``box`` in the upright photo's pixels, on ``image`` (the photo, maybe reduced), clipped to the photo."""
    x0, y0, x1, y1 = (min(v, limit) for v, limit in zip(box, upright_size * 2))
    if x1 <= x0 or y1 <= y0:
        raise QueryError(f"the box lies outside the photo ({upright_size[0]}x{upright_size[1]} pixels)")
    sx, sy = image.width / upright_size[0], image.height / upright_size[1]
    return image.crop((int(x0 * sx), int(y0 * sy), max(int(x0 * sx) + 1, round(x1 * sx)),
                       max(int(y0 * sy) + 1, round(y1 * sy))))
