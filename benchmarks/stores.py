"""The vector stores side by side on the same synthetic catalog (clustered unit vectors, like CLIP embeddings): the
FAISS store (HNSW in the process), Milvus Lite (brute force, embedded) and a Milvus standalone server started here on
loopback (HNSW, M 32, efConstruction 64, searched at ef 64) at Bounded and Strong consistency (recall over the
queries each row ran: all of them, or the first --lite-queries and --strong-queries). Each through the
project's own store classes, so the figures include what the app pays. Build time, single-query p50 and recall@5
against exact search, all in one run.

Usage: python benchmarks/stores.py [--items 100000] [--dim 512] [--queries 200] [--lite-queries 20]
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from search import clustered  # benchmarks/search.py, beside this script
from fashion_search.stores import open_store


def measure(store, queries, truth, k=5):
    times, found = [], []
    for query in queries:
        started = time.perf_counter()
        hits = store.search(query, k)
        times.append(time.perf_counter() - started)
        found.append([int(h.key) for h in hits])
    recall = float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))
    return statistics.median(times) * 1e3, recall


def build(spec, folder, vectors):
    keys = [str(i) for i in range(len(vectors))]
    records = [{"id": i} for i in range(len(vectors))]
    store = open_store(spec, folder, vectors.shape[1], "")
    started = time.perf_counter()
    store.build("benchmark", keys, vectors, records)
    return store, time.perf_counter() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--lite-queries", type=int, default=20, help="Milvus Lite is brute force: fewer queries")
    parser.add_argument("--strong-queries", type=int, default=50, help="a Strong search waits for a time tick")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    data = clustered(args.items + args.queries, args.dim, max(50, args.items // 200), rng)  # as benchmarks/search.py
    vectors, queries = data[:args.items], data[args.items:]
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :5]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store, seconds = build("faiss", Path(tmp) / "faiss", vectors)
        rows.append(("FAISS store (HNSW32, ef 64), in the process", seconds, *measure(store, queries, truth)))
        store, seconds = build(f"milvus:{tmp}/lite.db", None, vectors)
        n = args.lite_queries
        rows.append(("Milvus Lite (brute force), embedded", seconds, *measure(store, queries[:n], truth[:n])))
        store.close()
        from milvus import default_server

        default_server.set_base_dir(f"{tmp}/server")
        default_server.start()
        try:
            uri = f"milvus://127.0.0.1:{default_server.listen_port}/benchmark"
            store, seconds = build(uri, None, vectors)
            rows.append(("Milvus server (HNSW32, ef 64), Bounded", seconds, *measure(store, queries, truth)))
            store.close()
            strong = open_store(uri + "?consistency=Strong", None, args.dim, "benchmark")
            m = args.strong_queries
            rows.append(("Milvus server (HNSW32, ef 64), Strong", float("nan"),
                         *measure(strong, queries[:m], truth[:m])))
            strong.close()
        finally:
            default_server.stop()
    print(f"{args.items:,} x {args.dim} vectors, top 5, one query at a time\n")
    print("| store | build s | query p50 ms | recall@5 |\n|---|---:|---:|---:|")
    for name, seconds, p50, recall in rows:
        print(f"| {name} | {'' if seconds != seconds else f'{seconds:.1f}'} | {p50:.2f} | {recall:.3f} |")


if __name__ == "__main__":
    main()
