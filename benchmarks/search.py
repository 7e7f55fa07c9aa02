"""FAISS index types at several catalog sizes: build time, ms per query (one at a time and batched), memory, and
recall@5 against exact search. Synthetic clustered unit vectors of dimension 512 (like CLIP embeddings: many
near-duplicates within a product type). The ratio column compares each index's single-query time with exact
(Flat) search measured in the same run.

Usage: python benchmarks/search.py [--sizes 10000 44000 100000 1000000] [--queries 500]
"""
import argparse
import time

import faiss
import numpy as np



def clustered(n, dim, clusters, rng, noise=0.35):
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def candidates(n, dim):
    nlist = int(4 * np.sqrt(n))
    out = {"Flat": (lambda: faiss.IndexFlatIP(dim), {})}
    out["HNSW32"] = (lambda: _hnsw(dim), {"efSearch": [32, 64, 128]})
    out[f"IVF{nlist},Flat"] = (lambda: faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT),
                               {"nprobe": [8, 16, 32]})
    out[f"IVF{nlist},PQ64"] = (lambda: faiss.index_factory(dim, f"IVF{nlist},PQ64x8", faiss.METRIC_INNER_PRODUCT),
                               {"nprobe": [16, 32]})
    return out


def _hnsw(dim):
    index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 64
    return index


def time_single(index, queries, k=5):
    started = time.perf_counter()
    for q in queries:
        index.search(q[None], k)
    return (time.perf_counter() - started) / len(queries) * 1e3


def recall_at_5(found, truth):
    return float(np.mean([len(set(f) & set(t)) / 5 for f, t in zip(found, truth)]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 44_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--skip", nargs="*", default=[], help="index names to skip (e.g. HNSW32 at 1M is slow to build)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, dim {args.dim}")
    print("| vectors | index | param | build s | ms/query (1) | ms/query (batch) | speed-up vs Flat | MB | recall@5 |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        data = clustered(n + args.queries, args.dim, max(50, n // 200), rng)
        base, queries = data[:n], data[n:]
        flat_ms = None
        truth = None
        for name, (make, params) in candidates(n, args.dim).items():
            if name in args.skip:
                continue
            index = make()
            started = time.perf_counter()
            if not index.is_trained:
                index.train(base[rng.choice(n, min(n, 100_000), replace=False)])
            index.add(base)
            build = time.perf_counter() - started
            megabytes = faiss.serialize_index(index).nbytes / 2**20
            settings = [(key, value) for key, values in params.items() for value in values] or [("", "")]
            for key, value in settings:
                if key == "efSearch":
                    index.hnsw.efSearch = value
                elif key == "nprobe":
                    index.nprobe = value
                single = time_single(index, queries[:200])
                started = time.perf_counter()
                _, found = index.search(queries, 5)
                batched = (time.perf_counter() - started) / len(queries) * 1e3
                if name == "Flat":
                    truth, flat_ms = found, single
                print(f"| {n:,} | {name} | {key}={value} | {build:.1f} | {single:.3f} | {batched:.3f} | "
                      f"{flat_ms / single:.1f}x | {megabytes:.0f} | {recall_at_5(found, truth):.3f} |", flush=True)


if __name__ == "__main__":
    main()
