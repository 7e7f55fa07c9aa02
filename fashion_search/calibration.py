"""Match confidence: how likely a search result is to share the query's article type, given its similarity score.
Fitted on the validation split's top-5 results (val queries against the train gallery, as the app shows five) by
isotonic regression (a monotone map: a higher score never means a lower confidence), stored in the run folder as
calibration.json, and checked on the test split (predicted against observed, in bins)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fashion_search.metrics import TOP_K, relevance, search

FILE = "calibration.json"


def result_pairs(query_embeddings, query_labels, gallery_embeddings, gallery_labels, k=TOP_K):
    """(scores, matches), float32 and bool [Q * k]: every top-k result's similarity and whether it shares the query's
    label. Queries with an unknown label (< 0) are left out."""
    query_labels = np.asarray(query_labels)
    known = query_labels >= 0
    scores, indices = search(np.asarray(query_embeddings)[known], gallery_embeddings, k)
    matches = relevance(query_labels[known], gallery_labels, indices)
    valid = indices >= 0
    return scores[valid], matches[valid]


def fit(scores, matches) -> dict:
    """The isotonic map score -> P(match) as its breakpoints (piecewise linear between them, flat beyond)."""
    from sklearn.isotonic import IsotonicRegression

    model = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    model.fit(np.asarray(scores, dtype=np.float64), np.asarray(matches, dtype=np.float64))
    return {"scores": [round(float(x), 6) for x in model.X_thresholds_],
            "probabilities": [round(float(y), 6) for y in model.y_thresholds_], "pairs": int(len(scores)),
            "fitted_on": f"top-{TOP_K} results of the val split against the train split"}


def confidence(calibration: dict, scores) -> np.ndarray:
    """P(the result shares the query's article type) for each score."""
    return np.interp(np.asarray(scores, dtype=np.float64), calibration["scores"], calibration["probabilities"])


def reliability(calibration: dict, scores, matches, bins: int = 10) -> list[dict]:
    """Predicted against observed match rate in equal-width bins of predicted confidence (empty bins left out)."""
    predicted, matches = confidence(calibration, scores), np.asarray(matches, dtype=np.float64)
    which = np.minimum((predicted * bins).astype(int), bins - 1)
    return [{"bin": f"{b / bins:.1f}-{(b + 1) / bins:.1f}", "pairs": int((which == b).sum()),
             "predicted": round(float(predicted[which == b].mean()), 4),
             "observed": round(float(matches[which == b].mean()), 4)}
            for b in range(bins) if (which == b).any()]


def for_kind(calibration: dict | None, kind: str) -> dict | None:
    """The calibration of one kind of query: photo (the file's own map), or text / composed (under "kinds", fitted
    on their own val queries: their similarities live on other scales). None where that kind was not fitted: such
    results then carry no confidence rather than a wrong one."""
    if calibration is None:
        return None
    if kind == "photo":
        return calibration
    fitted = calibration.get("kinds", {}).get(kind)
    return fitted if fitted and fitted.get("scores") else None


def save_kinds(run_dir, kinds: dict):
    """Add (or replace) these kinds' maps in the run's calibration.json, keeping the photo map and the other kinds;
    nothing where the run has no calibration."""
    from fashion_search.files import atomic_write_json

    fitted = load(run_dir)
    if fitted:
        atomic_write_json(Path(run_dir) / FILE, {**fitted, "kinds": {**fitted.get("kinds", {}), **kinds}})


def load(run_dir) -> dict | None:
    """The run's calibration, or None where it has none (runs made before it existed, a zero-shot model)."""
    path = Path(run_dir) / FILE
    try:
        calibration = json.loads(path.read_text())
        return calibration if calibration.get("scores") else None
    except (OSError, ValueError, AttributeError):
        return None
