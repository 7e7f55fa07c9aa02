"""Words ranked inside Milvus (Milvus Lite's BM25 function) against the app's own BM25 index (bm25s), over one run's
train gallery, in one run: the shopper queries of test products (fashion_search.shoppers: relevant = every named
attribute) through each, their precision@5 / NDCG@10 / success@5, how far the two top 10s agree, and each side's
p50 per query, with the time to fill each.

Usage: python benchmarks/milvus_words.py --run runs/clip-text [--queries 100]
"""
import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None):
    from fashion_search import shoppers
    from fashion_search.runs import load_split
    from fashion_search.stores import open_store

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/clip-text")
    parser.add_argument("--queries", type=int, default=100, help="per template")
    args = parser.parse_args(argv)
    gallery, meta = load_split(args.run, "train")
    _, test_meta = load_split(args.run, "test")
    queries = shoppers.make_queries(test_meta, args.queries, seed=1)
    keys = [str(i) for i in range(len(meta))]
    records = meta.drop(columns=[c for c in ("row", "split", "label") if c in meta]).to_dict("records")
    started = time.perf_counter()
    local = shoppers.gallery_index(meta)
    local_seconds = time.perf_counter() - started
    folder = Path(tempfile.mkdtemp(prefix="milvus-words-"))
    store = open_store(f"milvus:{folder / 'catalog.db'}?index=FLAT&consistency=Strong", folder, gallery.shape[1],
                       "bench#1")
    started = time.perf_counter()
    store.build("bench#1", keys, gallery, records)
    milvus_seconds = time.perf_counter() - started
    rankings = {"bm25s (the app's index)": [], "Milvus Lite BM25": []}
    seconds = {name: [] for name in rankings}
    for query in queries:
        for name, ask in (("bm25s (the app's index)", lambda text: [k for k, _ in local.search(text, 10)]),
                          ("Milvus Lite BM25", lambda text: store.search_words(text, 10))):
            began = time.perf_counter()
            found = ask(query["text"])
            seconds[name].append(time.perf_counter() - began)
            rankings[name].append(np.asarray([int(key) for key in found], dtype=np.int64))
    relevance = [shoppers.relevant(q["attributes"], meta) for q in queries]
    overlap = [len(set(a) & set(b)) / max(1, min(10, len(a), len(b)))
               for a, b in zip(*rankings.values())]
    report = {"queries": len(queries), "gallery": len(meta), "store ranks words": store.ranks_words,
              "fill seconds": {"bm25s (the app's index)": round(local_seconds, 1),
                               "Milvus Lite (vectors and words)": round(milvus_seconds, 1)},
              "top-10 agreement": round(float(np.mean(overlap)), 3)}
    for name, lists in rankings.items():
        report[name] = {**shoppers.figures(lists, relevance),
                        "p50 ms": round(float(np.median(seconds[name])) * 1e3, 2)}
    store.close()
    shutil.rmtree(folder)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
