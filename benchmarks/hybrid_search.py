"""The cost of words: GET /api/search_text in each mode (vector, hybrid, lexical) on an app already serving on
127.0.0.1, with 1 and N concurrent clients on kept-alive connections, in one run (p50 / p95 and requests/s, the
vector route the baseline); and the text index's build time and size over the run's catalog, in this process.

Usage: python app.py --run runs/clip-text --no-compile &   then
       python benchmarks/hybrid_search.py --run runs/clip-text [--url http://127.0.0.1:7860/] [--requests 300]
"""
import argparse
import statistics
import threading
import time

import httpx
import numpy as np


def shopper_phrases(run: str, count: int) -> list[str]:
    from fashion_search import shoppers
    from fashion_search.runs import load_split

    _, meta = load_split(run, "test")
    return [q["text"] for q in shoppers.make_queries(meta, count // len(shoppers.TEMPLATES) + 1, seed=5)][:count]


def route_costs(url: str, phrases: list[str], mode: str, clients: int, requests: int) -> dict:
    times, lock = [], threading.Lock()

    def client(share: list[str]):
        with httpx.Client(base_url=url, timeout=60) as http:
            for phrase in share:
                started = time.perf_counter()
                answer = http.get("api/search_text", params={"q": phrase, "mode": mode})
                answer.raise_for_status()
                with lock:
                    times.append(time.perf_counter() - started)

    work = [phrases[i % len(phrases)] for i in range(requests)]
    threads = [threading.Thread(target=client, args=(work[i::clients],)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    times.sort()
    return {"p50 ms": round(statistics.median(times) * 1e3, 1), "p95 ms": round(times[int(0.95 * len(times))] * 1e3, 1),
            "requests/s": round(len(times) / wall, 1)}


def index_costs(run: str) -> dict:
    """Build time and size of the text index over the run's whole catalog (its three splits' records)."""
    import pandas as pd

    from fashion_search.runs import load_split
    from fashion_search.serving.hybrid import Words

    meta = pd.concat([load_split(run, split)[1] for split in ("train", "val", "test")], ignore_index=True)
    records = meta.drop(columns=["row", "split", "label"]).to_dict("records")
    keys = [str(i) for i in meta["id"]]
    times = []
    for _ in range(3):
        words = Words(keys, records)
        times.append(words.seconds)
    scores = words.index.engine.scores
    size = sum(np.asarray(v).nbytes for v in scores.values() if hasattr(v, "nbytes") or isinstance(v, np.ndarray))
    return {"items": len(keys), "build seconds (median of 3)": round(statistics.median(times), 2),
            "BM25 matrix MB": round(size / 2**20, 1), "vocabulary": len(words.index.engine.vocab_dict)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/clip-text")
    parser.add_argument("--url", default="http://127.0.0.1:7860/")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args(argv)
    phrases = shopper_phrases(args.run, 200)
    for mode in ("vector", "hybrid", "lexical"):  # warm-up: the text index is built at its first use
        route_costs(args.url, phrases[:8], mode, 1, 8)
    print("| clients | mode | p50 ms | p95 ms | requests/s |\n|---:|---|---:|---:|---:|")
    for clients in args.clients:
        for mode in ("vector", "hybrid", "lexical"):
            cost = route_costs(args.url, phrases, mode, clients, args.requests)
            print(f"| {clients} | {mode} | {cost['p50 ms']} | {cost['p95 ms']} | {cost['requests/s']} |", flush=True)
    print(index_costs(args.run))


if __name__ == "__main__":
    main()
