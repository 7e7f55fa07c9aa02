"""App end to end: p50 / p95 / p99 latency and throughput for 1 and N concurrent clients sending 224 px product
photos, through gradio_client to /search_image (upload, queue, event stream) and through the plain JSON route
POST /api/search_image (one request on a kept-alive connection). A bounded run (a fixed number of requests)
against an app already serving on 127.0.0.1; it stops by itself.

Usage: python app.py --model PATH --dataset PATH &   then, once the app has printed "compiled the image query path"
(it compiles in the background after the page is up; queries meanwhile are slow): python benchmarks/app_latency.py
"""
import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-product-images-small"


def photos(count, folder):
    """Query photos: product photos of the 8k subset where it is, else synthetic ones (embed_pipeline's)."""
    if SHARED.exists():
        import datasets
        from datasets import Image as ImageFeature

        ds = datasets.load_dataset(str(SHARED), split="train").cast_column("image", ImageFeature(decode=False))
        blobs = [cell["bytes"] for cell in ds.select(range(count))["image"]]
    else:
        from embed_pipeline import product_photos

        blobs = product_photos(count, seed=1)
    paths = []
    for i, blob in enumerate(blobs):
        path = Path(folder) / f"q{i}.jpg"
        path.write_bytes(blob)
        paths.append(str(path))
    return paths


def gradio_caller(url):
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    return lambda path: client.predict(handle_file(path), "Any", "Any", "Any", "Any", api_name="/search_image")


def json_caller(url):
    import httpx

    http = httpx.Client(base_url=url, timeout=60)

    def call(path):
        response = http.post("/api/search_image", content=Path(path).read_bytes())
        response.raise_for_status()
        return response.json()["results"]
    return call


def measure(url, clients, requests, paths, route):
    """(latencies in seconds, errors, seconds in all) of ``requests`` queries from ``clients`` clients at once."""
    latencies, errors, lock = [], [], threading.Lock()
    per_client = requests // clients

    def worker(offset):
        call = (gradio_caller if route == "gradio" else json_caller)(url)
        call(paths[offset])  # warm-up
        for i in range(per_client):
            started = time.perf_counter()
            try:
                result = call(paths[(offset + i) % len(paths)])
                assert 1 <= len(result) <= 5  # fewer where near-duplicates fold into one
                with lock:
                    latencies.append(time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 - counted, reported
                with lock:
                    errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(c * 7,)) for c in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors, time.perf_counter() - started


def run(url, clients, requests, paths, route):
    latencies, errors, elapsed = measure(url, clients, requests, paths, route)
    ms = sorted(x * 1e3 for x in latencies)
    pick = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    print(f"| {route} | {clients} | {len(ms)} | {statistics.median(ms):.1f} | {pick(0.95):.1f} | {pick(0.99):.1f} | "
          f"{len(ms) / elapsed:.1f} | {len(errors)} |", flush=True)


def wait_ready(url, seconds, need_page):
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            status = httpx.get(url.rstrip("/") + "/api/status", timeout=5).json()
            if status["state"] == "ready" and (status["page"] == "serving" or not need_page):
                return
            if status["state"] == "failed":
                raise SystemExit(f"the app failed to start: {status['phase']}")
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the app at {url} was not ready within {seconds:g} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860/")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=200, help="per setting; the run stops after these")
    parser.add_argument("--routes", nargs="+", choices=("gradio", "json"), default=["gradio", "json"])
    parser.add_argument("--wait", type=float, default=0, help="seconds to wait for the app to be ready (its GET "
                        "/api/status), for an app started just before")
    args = parser.parse_args(argv)
    if args.wait:
        wait_ready(args.url, args.wait, need_page="gradio" in args.routes)
    with tempfile.TemporaryDirectory() as folder:
        paths = photos(64, folder)
        print("| route | clients | requests | p50 ms | p95 ms | p99 ms | requests/s | errors |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for route in args.routes:
            for clients in args.clients:
                run(args.url, clients, args.requests, paths, route)


if __name__ == "__main__":
    main()
