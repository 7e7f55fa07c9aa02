"""Match confidence (calibration.json in every run, confidence per result, "no close match") and the text search
figures of clip runs."""
import json


def test_runs_are_calibrated_and_clip_runs_measure_text_search(trained_runs):
    for name, run in trained_runs.items():
        fitted = json.loads((run / "calibration.json").read_text())
        assert len(fitted["scores"]) == len(fitted["probabilities"]) >= 1, name
        assert fitted["probabilities"] == sorted(fitted["probabilities"])  # monotone in the score
        metrics = json.loads((run / "metrics.json").read_text())
        assert sum(row["pairs"] for row in metrics["calibration_test"]) == 5 * metrics["num_queries"]
    clip_metrics = json.loads((trained_runs["clip"] / "metrics.json").read_text())
    text = clip_metrics["text_to_image"]
    assert text["queries"] == clip_metrics["num_queries"] and text["chance"]["recall@1"] == 1 / text["queries"]
    assert 0 <= text["recall@1"] <= text["recall@10"] <= 1 and 0 < text["mrr"] <= 1
    assert "text_to_image" not in json.loads((trained_runs["resnet"] / "metrics.json").read_text())


def test_no_close_match_is_said_on_the_page_and_marked_in_the_api(service, served, monkeypatch):
    import httpx

    data = service.catalog.image_bytes(service.catalog.store.items()[0][0])
    results = service.search_image_bytes(data)
    assert all(0 <= r["confidence"] <= 1 for r in results)
    assert [r["confidence"] for r in results] == sorted((r["confidence"] for r in results), reverse=True)
    assert "Nothing in the catalog is a close match" not in service.describe([dict(r, close_match=True)
                                                                              for r in results])
    monkeypatch.setattr(service, "min_confidence", 1.01)  # no result can reach it
    results = service.search_image_bytes(data)
    assert service.close_match(results) is False and not any(r["close_match"] for r in results)
    assert "Nothing in the catalog is a close match" in service.describe(results) and len(results) == 5
    answer = httpx.post(served + "api/search_image", content=data, timeout=30).json()
    assert answer["close_match"] is False and len(answer["results"]) == 5  # marked, results still given
