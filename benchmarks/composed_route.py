"""Composed queries (this product, in another colour) through the app's own search path (SearchService.run, which
every route calls), in each mode: the test split's composed protocol queries (fashion_search.composed.colour_queries:
a test product and a colour word C2 with at least 5 train items of its type in C2), asked as {"item": id} + {"text":
C2} against the whole catalog the app serves. success@5: the share of the top 5 with type T in colour C2.

Usage: python benchmarks/composed_route.py --run runs/clip-text [--queries 500]
"""
import argparse
import json
import time

import numpy as np


def main(argv=None):
    from fashion_search.cli import app
    from fashion_search.composed import colour_queries, word
    from fashion_search.runs import load_split
    from fashion_search.serving.query import Part, Query

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/clip-text")
    parser.add_argument("--queries", type=int, default=500)
    args = parser.parse_args(argv)
    service, _ = app.load_service(app.parse_config(["--run", args.run, "--no-compile"]))
    _, train_meta = load_split(args.run, "train")
    _, test_meta = load_split(args.run, "test")
    queries = colour_queries(test_meta, train_meta, seed=0, limit=args.queries)
    report = {"queries": len(queries), "combiner": service.combiner is not None,
              "lexical weights": service.lexical_weights}
    for mode in ("vector", "hybrid"):
        hits, seconds = [], []
        for row, article, colour in queries:
            query = Query((Part("item", str(test_meta["id"].iloc[row])), Part("text", word(colour), 0.5)),
                          mode=mode)
            started = time.perf_counter()
            results = service.run(query)
            seconds.append(time.perf_counter() - started)
            hits.append(np.mean([r["articleType"] == article and r["baseColour"] == colour for r in results]
                                + [False] * (5 - len(results))))
        report[mode] = {"success@5": round(float(np.mean(hits)), 4),
                        "p50 ms (in the process)": round(float(np.median(seconds)) * 1e3, 1)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
