"""Every metric against an independent computation: plain numpy/Python brute force, and pytorch-metric-learning's
AccuracyCalculator where the definitions match (precision@1, MAP@R)."""
import numpy as np
import pytest

from fashion_search import calibration
from fashion_search import metrics as ev


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(queries, q_labels, gallery, g_labels, k, exclude_self=False):
    """Slow and obvious: full similarity matrix, stable sort (ties -> lower index), Python loops."""
    sims = queries.astype(np.float64) @ gallery.T.astype(np.float64)
    out = {"p": [], "r": [], "a": [], "p1": [], "ap": [], "per_class": {}}
    for qi in range(len(queries)):
        candidates = [g for g in range(len(gallery)) if not (exclude_self and g == qi)]
        ranked = sorted(candidates, key=lambda g: (-sims[qi, g], g))
        relevant = [g_labels[g] == q_labels[qi] for g in ranked]
        hits_k = sum(relevant[:k])
        total = sum(relevant)
        out["p"].append(hits_k / k)
        out["a"].append(float(hits_k > 0))
        out["p1"].append(float(relevant[0]) if relevant else 0.0)
        out["per_class"].setdefault(q_labels[qi], []).append(hits_k / k)
        if total:
            out["r"].append(hits_k / total)
            ap = sum(sum(relevant[:i + 1]) / (i + 1) for i in range(total) if relevant[i]) / total
            out["ap"].append(ap)
    return {"precision@5": np.mean(out["p"]), "recall@5": np.mean(out["r"]), "accuracy@5": np.mean(out["a"]),
            "precision@1": np.mean(out["p1"]), "map@r": np.mean(out["ap"]),
            "macro_precision@5": np.mean([np.mean(v) for v in out["per_class"].values()])}


def check(queries, q_labels, gallery, g_labels, exclude_self=False):
    got = ev.evaluate(queries, q_labels, gallery, g_labels, exclude_self=exclude_self, k=5)
    want = brute_force(queries, np.asarray(q_labels), gallery, np.asarray(g_labels), 5, exclude_self)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    return got


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_query_gallery_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    gallery, g_labels = unit(rng.normal(size=(120, 8))), rng.integers(0, 6, 120)
    queries, q_labels = unit(rng.normal(size=(40, 8))), rng.integers(0, 7, 40)  # class 6: absent from gallery
    check(queries, q_labels, gallery, g_labels)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_leave_one_out_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    x, labels = unit(rng.normal(size=(90, 6))), rng.integers(0, 5, 90)
    check(x, labels, x, labels, exclude_self=True)


def test_ties_are_broken_by_gallery_index_across_the_cut():
    # Only 3 distinct directions among 60 rows: nearly every top-5 list is a tie crossing the cut-off.
    rng = np.random.default_rng(3)
    directions = unit(rng.normal(size=(3, 4)))
    pick = rng.integers(0, 3, 60)
    gallery, labels = directions[pick], rng.integers(0, 4, 60)
    _, indices = ev.search(gallery[:10], gallery, 7)
    expected = np.argsort(-(gallery[:10] @ gallery.T), axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(indices, expected)
    check(gallery[:10], labels[:10], gallery, labels)
    check(gallery, labels, gallery, labels, exclude_self=True)


def test_hand_made_case():
    # Gallery on a circle; the query points at angle 0. Labels chosen so every metric has a known value.
    angles = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 2.0, 3.0])
    gallery = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    g_labels = np.array([0, 1, 0, 1, 1, 1, 0, 2])
    query, q_label = np.array([[1.0, 0.0]], dtype=np.float32), np.array([0])
    m = ev.evaluate(query, q_label, gallery, g_labels, k=5)
    assert m["precision@5"] == pytest.approx(2 / 5)
    assert m["recall@5"] == pytest.approx(2 / 3)  # 3 relevant items in the gallery, 2 retrieved
    assert m["accuracy@5"] == 1.0 and m["precision@1"] == 1.0
    assert m["map@r"] == pytest.approx((1 / 1 + 2 / 3) / 3)  # R = 3: hits at ranks 1 and 3
    assert m["macro_precision@5"] == pytest.approx(2 / 5)


def test_query_whose_class_is_absent_from_the_gallery():
    gallery, g_labels = unit([[1, 0], [0, 1], [1, 1]]), np.array([0, 0, 1])
    queries, q_labels = unit([[1, 0.1], [0.1, 1]]), np.array([0, 5])
    m = check(queries, q_labels, gallery, g_labels)
    assert m["accuracy@5"] == 0.5  # the class-5 query can never be right ...
    assert m["recall@5"] == 1.0  # ... and is left out of recall (0/0) and MAP@R
    assert m["macro_precision@5"] == pytest.approx((2 / 5 + 0) / 2)


def test_k_larger_than_the_gallery_pads_and_counts_missing_as_wrong():
    gallery, g_labels = unit([[1, 0], [0.9, 0.1], [0, 1]]), np.array([0, 0, 1])
    scores, indices = ev.search(unit([[1, 0]]), gallery, 5)
    assert indices[0, 3:].tolist() == [-1, -1] and np.isneginf(scores[0, 3:]).all()
    m = ev.evaluate(unit([[1, 0]]), [0], gallery, g_labels, k=5)
    assert m["precision@5"] == pytest.approx(2 / 5) and m["recall@5"] == 1.0
    loo = ev.evaluate(gallery, g_labels, gallery, g_labels, exclude_self=True, k=5)
    assert loo["num_gallery"] == 2 and loo["precision@5"] == pytest.approx((1 / 5 + 1 / 5 + 0) / 3)


def test_matches_pytorch_metric_learning():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    rng = np.random.default_rng(7)
    centres = unit(rng.normal(size=(5, 16)))
    g_labels, q_labels = rng.integers(0, 5, 300), rng.integers(0, 5, 80)
    gallery = unit(centres[g_labels] + 0.6 * rng.normal(size=(300, 16)))
    queries = unit(centres[q_labels] + 0.6 * rng.normal(size=(80, 16)))
    calculator = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count")
    import torch

    theirs = calculator.get_accuracy(torch.tensor(queries), torch.tensor(q_labels), torch.tensor(gallery),
                                     torch.tensor(g_labels), ref_includes_query=False)
    ours = ev.evaluate(queries, q_labels, gallery, g_labels)
    assert ours["precision@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    theirs_loo = calculator.get_accuracy(torch.tensor(gallery), torch.tensor(g_labels), torch.tensor(gallery),
                                         torch.tensor(g_labels), ref_includes_query=True)
    ours_loo = ev.evaluate(gallery, g_labels, gallery, g_labels, exclude_self=True)
    assert ours_loo["map@r"] == pytest.approx(theirs_loo["mean_average_precision_at_r"], abs=1e-6)


def test_exact_match_ranks_and_text_to_image_against_brute_force():
    rng = np.random.default_rng(3)
    photos = unit(rng.normal(size=(40, 8)))
    texts = unit(photos + rng.normal(scale=0.8, size=photos.shape))  # noisy views of their own photo
    texts[5] = photos[7]  # a tie-free case where product 5's name lands exactly on product 7's photo
    ranks = ev.exact_match_ranks(texts, photos)
    sims = texts.astype(np.float64) @ photos.T.astype(np.float64)
    expected = [sorted(range(40), key=lambda j: (-sims[i, j], j)).index(i) for i in range(40)]
    assert ranks.tolist() == expected and ranks[5] > 0
    labels = np.arange(40) % 4
    catalog, catalog_labels = np.concatenate([photos, photos[:20]]), np.concatenate([labels, labels[:20]])
    result = ev.text_to_image(texts, photos, labels, catalog, catalog_labels)
    assert result["recall@1"] == pytest.approx(np.mean(np.array(expected) == 0))
    assert result["recall@10"] == pytest.approx(np.mean(np.array(expected) < 10))
    assert result["mrr"] == pytest.approx(np.mean(1 / (np.array(expected) + 1)))
    top5 = [sorted(range(60), key=lambda j: (-(texts[i] @ catalog[j]), j))[:5] for i in range(40)]
    assert result["catalog_precision@5"] == pytest.approx(
        np.mean([np.mean(catalog_labels[t] == labels[i]) for i, t in enumerate(top5)]))
    assert result["chance"]["recall@1"] == pytest.approx(1 / 40)
    assert result["chance"]["catalog_precision@5"] == pytest.approx(15 / 60)  # each label: 15 of the 60 items


def test_calibration_is_monotone_and_reliable_on_its_own_data():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 1, 5000)
    matches = rng.uniform(0, 1, 5000) < scores ** 2  # the true P(match | score) is score squared
    fitted = calibration.fit(scores, matches)
    grid = np.linspace(-0.5, 1.5, 101)
    predicted = calibration.confidence(fitted, grid)
    assert np.all(np.diff(predicted) >= 0) and predicted.min() >= 0 and predicted.max() <= 1
    assert calibration.confidence(fitted, [0.5])[0] == pytest.approx(0.25, abs=0.05)
    assert calibration.confidence(fitted, [0.9])[0] == pytest.approx(0.81, abs=0.05)
    table = calibration.reliability(fitted, scores, matches)
    assert sum(row["pairs"] for row in table) == 5000
    assert all(abs(row["predicted"] - row["observed"]) < 0.05 for row in table if row["pairs"] > 100)
