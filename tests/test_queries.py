"""The queries shoppers and catalog teams ask for, on the tiny CLIP run: composed (weighted photo, URL, id and text
parts), a box of the photo, pages, batches, filters on any column (several values, exclusions), duplicates folded,
and the match confidence of each kind of query; through the service, the JSON routes and gradio_client."""
import base64
import io
import json
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image

from fashion_search import calibration
from fashion_search.serving import duplicates
from fashion_search.errors import QueryError
from fashion_search.serving.query import Part, Query, from_json, from_params, with_photo
from fashion_search.stores import Match


def photo(service, position=0):
    key = service.catalog.store.items()[0][position]
    return key, service.catalog.image_bytes(key)


def unit(vector):
    return vector / np.linalg.norm(vector)


def ids(results):
    return [str(r["id"]) for r in results]


def test_a_composed_query_is_the_weighted_sum_of_its_unit_embeddings(service):
    (a, _), (b, _) = photo(service, 0), photo(service, 5)
    va, vb = service.catalog.vector(a), service.catalog.vector(b)
    text = service.encoder.embed_text("red shirt")
    query = Query((Part("item", a), Part("item", b, 0.5), Part("text", "red shirt", -0.3)), k=10, collapse=False)
    expected = service.rank(unit(va + 0.5 * vb - 0.3 * text), k=10, kind="composed")
    assert service.run(query) == expected
    assert ids(service.run(Query((Part("item", a),), k=10, collapse=False))) == ids(service.rank(va, k=10))
    with pytest.raises(QueryError, match="cancel each other out"):
        service.run(Query((Part("item", a), Part("item", a, -1.0))))


def test_the_json_route_takes_composed_queries_and_says_what_is_wrong(service, served):
    key, data = photo(service, 3)
    body = {"parts": [{"photo": base64.b64encode(data).decode()}, {"text": "red", "weight": 0.5}],
            "filters": {"gender": "Women"}, "k": 7, "collapse": False}
    answer = httpx.post(served + "api/search", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert len(results) == 7 and {r["gender"] for r in results} == {"Women"}
    assert ids(results) == ids(service.run(from_json(body, 10 << 20)))
    for bad, message in ((b"not json", "the body is JSON"), (json.dumps({"parts": []}), "1 to 8 parts"),
                         (json.dumps({"parts": [{"text": "x", "photo": "y"}]}), "exactly one of"),
                         (json.dumps({"parts": [{"item": key}], "k": 101}), "k is a whole number from 1 to 100"),
                         (json.dumps({"parts": [{"item": key, "weight": "big"}]}), "weight is a number"),
                         (json.dumps({"parts": [{"photo": "%%%"}]}), "base64"),
                         (json.dumps({"parts": [{"item": key}], "filters": {"season": {"nope": 1}}}), '"not"'),
                         (json.dumps({"parts": [{"item": key}], "sort": "x"}), "unknown field 'sort'")):
        answer = httpx.post(served + "api/search", content=bad, timeout=60)
        assert answer.status_code == 400 and message in answer.json()["error"], (bad, answer.text)


def test_the_gradio_api_search_takes_the_same_json(service, served):
    from gradio_client import Client

    key, _ = photo(service, 2)
    query = {"parts": [{"item": key}, {"text": "blue", "weight": 0.4}], "k": 6, "collapse": False}
    results = Client(served, verbose=False).predict(json.dumps(query), api_name="/search")
    assert ids(results) == ids(service.run(from_json(query, 1 << 20)))


def test_pages_of_25_concatenated_equal_one_query_of_100_on_the_service(service):
    key, _ = photo(service, 1)
    vector = service.catalog.vector(key)
    everything = service.rank(vector, k=min(100, len(service.catalog)))
    pages = [service.rank(vector, k=25, offset=o) for o in range(0, 100, 25)]
    assert sum(pages, []) == everything
    assert len(set(ids(everything))) == len(everything)  # no item twice
    service.catalog.duplicate_cosine = 0.99  # folds some of the tiny model's close items, to page through groups
    try:
        folded = service.rank(vector, k=12, collapse=True)
        assert sum((service.rank(vector, k=4, offset=o, collapse=True) for o in (0, 4, 8)), []) == folded
        shown = ids(folded) + [str(i) for r in folded for i in r["duplicates"]]
        assert len(shown) == len(set(shown))  # an item is a result or folded into one, never both, never twice
    finally:
        service.catalog.duplicate_cosine = duplicates.DUPLICATE_COSINE


def test_the_get_routes_take_pages_filters_on_any_column_several_values_and_exclusions(service, served):
    key, _ = photo(service, 0)
    get = lambda params: httpx.get(served + "api/search_item", params={"id": key, "collapse": "false", **params},  # noqa
                                   timeout=60)
    first, second = get({"k": 3}).json()["results"], get({"k": 3, "offset": 3}).json()["results"]
    assert ids(first + second) == ids(get({"k": 6}).json()["results"])
    colours = get({"k": 20, "baseColour": "Red,Blue"}).json()["results"]
    assert colours and {r["baseColour"] for r in colours} <= {"Red", "Blue"}
    not_black = get({"k": 20, "baseColour!": "Black"}).json()["results"]
    assert not_black and "Black" not in {r["baseColour"] for r in not_black}
    season = get({"k": 5, "season": "Summer", "usage": "Casual"})
    assert season.status_code == 200 and len(season.json()["results"]) == 5  # columns beyond the page's own
    for params, message in (({"season": "Winter"}, "unknown season 'Winter'"), ({"colour": "Red"}, "unknown param"),
                            ({"k": "0"}, "k is a whole number"), ({"offset": "-1"}, "offset is a whole number")):
        answer = get(params)
        assert answer.status_code == 400 and message in answer.json()["error"], answer.text


def test_filters_reach_every_categorical_column_and_stay_data(service):
    assert {"subCategory", "season", "usage", "year"} <= set(service.filter_columns)
    assert service.page_columns == ["gender", "masterCategory", "articleType", "baseColour"]
    key, _ = photo(service, 0)
    vector = service.catalog.vector(key)
    found = service.rank(vector, {"baseColour": Match(("Black", "Red"), exclude=True)}, k=30)
    assert found and not {r["baseColour"] for r in found} & {"Black", "Red"}
    with pytest.raises(QueryError, match="unknown baseColour \"Red'\\] or 1==1\""):
        service.rank(vector, {"baseColour": "Red'] or 1==1"})


def canvas(left: bytes, right: bytes) -> bytes:
    a, b = Image.open(io.BytesIO(left)).convert("RGB"), Image.open(io.BytesIO(right)).convert("RGB")
    out = Image.new("RGB", (a.width + b.width, max(a.height, b.height)), (255, 255, 255))
    out.paste(a, (0, 0))
    out.paste(b, (a.width, 0))
    buffer = io.BytesIO()
    out.save(buffer, "PNG")
    return buffer.getvalue(), a.width, b.width


def png(data: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


def test_a_box_searches_by_that_part_of_the_photo(service, served):
    # as PNG, so that the photo alone decodes to the very pixels the box cuts out (JPEG draft mode would not)
    (_, left), (_, right) = photo(service, 0), photo(service, 20)
    left, right = png(left), png(right)
    data, width, right_width = canvas(left, right)
    boxed = service.run(Query((Part("photo", data),), box=(width, 0, width + right_width, 64), k=5, collapse=False))
    alone = service.run(Query((Part("photo", right),), k=5, collapse=False))
    assert ids(boxed) == ids(alone)  # the box is the right-hand photo, on white as the catalog's photos are
    answer = httpx.post(served + "api/search_image", params={"box": f"{width},0,{width + right_width},64",
                                                             "collapse": "false"}, content=data, timeout=60)
    assert answer.status_code == 200 and ids(answer.json()["results"]) == ids(alone)
    for box, message in (("1,2,3", "box is x0,y0,x1,y1"), ("5,5,2,9", "x0 < x1"), ("900,900,990,990", "outside")):
        answer = httpx.post(served + "api/search_image", params={"box": box}, content=data, timeout=60)
        assert answer.status_code == 400 and message in answer.json()["error"], answer.text


def test_a_batch_is_one_call_with_an_answer_per_photo(service, served):
    photos = [photo(service, i)[1] for i in range(4)]
    files = [("photos", (f"p{i}.jpg", data, "image/jpeg")) for i, data in enumerate(photos)]
    files.insert(2, ("photos", ("bad.jpg", b"not an image", "image/jpeg")))
    answer = httpx.post(served + "api/search_batch", params={"k": 3}, files=files, timeout=120)
    assert answer.status_code == 200, answer.text
    answers = answer.json()["answers"]
    assert len(answers) == 5 and "not a readable image" in answers[2]["error"]
    for data, one in zip(photos, answers[:2] + answers[3:]):
        assert ids(one["results"]) == ids(service.rank(service.encoder.embed_image(data), k=3))
    too_many = [("photos", (f"p{i}.jpg", photos[0], "image/jpeg")) for i in range(65)]
    answer = httpx.post(served + "api/search_batch", files=too_many, timeout=120)
    assert answer.status_code == 400 and "at most 64 photos" in answer.json()["error"]


def test_folding_is_stable_under_longer_prefixes():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 8))
    vectors = np.concatenate([base, base[[1, 3]] + 1e-3, base[[1]] - 1e-3])  # two near-copies of 1, one of 3
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    groups = duplicates.fold(vectors)
    assert groups[1] == [1, 6, 8] and groups[3] == [3, 7] and len(groups) == 6
    for end in range(1, len(vectors)):
        assert duplicates.fold(vectors[:end]) == [[i for i in g if i < end] for g in groups if g[0] < end]
    assert duplicates.catalog_groups(vectors) == [[1, 6, 8], [3, 7]]


def test_duplicate_photos_fold_into_one_result_and_are_listed(clip_run, cache_dir, tmp_path, capsys):
    from fashion_search.cli import app
    from fashion_search.cli import catalog_admin as catalog

    run = tmp_path / "run"
    shutil.copytree(clip_run, run, ignore=shutil.ignore_patterns("index"))
    service, _ = app.load_service(app.parse_config(["--run", str(run), "--cache-dir", str(cache_dir)]))
    key, data = photo(service, 4)
    folder = tmp_path / "copies"
    folder.mkdir()
    (folder / "copy-1.jpg").write_bytes(data)
    (folder / "copy-2.jpg").write_bytes(data)
    catalog.main(["add", str(folder), "--run", str(run), "--cache-dir", str(cache_dir)])
    # The tiny model's embeddings of different products lie closer than a trained model's: only true copies here
    service.catalog.duplicate_cosine = 0.9999
    folded = service.run(Query((Part("item", key),), k=5))
    assert str(folded[0]["id"]) in {key, "copy-1", "copy-2"}
    assert sorted(map(str, [folded[0]["id"], *folded[0]["duplicates"]])) == sorted([key, "copy-1", "copy-2"])
    assert not {"copy-1", "copy-2", key} & set(ids(folded[1:]))
    flat = service.run(Query((Part("item", key),), k=5, collapse=False))
    assert {key, "copy-1", "copy-2"} <= set(ids(flat))
    # one search path: the photo dropped on the page (and the Gradio API's /search_image), the page's button and the
    # JSON route all fold alike
    upload = tmp_path / "query.jpg"
    upload.write_bytes(data)
    dropped = service.search_image_file(str(upload), "Any", "Any", "Any", "Any")
    button = service.search_photo(str(upload), "", 0.5, "Any", "Any", "Any", "Any")
    json_route = service.run(with_photo(from_params({}, "photo", service.filter_columns, b""), data))
    assert dropped == button == json_route and sorted(map(str, [dropped[0]["id"], *dropped[0]["duplicates"]])) == \
        sorted([key, "copy-1", "copy-2"])
    catalog.main(["duplicates", "--run", str(run), "--cache-dir", str(cache_dir), "--threshold", "0.9999"])
    out = capsys.readouterr().out
    assert any({key, "copy-1", "copy-2"} <= set(line.split()) for line in out.splitlines()), out


def test_each_kind_of_query_is_calibrated_on_its_own_or_not_at_all(service, monkeypatch):
    photo_map = {"scores": [0.0, 1.0], "probabilities": [0.0, 1.0]}
    text_map = {"scores": [0.0, 1.0], "probabilities": [0.9, 0.9]}
    monkeypatch.setattr(service, "calibration", {**photo_map, "kinds": {"text": text_map}})
    assert calibration.for_kind(service.calibration, "composed") is None
    key, _ = photo(service, 0)
    vector = service.catalog.vector(key)
    assert all(r["confidence"] == 0.9 for r in service.rank(vector, kind="text"))
    assert service.rank(vector, kind="photo")[0]["confidence"] == pytest.approx(service.rank(vector)[0]["score"],
                                                                                 abs=1e-3)
    composed = service.rank(vector, kind="composed")
    assert "confidence" not in composed[0] and service.close_match(composed) is None


def test_the_composed_protocol_runs_on_a_run_through_its_command(clip_run, tmp_path, capsys):
    from fashion_search import composed
    from fashion_search.cli import composed as command
    from fashion_search.errors import UserError
    from fashion_search.serving.encoder import Encoder

    with pytest.raises(UserError, match="not a clip.py run"):
        command.main([str(tmp_path)])
    run = tmp_path / "run"
    shutil.copytree(clip_run, run, ignore=shutil.ignore_patterns("index"))
    report = command.main([str(run), "--combiner-epochs", "2", "--min-targets", "1", "--device", "cpu"])  # tiny data
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{\n"):]) == json.loads(json.dumps(report))  # it prints the report last
    encoder = Encoder(str(run / "hf_model"), "cpu", int8=False)
    assert report["weight (chosen on val)"] in composed.WEIGHTS
    for split in ("val", "test"):
        forms = report[split]
        assert set(forms) == {"queries", "photo alone", "colour word alone", '"C2 T" text', "composed",
                              "composed (combiner)", "composed (hybrid: and the colour word in the catalog's text)"}
        assert all(0 <= forms[name]["success@5"] <= forms[name]["type T share"] <= 1 for name in forms
                   if name != "queries")
    fitted = json.loads((run / "calibration.json").read_text())
    assert set(fitted["kinds"]) == {"composed", "composed hybrid", "text"}
    assert report["hybrid lexical weight (chosen on val)"] in composed.HYBRID_WEIGHTS
    assert "composed (combiner)" in report["test"]

    from fashion_search import combiner
    from fashion_search.serving.service import SearchService

    model = combiner.load(run)
    with_combiner = SearchService(encoder, trained_service_catalog(run, encoder), "x", combiner=model)
    key = with_combiner.catalog.store.items()[0][0]
    image, text = with_combiner.catalog.vector(key), encoder.embed_text("red")
    expected = with_combiner.rank(combiner.combine(model, image, text), k=5, kind="composed")
    composed = Query((Part("item", key), Part("text", "red", 0.5)), k=5, collapse=False, mode="vector")
    assert with_combiner.run(composed) == expected  # the vector ranking of a photo and words is the combiner's


def trained_service_catalog(run, encoder):
    from fashion_search.serving.catalog import catalog_from_run

    return catalog_from_run(run, encoder, None, str(run / "cache"))


def test_success_at_5_counts_type_and_colour_against_an_independent_count():
    import pandas as pd

    from fashion_search.composed import success

    gallery = pd.DataFrame({"articleType": ["Shirts", "Shirts", "Tshirts", "Shirts"],
                            "baseColour": ["Red", "Blue", "Red", "Red"]})
    indices = np.array([[0, 1, 2, 3, 0], [2, 2, 2, 2, 2]])
    queries = [(0, "Shirts", "Red"), (1, "Tshirts", "Red")]
    hit, same_type = success(indices, gallery, queries)
    assert hit == pytest.approx((3 + 5) / 10) and same_type == pytest.approx((4 + 5) / 10)


def test_every_page_search_gives_its_next_page_for_more_results(service, tmp_path):
    """The page's "More results" calls the search it remembers again with an offset: each one takes it."""
    key, data = photo(service, 6)
    path = tmp_path / "query.jpg"
    path.write_bytes(data)
    filters = ["Any"] * len(service.page_columns)
    for name, first in (("search_image_file", [str(path)]), ("search_photo", [str(path), "", 0.5]),
                        ("search_text", ["red shirt"]), ("search_item", [key])):
        search = getattr(service, name)
        ten = search(*first, *filters) + search(*first, *filters, offset=5)
        assert len(ten) == 10 and len(set(ids(ten))) == 10, name
