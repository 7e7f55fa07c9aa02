"""Every request within a bound of its own: filter values, JSON bodies, text from outside, uploads that trickle, URL
parts, what the page's client hands back, a damaged index; and data paths that never lose a photo to a busy moment."""
import base64
import collections
import json
import threading
import time

import httpx
import hostile
import numpy as np
import pytest

from fashion_search.data import decode_cells
from fashion_search.errors import Busy, QueryError, UserError
from fashion_search.photos import pool
from fashion_search.serving import gate, json_api, query
from fashion_search.stores import Match


def post_json(served, body, **kwargs):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(served + "api/search", content=content, timeout=60, **kwargs)


def test_filter_values_are_counted_once_and_never_more_than_the_column_holds(service, served):
    data = service.catalog.image_bytes(service.catalog.store.items()[0][0])
    photo = base64.b64encode(data).decode()
    started = time.monotonic()
    answer = post_json(served, {"parts": [{"photo": photo}], "filters": {"baseColour": ["Red"] * 100_000}})
    assert answer.status_code == 400 and "more than 10,000 values" in answer.json()["error"]
    answer = post_json(served, {"parts": [{"photo": photo}], "filters": {"baseColour": ["Red"] * 9_000}})
    assert answer.status_code == 200 and all(r["baseColour"] == "Red" for r in answer.json()["results"])
    assert time.monotonic() - started < 5  # a million comparisons a value took minutes
    assert service.catalog.check_filters({"baseColour": ["Red", "Red", "Blue"]}) == {
        "baseColour": Match(("Red", "Blue"))}
    held = len(service.catalog.choices("baseColour")) - 1
    with pytest.raises(QueryError, match=f"more baseColour values than the catalog holds \\({held}\\)"):
        service.catalog.check_filters({"baseColour": [f"colour {i}" for i in range(held + 1)]})


def test_a_match_hashes_its_values_and_agrees_with_a_plain_comparison():
    rng = np.random.default_rng(0)
    column = np.array([f"v{i}" for i in rng.integers(0, 50, 5000)], dtype=object)
    values = tuple(f"v{i}" for i in range(0, 50, 3))
    expected = np.array([value in values for value in column])
    assert (Match(values).mask(column) == expected).all()
    assert (Match(values, exclude=True).mask(column) == ~expected).all()


@pytest.mark.parametrize("body, message", [
    (b"[" + b"[]," * 5_000_000 + b"[]]", "more than 10,000 values"),
    (b'{"parts": ' + b"[" * 5000 + b"]" * 5000 + b"}", "the body is JSON|nests deeper"),
    (b'{"parts": [{"text": "shirt"}], "k": Infinity}', "finite"),
    (b'{"parts": [{"text": "shirt"}], "k": NaN}', "finite"),
    (b'{"parts": [{"text": "shirt"}], "k": 1e999}', "finite"),
    (b'{"parts": [{"photo": "x"}], "box": [0, 0, 1e999, 5]}', "finite"),
    (b'{"parts": [{"text": "shirt"}], "collapse": "maybe"}', "collapse is true or false"),
    (b'{"parts": [{"text": "shirt"}', "the body is JSON"),
    (b'{"parts": [{"text": "shirt"}], "filters": {"\\ud800": "Red"}}', "lone surrogate"),
    (b'{"parts": [{"text": "shirt"}], "filters": {"baseColour": "Re\\ud800"}}', "lone surrogate"),
    (b'{"parts": [{"item": "x\\u0008y"}]}', "control character"),
    (b'{"parts": [{"url": "http://a/1"}, {"url": "http://a/2"}, {"url": "http://a/3"}]}', "at most 2 URL parts"),
])
def test_bad_json_bodies_are_400_with_their_message_and_stall_nobody(served, body, message):
    seen = {}

    def status_meanwhile():
        started = time.monotonic()
        seen["status"] = httpx.get(served + "api/search_text", params={"q": "shirt"}, timeout=30).status_code
        seen["seconds"] = time.monotonic() - started
    other = threading.Thread(target=status_meanwhile)
    other.start()
    answer = post_json(served, body)
    other.join()
    assert answer.status_code == 400, answer.text
    assert any(part in answer.json()["error"] for part in message.split("|")), answer.json()
    assert seen["status"] == 200 and seen["seconds"] < 2


def test_a_query_string_of_non_numbers_and_odd_flags_is_400(served):
    for params, message in (({"q": "shirt", "k": "1e999"}, "k is a whole number"),
                            ({"q": "shirt", "box": "0,0,inf,4"}, "box is x0,y0,x1,y1"),
                            ({"q": "shirt", "collapse": "perhaps"}, "collapse is true or false"),
                            ({"q": "shirt", "baseColour": "R\x01d"}, "control character")):
        answer = httpx.get(served + "api/search_text", params=params, timeout=30)
        assert answer.status_code == 400 and message in answer.json()["error"], answer.text
    numeric = query.from_json({"parts": [{"text": "x"}], "filters": {"year": 2012.0}, "collapse": "false"}, 10)
    assert numeric.filters == {"year": "2012"} and numeric.collapse is False


def test_ids_and_words_hold_no_control_characters_or_lone_surrogates():
    for bad in ("a\x00b", "a\x1bb", "x\ud800"):
        with pytest.raises(QueryError, match="control character|lone surrogate"):
            gate.item_id(bad)
    assert gate.item_id("tab\tand\nnewline") == "tab\tand\nnewline"


def test_photos_that_break_header_parsers_are_refused_alone_in_a_batch(served, service):
    good = service.catalog.image_bytes(service.catalog.store.items()[0][0])
    answer = httpx.post(served + "api/search_image", content=b"GIF89a", timeout=30)
    assert answer.status_code == 400 and "truncated GIF" in answer.json()["error"]
    files = [("photo", ("a.jpg", good)), ("photo", ("b.gif", b"GIF89a")), ("photo", ("c.jpg", good))]
    answers = httpx.post(served + "api/search_batch", files=files, params={"k": 3, "offset": 2}, timeout=60).json()
    assert [sorted(a) for a in answers["answers"]] == [["close_match", "results"], ["error"],
                                                         ["close_match", "results"]]
    assert "truncated GIF" in answers["answers"][1]["error"]
    single = httpx.post(served + "api/search_image", content=good, params={"k": 3, "offset": 2}, timeout=30).json()
    assert answers["answers"][0] == single  # the batch answers each photo as the photo route does, page and all
    boxed = httpx.post(served + "api/search_batch", files=files[:1], params={"box": "0,0,5,5"}, timeout=30)
    assert boxed.status_code == 400 and "a batch takes no box" in boxed.json()["error"]


def test_what_the_page_client_hands_back_is_bounded(service):
    record = service.rank(service.catalog.vector(service.catalog.store.items()[0][0]))[0]
    with pytest.raises(QueryError, match="at most 100 records"):
        service.gallery([record] * 400)
    with pytest.raises(QueryError, match="a score and a confidence"):
        service.gallery([{**record, "confidence": "high"}])
    with pytest.raises(QueryError, match="a score and a confidence"):
        service.describe([{**record, "score": float("nan")}])
    assert len(service.gallery([record])) == 1


def test_the_gradio_search_takes_photos_within_the_upload_limit_only(service):
    data = hostile.jpeg(16, 16)
    text = json.dumps({"parts": [{"photo": base64.b64encode(data).decode()}]})
    assert service.search_json(text, len(data))
    with pytest.raises(QueryError, match="at most 0 MB"):
        service.search_json(text, len(data) - 1)


def test_url_parts_are_fetched_together_within_one_deadline(service, server, monkeypatch):
    from fashion_search.serving import service as service_module

    monkeypatch.setattr(service_module, "TOTAL_TIMEOUT", 1.5)
    slow = server + "/slow"  # a byte every 0.5 s
    started = time.monotonic()
    with pytest.raises(QueryError, match="took longer than 1.5 s"):
        service.part_vectors([query.Part("url", slow), query.Part("url", slow)])
    assert time.monotonic() - started < 2.5  # one deadline for both, not one each


def test_a_trickle_of_uploads_never_takes_the_slots_of_text_searches(served, monkeypatch):
    """64 uploads a byte at a time hold every upload slot, not the text route's; each is cut off once it falls
    below the minimum rate (after UPLOAD_GRACE), long before the whole-body deadline."""
    from test_gate import trickle

    monkeypatch.setattr(gate, "UPLOAD_GRACE", 1.0)
    stop, answers = threading.Event(), [None] * json_api.MAX_PENDING
    threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, trickle(served.rstrip("/"), 20, stop)))
               for i in range(json_api.MAX_PENDING)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    answer = httpx.get(served + "api/search_text", params={"q": "shirt"}, timeout=30)
    assert answer.status_code == 200
    for thread in threads:
        thread.join(15)
    stop.set()
    assert time.monotonic() - started < 10  # cut at the rate, not at the 30 s deadline
    assert all("408" in a.split("\r\n")[0] and "slower than 8 KB/s" in a for a in answers), answers[0]


def test_builds_wait_for_a_decode_slot_and_count_what_they_leave_out(monkeypatch):
    """A busy moment never marks a good photo broken: the data paths wait for their turn, where a query is refused
    as busy. Photos left out are counted with their reasons."""
    limiter = pool.DecodeLimiter(at_once=1)
    monkeypatch.setattr(pool.POOL, "limiter", limiter)
    cells = [{"bytes": hostile.jpeg(), "path": None}, None, {"bytes": b"GIF89a", "path": None}]
    left_out, result = collections.Counter(), []
    with limiter.hold(1):  # every slot taken
        with pytest.raises(Busy):
            pool.decode_square(hostile.jpeg(), 16, wait=0.1)
        build = threading.Thread(target=lambda: result.extend(decode_cells(cells, 16, None, left_out)))
        build.start()
        time.sleep(0.5)
        assert build.is_alive()  # still waiting for its turn
    build.join(30)
    assert result[0].shape == (3, 16, 16) and result[1] is None and result[2] is None
    assert left_out == {"the row has no image": 1, "not a readable image (truncated GIF)": 1}


def test_dataset_columns_named_as_record_fields_are_refused(tmp_path):
    from test_hardening import write_dataset

    from fashion_search.data import catalog_splits

    folder = write_dataset(tmp_path / "shop", {"row": [1, 2]})
    with pytest.raises(UserError, match="a column named 'row'"):
        catalog_splits(str(folder))
