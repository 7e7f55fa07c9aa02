"""Where gradio_client's time goes: p50 of 30 calls each to an app already serving (see BENCHMARKS.md, section 3):
an endpoint that runs no model (/search_item), text and image searches, creating one httpx.Client, and one upload.

Usage: python app.py ... --port 7861 &   then   python benchmarks/gradio_overhead.py http://127.0.0.1:7861/
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path

from app_latency import photos


def p50(label, fn, calls=30):
    fn(0)  # warm-up
    times = []
    for i in range(calls):
        started = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - started) * 1e3)
    print(f"{label}: p50 {statistics.median(times):.1f} ms, min {min(times):.1f}", flush=True)


def main(url):
    import httpx
    from gradio_client import Client, handle_file

    paths = photos(40, tempfile.mkdtemp())
    client = Client(url, verbose=False)
    item = client.predict("shirt", "Any", "Any", "Any", "Any", api_name="/search_text")[0]["id"]
    p50("search_item (no model)", lambda i: client.predict(item, "Any", "Any", "Any", "Any", api_name="/search_item"))
    p50("search_text", lambda i: client.predict("blue shirt", "Any", "Any", "Any", "Any", api_name="/search_text"))
    p50("search_image", lambda i: client.predict(handle_file(paths[i % 40]), "Any", "Any", "Any", "Any",
                                                 api_name="/search_image"))
    p50("httpx.Client() creation", lambda i: httpx.Client().close())
    p50("httpx.post upload only", lambda i: httpx.post(url + "gradio_api/upload",
                                                       files={"files": Path(paths[i % 40]).read_bytes()}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:7861/")
