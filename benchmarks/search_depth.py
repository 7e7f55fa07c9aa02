"""What one search breadth for every page costs: the app's FAISS store over a run's catalog, one query at a time,
searched at HNSW efSearch 64 (the breadth before pages) and at SEARCH_DEPTH (every page of one query consistent),
interleaved in one run, with the overlap of their top 5.

Usage: python benchmarks/search_depth.py --run runs/full/clip-text [--queries 500]
"""
import argparse
import time
from pathlib import Path

import faiss
import numpy as np

from fashion_search.runs import load_split
from fashion_search.stores import SEARCH_DEPTH
from fashion_search.stores.faiss_versions import read_version


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/full/clip-text")
    parser.add_argument("--queries", type=int, default=500)
    args = parser.parse_args(argv)
    queries, _ = load_split(args.run, "test")
    state = read_version(Path(args.run) / "index", queries.shape[1], fall_back=True)  # the app's saved index
    index = state.index
    times = {64: [], SEARCH_DEPTH: []}
    same = []
    for query in np.ascontiguousarray(queries[:args.queries], dtype=np.float32):
        found = {}
        for ef in times:
            params = faiss.SearchParametersHNSW(efSearch=ef)
            started = time.perf_counter()
            _, positions = index.search(query[None], 5, params=params)
            times[ef].append(time.perf_counter() - started)
            found[ef] = positions[0]
        same.append(len(set(found[64]) & set(found[SEARCH_DEPTH])) / 5)
    for ef, values in times.items():
        print(f"efSearch {ef}: p50 {np.median(values) * 1000:.3f} ms, mean {np.mean(values) * 1000:.3f} ms "
              f"over {len(values)} queries ({index.ntotal:,} items)")
    print(f"top-5 overlap between the two: {np.mean(same):.4f}")


if __name__ == "__main__":
    main()
