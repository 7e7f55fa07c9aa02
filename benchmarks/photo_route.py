"""Photo queries through the app's own search path (SearchService.run, which every photo route calls), with the run's
attribute model (attributes.safetensors: the type-and-colour re-ranking) and without it, alternating query by query:
test photos (their stored bytes, decoded through the gate as uploads are) against the catalog's train items: a copy of
the run serves a catalog from which the val and test items were removed (the store's own delete, as catalog.py
remove does), so that the query's own item is not there to vote on its type, as an unseen product's is not. Reported: type and type-and-colour precision@5, and p50 / p95 ms.

Usage: python benchmarks/photo_route.py --run runs/clip-text [--queries 300]
"""
import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None):
    from fashion_search.cli import app
    from fashion_search.runs import load_split
    from fashion_search.serving.query import Part, Query

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/clip-text")
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args(argv)
    copy = Path(tempfile.mkdtemp(prefix="photo-route-")) / "run"
    shutil.copytree(args.run, copy, ignore=shutil.ignore_patterns("index", "*.pt"))
    service, _ = app.load_service(app.parse_config(["--run", str(copy), "--no-compile"]))
    model = service.attributes
    if model is None:
        raise SystemExit(f"{args.run} has no attributes.safetensors: run python -m fashion_search.cli.photo_attributes")
    _, meta = load_split(args.run, "test")
    rows = np.random.default_rng(0).choice(len(meta), min(args.queries, len(meta)), replace=False)
    photos = [service.catalog.image_bytes(str(meta["id"].iloc[int(row)])) for row in rows]
    held_out = [str(i) for split in ("val", "test") for i in load_split(args.run, split)[1]["id"]]
    removed = service.catalog.store.delete(held_out)
    figures = {"cosine": [], "re-ranked": []}
    for row, data in zip(rows, photos):
        own = meta.iloc[int(row)]
        for name, attributes in (("cosine", None), ("re-ranked", model)):
            service.attributes = attributes
            started = time.perf_counter()
            top = service.run(Query((Part("photo", data),), collapse=False))
            seconds = time.perf_counter() - started
            same_type = [r["articleType"] == own["articleType"] for r in top]
            same_colour = [t and r["baseColour"] == own["baseColour"] for t, r in zip(same_type, top)]
            figures[name].append((sum(same_type) / 5, sum(same_colour) / 5, seconds))
    service.attributes = model
    report = {"queries": len(rows), "catalog items": len(service.catalog), "held-out items removed": removed}
    for name, rows_ in figures.items():
        values = np.asarray(rows_)
        report[name] = {"type precision@5": round(float(values[:, 0].mean()), 4),
                        "type-and-colour precision@5": round(float(values[:, 1].mean()), 4),
                        "p50 ms": round(float(np.median(values[:, 2])) * 1e3, 1),
                        "p95 ms": round(float(np.percentile(values[:, 2], 95)) * 1e3, 1)}
    print(json.dumps(report, indent=1))
    shutil.rmtree(copy.parent)


if __name__ == "__main__":
    main()
