"""Photos from outside: headers read as the decoders read them and cleaned of everything but pixels, the orientation
read by our own parser, and the decode in worker processes whose memory and time the operating system bounds."""
import io
import random
import struct
import threading
import time

import hostile
import pytest
from PIL import Image, ImageOps

from fashion_search.errors import Busy, QueryError
from fashion_search.photos import exif, headers, pool, worker

CASES = {name: (build, file_name, expect) for name, build, file_name, expect in hostile.CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_photos_are_answered_within_bounds(name):
    build, _, expect = CASES[name]
    data = build()
    started = time.monotonic()
    if expect == "results":
        assert pool.decode_square(data, 64).shape == (3, 64, 64)
    else:
        with pytest.raises(QueryError, match=expect):
            pool.decode_square(data, 64)
    assert time.monotonic() - started < 2


def encoded(image, kind, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def test_the_format_comes_from_the_bytes_and_only_the_first_frame_is_kept():
    header = headers.read(hostile.gif_trailing_comment(2))
    assert header.format == "GIF" and len(header.data) < 200  # cut after the first frame: the comment is gone
    assert headers.read(hostile.png(20, 10, 8, 2)).format == "PNG"
    with pytest.raises(QueryError, match="BMP is not taken"):
        headers.read(encoded(Image.new("RGB", (4, 4)), "BMP"))


def test_headers_are_read_as_the_decoders_read_them():
    late_vp8x = hostile.webp_late_vp8x(100)  # under the cap: the bitstream's size is what counts, not the VP8X's
    assert (headers.read(late_vp8x).width, headers.read(late_vp8x).height) == (100, 100)
    ihdr = struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0) + b"\0" * 4
    png = hostile.png(4, 4, 8, 2)
    with pytest.raises(QueryError, match="a second PNG header"):
        headers.read(png[:33] + ihdr + png[33:])
    with pytest.raises(QueryError, match="first chunk is not its header"):
        headers.read(png[:8] + png[33:])
    webp = encoded(Image.new("RGB", (4, 4)), "WEBP", lossless=True)
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (3).to_bytes(3, "little") * 2
    chunks = vp8x + webp[12:] + vp8x
    with pytest.raises(QueryError, match="second header or a stray"):
        headers.read(b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WEBP" + chunks)
    padded = webp[:4] + webp[4:8] + webp[8:] + b"JUNKJUNK" * 4  # bytes past the RIFF's end are never read
    assert headers.read(padded).data == headers.read(webp).data
    jpeg = hostile.jpeg()
    with pytest.raises(QueryError, match="not a marker"):
        headers.read(jpeg[:2] + b"\xff\x00" + jpeg[2:])
    tables = jpeg.index(b"\xff\xdb")
    with pytest.raises(QueryError, match="not a marker"):
        headers.read(jpeg[:tables] + b"garbage" + jpeg[tables:])
    assert headers.read(jpeg[:2] + b"\xff" * 10 + jpeg[2:]).width == 16  # a few fill bytes are the standard's


@pytest.mark.parametrize("data", [b"GIF89a", b"GIF87a\x01\x00", b"GIF89a\x01\x00\x01\x00\x80", b"\x89PNG\r\n\x1a\n",
                                  b"\xff\xd8\xff", b"RIFF\x04\x00\x00\x00WEBP", b"RIFF\xff\xff\xff\xffWEBPVP8X"])
def test_truncated_headers_are_refusals_not_crashes(data):
    with pytest.raises(QueryError, match="not a readable image"):
        headers.read(data)


def test_any_damage_to_a_header_is_a_refusal():
    """Mutated files of each format: the parsers answer a Header or a QueryError, never another exception."""
    rng = random.Random(0)
    seeds = [hostile.jpeg(), hostile.jpeg(progressive=True), hostile.png(8, 8, 8, 6), hostile.gif(4, 4, 2),
             encoded(Image.new("RGBA", (8, 8)), "WEBP"), hostile.webp_exif_copies(3, 10)]
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            data[at:at + rng.randint(1, 4)] = bytes(rng.randrange(256) for _ in range(rng.randint(0, 4)))
        try:
            headers.read(bytes(data))
        except QueryError:
            pass


def test_metadata_never_reaches_the_decoder():
    for data in (hostile.png_exif_copies(), hostile.jpeg_exif_copies(), hostile.jpeg_mpf(),
                 hostile.webp_exif_copies(), hostile.png_icc_chunks()):
        header = headers.read(data)
        assert len(header.data) < 2000, len(header.data)  # only the pixels and the tables they need are left
        assert not any(tag in header.data for tag in (b"Exif", b"eXIf", b"EXIF", b"MPF", b"iCCP"))


@pytest.mark.parametrize("kind", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_the_orientation_is_read_without_pillow_and_applied_in_the_worker(kind, orientation):
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # a red band on the left
    tags = Image.Exif()
    tags[exif.ORIENTATION_TAG] = orientation
    data = encoded(image, kind, exif=tags.tobytes(), **({"lossless": True} if kind == "WEBP" else {}))
    assert headers.read(data).orientation == orientation
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")  # Pillow's own reading
    got = pool.open_rgb(data)
    assert got.size == expected.size
    assert max(abs(a - b) for a, b in zip(got.tobytes(), expected.tobytes())) < 40


def test_a_decoder_that_reads_another_size_than_the_header_is_refused():
    header = headers.read(hostile.png(8, 8, 8, 2))
    lying = headers.Header(header.format, 4, 4, 1, header.data)
    with pytest.raises(QueryError, match="its header says 4x4, its decoder 8x8"):
        worker.decode(lying, 32)


def test_a_decompression_bomb_warning_is_a_refusal(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns past this, errors past twice it
    with pytest.raises(QueryError, match="DecompressionBombWarning"):
        worker.decode(headers.read(hostile.png(40, 40, 8, 2)), 32)


@pytest.mark.parametrize("error", [KeyError("<_io.BytesIO object at 0x7f3a2b1c0d90>"), AttributeError("palette"),
                                   IndexError("list index out of range")])
def test_any_pillow_exception_is_a_clear_message_without_object_reprs(error, monkeypatch):
    def broken(self):
        raise error

    monkeypatch.setattr(Image.Image, "load", broken)
    with pytest.raises(QueryError, match="not a readable image") as caught:
        worker.decode(headers.read(hostile.png(8, 8, 8, 2)), 32)
    assert "0x7f" not in str(caught.value) and "object at" not in str(caught.value)


def test_decode_costs_are_charged_at_what_decoders_take():
    side = 4000
    baseline = headers.read(encoded(Image.new("RGB", (side, 3000)), "JPEG"))
    assert baseline.memory(224) == 500 * 375 * 4  # draft mode decodes at 1/8
    progressive = headers.read(encoded(Image.new("RGB", (side, 3000)), "JPEG", progressive=True))
    assert progressive.buffered and progressive.memory(224) >= side * 3000 * 3 * 2  # every coefficient, full size
    webp = headers.read(encoded(Image.new("RGB", (64, 64)), "WEBP"))
    assert webp.memory(224) == 64 * 64 * headers.BYTES_PER_PIXEL["WEBP"]


def test_a_big_photo_is_reduced_while_it_decodes():
    pixels = pool.decode_square(encoded(Image.new("RGB", (4000, 3000), (200, 30, 30)), "JPEG"), 224)
    assert abs(int(pixels[0, 112, 112]) - 200) < 8


def test_this_process_never_runs_pillow_on_outside_bytes(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Image.open called in the server's process")

    monkeypatch.setattr(Image, "open", refuse)
    assert pool.decode_square(hostile.jpeg(), 32).shape == (3, 32, 32)
    assert pool.open_rgb(hostile.png(8, 6, 8, 2)).size == (8, 6)


def test_a_worker_past_its_memory_or_time_is_replaced_while_other_decodes_carry_on():
    costly = hostile.png_16bit()  # 36 MP: ~70 MB at full size
    for limits, message in (({"memory": 40 << 20}, "more than 40 MB"), ({"seconds": 0.05}, "more than 0.05 s")):
        decodes = pool.DecodePool(workers=2, **limits)
        try:
            good = []

            def good_decodes():
                for _ in range(20):
                    good.append(decodes.decode(headers.read(hostile.jpeg()), 32, None, True).shape)
            other = threading.Thread(target=good_decodes)
            other.start()
            for _ in range(3):  # each kills its worker; a fresh one takes the next
                with pytest.raises(pool.TooCostly, match=message) as caught:
                    decodes.decode(headers.read(costly), 64, None, True)
                assert caught.value.status == 422
            other.join()
            assert good == [(3, 32, 32)] * 20
        finally:
            decodes.close()


def test_the_decode_limiter_bounds_concurrency_and_memory():
    limiter = pool.DecodeLimiter(at_once=2, memory=100)
    with limiter.hold(10, 0.2), limiter.hold(10, 0.2):
        with pytest.raises(Busy):  # a third decode at once
            with limiter.hold(1, 0.2):
                pass
    with limiter.hold(80, 0.2):
        with pytest.raises(Busy):  # fits the count, not the memory
            with limiter.hold(30, 0.2):
                pass
        with limiter.hold(20, 0.2):
            pass
    with limiter.hold(1000):  # larger than the whole budget: runs alone
        assert limiter.held == 100
    assert limiter.running == 0 and limiter.held == 0


def test_a_bulk_decode_refuses_only_the_photo_that_costs_too_much():
    """Builds decode BATCH photos a task; a batch whose worker passes its limit is decoded again photo by photo."""
    decodes = pool.DecodePool(workers=2, memory=40 << 20)
    try:
        batch = [headers.read(data) for data in (hostile.jpeg(), hostile.png_16bit(), hostile.png(8, 8, 8, 2))]
        answers = decodes.decode_batch(batch, 32)
        assert answers[0].shape == answers[2].shape == (3, 32, 32)
        assert isinstance(answers[1], pool.TooCostly) and "more than 40 MB" in str(answers[1])
    finally:
        decodes.close()
    answers = pool.decode_many([hostile.jpeg(), b"GIF89a", hostile.png(8, 8, 8, 2)], 16)
    assert answers[0].shape == (3, 16, 16) and isinstance(answers[1], QueryError) and answers[2].shape == (3, 16, 16)
