"""Photo-to-photo search that sees colour, measured on a run: test photos against the train gallery, the embedding's
top 50 re-ranked by cosine + w x colour similarity (descriptors below), w chosen on val (the best type-and-colour
precision@5 whose type precision@5 stays within 0.01 of w = 0), then reported on test: type precision@5 and
type-and-colour precision@5 side by side.

Usage: python benchmarks/colour_rerank.py runs/clip-text

The descriptor (an experiment; the app does not use it): the photo's pixels that are not its white background,
binned by hue (12) and brightness (2) where they have colour, by brightness alone (5) where they are grey, counted,
square-rooted and made unit, so that the cosine of two descriptors is the Bhattacharyya coefficient of their colour
histograms.
"""
import argparse
import json
import time

import numpy as np

from fashion_search.data import image_cache, load_processed
from fashion_search.metrics import search
from fashion_search.runs import load_split, trained_data

HUES, BRIGHT, GREYS = 12, 2, 5
DIM = HUES * BRIGHT + GREYS
RERANK_DEPTH = 50
BACKGROUND = 235  # a pixel whose every channel is at least this is the photo's white background (or its padding)


def descriptors(images: np.ndarray, batch: int = 1024) -> np.ndarray:
    """uint8 [N, 3, S, S] -> float32 [N, DIM], unit length (a photo of nothing but background: zeros)."""
    out = np.zeros((len(images), DIM), dtype=np.float32)
    for start in range(0, len(images), batch):
        out[start:start + batch] = _histograms(np.asarray(images[start:start + batch], dtype=np.float32) / 255)
    return out


def _histograms(pixels: np.ndarray) -> np.ndarray:  # [B, 3, S, S] in 0..1 -> [B, DIM]
    r, g, b = pixels[:, 0], pixels[:, 1], pixels[:, 2]
    high, low = pixels.max(1), pixels.min(1)
    chroma = high - low
    saturation = np.where(high > 0, chroma / np.maximum(high, 1e-6), 0)
    foreground = low < BACKGROUND / 255
    safe = np.maximum(chroma, 1e-6)
    hue = np.where(high == r, ((g - b) / safe) % 6, np.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    coloured = foreground & (saturation > 0.25) & (high > 0.15)
    bins = np.where(coloured, np.minimum((hue * HUES).astype(int), HUES - 1) * BRIGHT
                    + np.minimum((high * BRIGHT).astype(int), BRIGHT - 1),
                    HUES * BRIGHT + np.minimum((high * GREYS).astype(int), GREYS - 1))
    counts = np.zeros((len(pixels), DIM), dtype=np.float32)
    for i in range(len(pixels)):
        counts[i] = np.bincount(bins[i][foreground[i]], minlength=DIM)[:DIM]
    counts = np.sqrt(counts / np.maximum(counts.sum(1, keepdims=True), 1))
    return counts / np.maximum(np.linalg.norm(counts, axis=1, keepdims=True), 1e-12)


def rerank(scores: np.ndarray, indices: np.ndarray, query_colours: np.ndarray, gallery_colours: np.ndarray,
           weight: float) -> tuple[np.ndarray, np.ndarray]:
    """The embedding's ranking (scores, indices [Q, depth]) re-ranked by score + weight x colour cosine."""
    colour = np.einsum("qd,qkd->qk", query_colours, gallery_colours[np.maximum(indices, 0)])
    combined = np.where(indices >= 0, scores + weight * colour, -np.inf)
    order = np.argsort(-combined, axis=1, kind="stable")
    return np.take_along_axis(combined, order, 1), np.take_along_axis(indices, order, 1)


WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0)


def precisions(indices, query_meta, gallery_meta) -> dict:
    top = indices[:, :5]
    same_type = gallery_meta["articleType"].to_numpy()[top] == query_meta["articleType"].to_numpy()[:, None]
    same_colour = gallery_meta["baseColour"].to_numpy()[top] == query_meta["baseColour"].to_numpy()[:, None]
    return {"type precision@5": round(float(same_type.mean()), 4),
            "type-and-colour precision@5": round(float((same_type & same_colour).mean()), 4)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--cache-dir", default="data/cache")
    args = parser.parse_args(argv)
    dataset, _ = load_processed(trained_data(args.run))
    size = json.loads(open(f"{args.run}/metrics.json").read())["image_size"]
    split = {}
    started = time.perf_counter()
    for name in ("train", "val", "test"):
        vectors, meta = load_split(args.run, name)
        images, _ = image_cache(dataset[name], size, args.cache_dir)
        split[name] = (vectors, meta, descriptors(images[meta["row"].to_numpy()]))
    seconds = time.perf_counter() - started
    gallery, gallery_meta, gallery_colours = split["train"]
    report = {"descriptor seconds (all splits)": round(seconds, 1)}
    for name in ("val", "test"):
        queries, meta, colours = split[name]
        scores, indices = search(queries, gallery, RERANK_DEPTH)
        report[name] = {w: precisions(rerank(scores, indices, colours, gallery_colours, w)[1], meta,
                                      gallery_meta) for w in WEIGHTS}
    base = report["val"][0.0]["type precision@5"]
    allowed = [w for w in WEIGHTS if report["val"][w]["type precision@5"] >= base - 0.01]
    chosen = max(allowed, key=lambda w: report["val"][w]["type-and-colour precision@5"])
    print(json.dumps({"chosen weight (on val)": chosen, "test, w = 0": report["test"][0.0],
                      "test, chosen": report["test"][chosen], **report}, indent=1, default=str))


if __name__ == "__main__":
    main()
