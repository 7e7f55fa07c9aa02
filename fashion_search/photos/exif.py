"""The one EXIF tag a photo's pixels need, read without a decoder: the orientation. Everything else in EXIF is dropped
before Pillow sees the file (Pillow copies every entry's value, so a 1 MB EXIF block can cost gigabytes)."""
from __future__ import annotations

ORIENTATION_TAG = 0x0112
MAX_ENTRIES = 1000  # IFD0 of a camera photo has ~10-40 entries


def orientation(block: bytes) -> int:
    """The orientation (1-8) in an EXIF block (a TIFF structure, with or without the ``Exif\\0\\0`` prefix of a JPEG
    APP1 segment); 1 (upright) when the block has none or cannot be read. Reads IFD0's entries only, at most
    MAX_ENTRIES of them: linear in the block, never following an offset twice."""
    if block.startswith(b"Exif\0\0"):
        block = block[6:]
    order = {b"II": "little", b"MM": "big"}.get(block[:2])
    if order is None or len(block) < 8:
        return 1
    ifd = int.from_bytes(block[4:8], order)
    if ifd + 2 > len(block):
        return 1
    count = min(int.from_bytes(block[ifd:ifd + 2], order), MAX_ENTRIES, (len(block) - ifd - 2) // 12)
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        if int.from_bytes(block[entry:entry + 2], order) == ORIENTATION_TAG:
            if int.from_bytes(block[entry + 2:entry + 4], order) != 3:  # SHORT, as the standard says
                return 1
            value = int.from_bytes(block[entry + 8:entry + 10], order)
            return value if 1 <= value <= 8 else 1
    return 1


def sideways(value: int) -> bool:
    """Orientations 5-8 turn the photo a quarter: its upright width is the stored height."""
    return value in (5, 6, 7, 8)
