"""Words ranked with the catalog's own text on every route: hybrid (the default), vector and lexical; filters, pages
and folding as for any search; the text index follows the catalog's changes; the protocol's command."""
import json
import shutil

import httpx
import numpy as np
from gradio_client import Client

from fashion_search import lexical
from fashion_search.serving.query import Part, Query


def names(results):
    return [r["productDisplayName"] for r in results]


def test_lexical_results_hold_the_querys_words_and_vector_ones_are_the_embeddings_ranking(service):
    found = service.run(Query((Part("text", "Brand1 Red Watches"),), k=10, mode="lexical", collapse=False))
    assert found and all({"brand1", "red", "watch"} & set(lexical.words(name)) for name in names(found))
    assert lexical.words(found[0]["productDisplayName"])[:1] == ["brand1"] and found[0]["articleType"] == "Watches"
    vector = service.run(Query((Part("text", "Brand1 Red Watches"),), k=10, mode="vector", collapse=False))
    assert vector == service.rank(service.encoder.embed_text("Brand1 Red Watches"), k=10, kind="text")


def test_hybrid_is_the_default_and_fuses_both_rankings(service):
    query = Query((Part("text", "Brand2 Green Handbags"),), k=10, collapse=False)
    assert query.mode == "hybrid"
    hybrid = service.run(query)
    lexical_ids = [r["id"] for r in service.run(Query(query.parts, k=10, mode="lexical", collapse=False))]
    vector_ids = [r["id"] for r in service.run(Query(query.parts, k=10, mode="vector", collapse=False))]
    expected = [key for key, _ in lexical.fuse([[str(i) for i in vector_ids], [str(i) for i in lexical_ids]],
                                                [1.0, service.lexical_weights["text"]])]
    assert [str(r["id"]) for r in hybrid][:3] == expected[:3]


def test_hybrid_pages_filters_and_folding_behave_as_for_any_search(service):
    parts = (Part("text", "Red Tshirts"),)
    ten = service.run(Query(parts, k=10, collapse=False))
    pages = service.run(Query(parts, k=5, collapse=False)) + service.run(Query(parts, k=5, offset=5, collapse=False))
    assert [r["id"] for r in pages] == [r["id"] for r in ten] and len({r["id"] for r in ten}) == 10
    women = service.run(Query(parts, {"gender": "Women"}, k=10))
    assert women and all(r["gender"] == "Women" for r in women)
    folded = service.run(Query(parts, k=5))
    assert all("duplicates" in r for r in folded)


def test_the_routes_take_a_mode(service, served):
    answer = httpx.get(f"{served}api/search_text", params={"q": "Brand0 Black Caps", "mode": "lexical"}, timeout=30)
    assert answer.status_code == 200
    lexical_ids = [r["id"] for r in answer.json()["results"]]
    assert lexical_ids == [r["id"] for r in service.search_text("Brand0 Black Caps", "Any", "Any", "Any", "Any",
                                                               "lexical")]
    bad = httpx.get(f"{served}api/search_text", params={"q": "caps", "mode": "fuzzy"}, timeout=30)
    assert bad.status_code == 400 and "mode is one of hybrid, vector, lexical" in bad.json()["error"]
    body = {"parts": [{"text": "Brand0 Black Caps"}], "mode": "lexical", "collapse": False}
    posted = httpx.post(f"{served}api/search", json=body, timeout=30).json()["results"]
    assert [r["id"] for r in posted][:3] == lexical_ids[:3]
    client = Client(served, verbose=False)
    api = client.predict("Brand0 Black Caps", "Any", "Any", "Any", "Any", "lexical", api_name="/search_text")
    assert [r["id"] for r in api] == lexical_ids
    default = client.predict("Brand0 Black Caps", "Any", "Any", "Any", "Any", api_name="/search_text")
    assert [r["id"] for r in default] == [r["id"] for r in service.search_text("Brand0 Black Caps")]


def test_the_text_index_follows_the_catalogs_changes(live):
    run, service = live
    keys, vectors = service.catalog.store.items()
    record = {"id": "quokka-1", "productDisplayName": "Quokka Women Purple Handbags", "articleType": "Handbags",
              "baseColour": "Purple", "gender": "Women"}
    assert service.run(Query((Part("text", "quokka"),), mode="lexical")) == []
    service.catalog.store.upsert(["quokka-1"], vectors[:1], [record])
    found = service.run(Query((Part("text", "quokka"),), mode="lexical"))
    assert [r["id"] for r in found] == ["quokka-1"]
    service.catalog.store.delete(["quokka-1"])
    assert service.run(Query((Part("text", "quokka"),), mode="lexical")) == []


def test_the_hybrid_protocol_chooses_a_weight_and_fits_confidence(clip_run, tmp_path, capsys):
    from fashion_search.cli import hybrid as command
    from fashion_search.lexical import load_weights

    run = tmp_path / "run"
    shutil.copytree(clip_run, run, ignore=shutil.ignore_patterns("index"))
    report = command.main([str(run), "--queries", "20", "--device", "cpu"])
    assert report["lexical weight (chosen on val)"] in command.WEIGHTS
    assert load_weights(run)["text"] == report["lexical weight (chosen on val)"]
    for mode in ("vector", "lexical", "hybrid"):
        assert set(report["test"][mode]) == {*command.shoppers.TEMPLATES, "all"}
        assert 0 <= report["test"][mode]["all"]["precision@5"] <= report["test"][mode]["all"]["success@5"] <= 1
    kinds = json.loads((run / "calibration.json").read_text())["kinds"]
    assert {"text hybrid", "text lexical"} <= set(kinds)
    assert np.isfinite(report["names"]["hybrid"])


def test_a_photo_with_words_fuses_with_the_composed_weight(service):
    """A composed query ranks hybrid with the lexical weight chosen for composed queries, not the text one."""
    key = service.catalog.store.items()[0][0]
    parts = (Part("item", key), Part("text", "Red", 0.5))
    saved = dict(service.lexical_weights)
    try:
        service.lexical_weights.update(text=8.0, composed=0.25)
        fused = [str(r["id"]) for r in service.run(Query(parts, k=10, collapse=False))]
        vector = [str(r["id"]) for r in service.run(Query(parts, k=100, collapse=False, mode="vector"))]
        words = [str(r["id"]) for r in service.run(Query(parts, k=100, collapse=False, mode="lexical"))]
        expected = [key for key, _ in lexical.fuse([vector, words], [1.0, 0.25])][:10]
        assert fused == expected
    finally:
        service.lexical_weights.clear()
        service.lexical_weights.update(saved)
