"""The queries beyond one photo, measured on a clip.py run and its catalog, all in one run:

- composed retrieval (photo + colour word) on val and test, with its baselines (fashion_search.composed), and the text
  and composed match-confidence calibrations fitted on val (written into the run's calibration.json);
- a box of the photo: test photos pasted two at a time side by side on one canvas, each queried with the box around
  it, without the box (the whole canvas), and alone: precision@5 for the boxed product's article type;
- batches: photos/s of one POST /api/search_batch of N photos against N single POST /api/search_image, from one
  client, against the app served in this process on 127.0.0.1;
- duplicates: exact-duplicate photos of the whole catalog by pixel hash (the ground truth), the threshold chosen on the
  train split (best F1 over pairs), and the duplicate finder's pair precision and recall on the whole catalog.

Usage: python benchmarks/queries.py --run runs/full/clip-text [--pairs 500] [--batch 64] [--parts composed box ...]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import time

import numpy as np
from PIL import Image

from fashion_search import composed
from fashion_search.runs import load_split
from fashion_search.photos import pool as photos
from fashion_search.serving import duplicates
from fashion_search.serving.query import Part, Query


def canvas(left: bytes, right: bytes) -> tuple[bytes, tuple, tuple]:
    """Two photos side by side on white: (PNG bytes, box of the left one, box of the right one)."""
    a, b = photos.open_rgb(left), photos.open_rgb(right)
    out = Image.new("RGB", (a.width + b.width, max(a.height, b.height)), (255, 255, 255))
    out.paste(a, (0, 0))
    out.paste(b, (a.width, 0))
    buffer = io.BytesIO()
    out.save(buffer, "PNG")
    return buffer.getvalue(), (0, 0, a.width, a.height), (a.width, 0, a.width + b.width, b.height)


def precision_of_type(results, article) -> float:
    return float(np.mean([r["articleType"] == article for r in results]))


def box_figures(service, test_meta, photo_of, pairs: int, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    rows = rng.permutation(len(test_meta))[:2 * pairs].reshape(-1, 2)
    scores = {"with the box": [], "without the box (whole canvas)": [], "the photo alone": []}
    for left, right in rows:
        data, left_box, right_box = canvas(photo_of(left), photo_of(right))
        for row, box in ((left, left_box), (right, right_box)):
            article = test_meta["articleType"].iloc[row]
            scores["with the box"].append(precision_of_type(service.run(Query((Part("photo", data),), box=box,
                                                                                    collapse=False)), article))
            scores["without the box (whole canvas)"].append(precision_of_type(
                service.run(Query((Part("photo", data),), collapse=False)), article))
            scores["the photo alone"].append(precision_of_type(
                service.run(Query((Part("photo", photo_of(row)),), collapse=False)), article))
    return {"queries": int(2 * len(rows)), **{name: round(float(np.mean(v)), 4) for name, v in scores.items()}}


def batch_figures(url, photos: list[bytes]) -> dict:
    import httpx

    with httpx.Client(base_url=url, timeout=300) as http:
        http.post("/api/search_image", content=photos[0])  # warm
        started = time.perf_counter()
        for data in photos:
            assert http.post("/api/search_image", content=data).status_code == 200
        single = time.perf_counter() - started
        started = time.perf_counter()
        answer = http.post("/api/search_batch", files=[("photos", (f"{i}.jpg", d, "image/jpeg"))
                                                       for i, d in enumerate(photos)])
        batch = time.perf_counter() - started
        assert answer.status_code == 200 and all("results" in a for a in answer.json()["answers"]), answer.text[:300]
    return {"photos": len(photos), "single requests photos/s": round(len(photos) / single, 1),
            "one batch photos/s": round(len(photos) / batch, 1), "ratio": round(single / batch, 2)}


def pair_set(groups) -> set:
    return {(a, b) for group in groups for i, a in enumerate(group) for b in group[i + 1:]}


def duplicate_figures(vectors, pixel_keys, train_rows: np.ndarray) -> dict:
    """Pair precision / recall of the embedding's near-duplicate groups against pixel-hash groups; the threshold is
    the one with the best F1 on the train rows."""
    def truth(rows):
        groups = {}
        for row in rows:
            groups.setdefault(pixel_keys[row], []).append(int(row))
        return pair_set(g for g in groups.values() if len(g) > 1)

    def scores(rows, threshold):
        found = {(int(rows[a]), int(rows[b])) for a, b in pair_set(duplicates.catalog_groups(vectors[rows],
                                                                                            threshold))}
        true = truth(rows)
        precision = len(found & true) / len(found) if found else 1.0
        recall = len(found & true) / len(true) if true else 1.0
        return precision, recall, len(found), len(true)
    by_threshold = {}
    for threshold in (0.99, 0.995, 0.998, 0.999, 0.9995, 0.9998, 0.9999, 0.99995):
        p, r, _, _ = scores(train_rows, threshold)
        by_threshold[threshold] = {"precision": round(p, 4), "recall": round(r, 4),
                                   "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0}
    chosen = max(by_threshold, key=lambda t: by_threshold[t]["f1"])
    p, r, found, true = scores(np.arange(len(vectors)), chosen)
    return {"train split, by threshold": by_threshold, "chosen threshold": chosen,
            "whole catalog": {"exact-duplicate pairs (pixel hash)": true, "pairs found": found,
                              "precision": round(p, 4), "recall": round(r, 4)}}


def main(argv=None):
    from fashion_search.cli import app

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/full/clip-text")
    parser.add_argument("--pairs", type=int, default=500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--port", type=int, default=7871)
    parser.add_argument("--parts", nargs="+", default=["composed", "box", "batch", "duplicates"],
                        choices=["composed", "box", "batch", "duplicates"])
    args = parser.parse_args(argv)
    service, _ = app.load_service(app.parse_config(["--run", args.run, "--no-compile"]))
    report = {}
    if "composed" in args.parts:
        report["composed"] = composed.run_protocol(args.run, service.encoder.embed_text)
        print(json.dumps(report["composed"], indent=1), flush=True)

    _, test_meta = load_split(args.run, "test")
    keys = [str(v) for v in test_meta["id"]]
    if "box" in args.parts:
        report["box"] = box_figures(service, test_meta, lambda row: service.catalog.image_bytes(keys[row]),
                                    args.pairs)
        print(json.dumps(report["box"], indent=1), flush=True)

    if "batch" in args.parts:
        server = app.serve(service, port=args.port)
        try:
            photos = [service.catalog.image_bytes(key) for key in keys[:args.batch]]
            report["batch"] = batch_figures(f"http://127.0.0.1:{args.port}", photos)
        finally:
            server.close()
        print(json.dumps(report["batch"], indent=1), flush=True)
    if "duplicates" not in args.parts:
        return report

    splits = [load_split(args.run, split) for split in ("train", "val", "test")]
    vectors = np.concatenate([v for v, _ in splits])
    all_keys = [str(v) for _, meta in splits for v in meta["id"]]
    pixel_keys = [hashlib.sha256(photos.open_rgb(service.catalog.image_bytes(key)).tobytes()).hexdigest()
                  for key in all_keys]
    report["duplicates"] = duplicate_figures(vectors, pixel_keys, np.arange(len(splits[0][1])))
    print(json.dumps(report["duplicates"], indent=1), flush=True)
    return report


if __name__ == "__main__":
    main()
