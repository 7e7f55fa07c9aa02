"""What decoding in worker processes costs against decoding in the server's own process, in one run: decode alone
(photos/s of single decodes on 1 and N threads, and of a bulk decode in batches), the JSON photo route (p50 and
requests/s at 1 and 8 clients), and a catalog build (photos/s), each measured with the pool and with the same decode
run in this process (photos.worker.decode under the same limiter, as before the pool existed), alternating, twice.
Bounded: a fixed number of photos and requests, on 127.0.0.1.

Usage: python benchmarks/decode_pool.py --run runs/clip-load --dataset data/full
"""
import argparse
import contextlib
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from app_latency import measure

from fashion_search.photos import pool, worker


@contextlib.contextmanager
def in_process():
    """Every decode runs here, in this process, as it did before the pool (the limiter still admits it)."""
    def decode(header, size, box, square, wait=pool.DECODE_WAIT):
        with pool.POOL.limiter.hold(header.memory(0 if box else size), wait):
            return worker.decode(header, size, box, square)

    def decode_batch(headers, size, wait=None):
        with pool.POOL.limiter.hold(sum(header.memory(size) for header in headers), wait):
            return worker.run_batch(headers, size)
    originals = pool.POOL.decode, pool.POOL.decode_batch
    pool.POOL.decode, pool.POOL.decode_batch = decode, decode_batch
    try:
        yield
    finally:
        pool.POOL.decode, pool.POOL.decode_batch = originals


def decode_rate(blobs, threads: int) -> float:
    """Photos/s of single decodes (as queries make them) from ``threads`` threads."""
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as executor:
        list(executor.map(lambda blob: pool.decode_square(blob, 224), blobs))
    return len(blobs) / (time.perf_counter() - started)


def bulk_rate(cells, threads: int) -> float:
    """Photos/s of a bulk decode (as builds and the image cache make it: batches of pool.BATCH a task)."""
    from fashion_search.data import decode_cells

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as executor:
        decode_cells(cells, 224, executor)
    return len(cells) / (time.perf_counter() - started)


def route(url, clients: int, requests: int, paths) -> tuple[float, float]:
    """(p50 ms, requests/s) of the JSON photo route."""
    latencies, _, elapsed = measure(url, clients, requests, paths, "json")
    return sorted(latencies)[len(latencies) // 2] * 1e3, len(latencies) / elapsed


def build_rate(splits, encoder) -> float:
    from fashion_search.serving.build import embed_in_chunks

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        vectors, _ = embed_in_chunks(splits, encoder, Path(folder))
        return len(vectors) / (time.perf_counter() - started)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/clip-load",
                        help="a clip.py run (its model and catalog serve the queries)")
    parser.add_argument("--dataset", default="data/full", help="a processed folder: its test photos are decoded, sent "
                        "and built from")
    parser.add_argument("--photos", type=int, default=2048, help="photos per decode and build measurement")
    parser.add_argument("--requests", type=int, default=400, help="requests per route measurement")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    import socket

    from datasets import Image as ImageFeature

    from fashion_search.cli import app
    from fashion_search.data import load_processed

    data, _ = load_processed(args.dataset)
    test = data["test"].select(range(min(args.photos, len(data["test"]))))
    cells = test.cast_column("image", ImageFeature(decode=False))["image"]
    blobs = [cell["bytes"] for cell in cells]
    service, _ = app.load_service(app.parse_config(["--run", args.run]))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = app.serve(service, port=port)
    url = f"http://127.0.0.1:{port}/"
    print(f"{len(blobs)} photos of {args.dataset} (test split), {args.requests} requests per route figure, "
          f"{pool.WORKERS} decode workers, run {args.run}")
    print(f"| round | decode | single decodes, 1 thread (photos/s) | {pool.WORKERS} threads | bulk decode, "
          f"{pool.WORKERS} threads | JSON route p50 ms, 1 client | requests/s, 1 client | p50 ms, 8 clients | "
          "requests/s, 8 clients | build (photos/s) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i, blob in enumerate(blobs[:64]):
            paths.append(str(Path(folder) / f"q{i}.jpg"))
            Path(paths[-1]).write_bytes(blob)
        for round_ in range(1, args.rounds + 1):
            for mode in ("in process", "worker pool"):
                with in_process() if mode == "in process" else contextlib.nullcontext():
                    one, many = decode_rate(blobs, 1), decode_rate(blobs, pool.WORKERS)
                    bulk = bulk_rate(cells, pool.WORKERS)
                    p50_1, rate_1 = route(url, 1, args.requests // 2, paths)
                    p50_8, rate_8 = route(url, 8, args.requests, paths)
                    build = build_rate({"test": test}, service.encoder)
                print(f"| {round_} | {mode} | {one:.0f} | {many:.0f} | {bulk:.0f} | {p50_1:.1f} | {rate_1:.1f} | "
                      f"{p50_8:.1f} | "
                      f"{rate_8:.1f} | {build:.0f} |", flush=True)
    server.close()


if __name__ == "__main__":
    main()
