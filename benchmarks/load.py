"""A bounded load run against the app on 127.0.0.1: N concurrent gradio_client clients send a fixed number of
requests mixing good uploads, text queries, filtered queries and bad inputs (a text file named .jpg, an empty
file, refused URLs). Counts server errors (anything but the app's own messages for bad input), checks that every
bad request got its message, and reports the app's resident memory after warm-up and at the end.

Usage: python app.py ... --port 7861 &   then   python benchmarks/load.py --url http://127.0.0.1:7861/ --pid PID
"""
import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app_latency import photos  # noqa: E402

BAD_MESSAGES = ("not a readable image", "refused", "upload a photo", "type a description")


def rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None):
    from gradio_client import Client, handle_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7861/")
    parser.add_argument("--pid", type=int, required=True, help="the app's process id (for its memory)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp()
    good = photos(32, folder)
    (Path(folder) / "text.jpg").write_text("not an image")
    (Path(folder) / "empty.jpg").write_bytes(b"")
    kinds = ["good"] * 4 + ["text", "filtered", "bad-file", "empty-file", "bad-url", "ftp-url"]
    counts = {"ok": 0, "bad answered": 0, "server errors": 0}
    failures, lock = [], threading.Lock()

    def one(client, kind, rng):
        filters = ("Any", "Any", "Any")
        if kind == "good":
            return client.predict(handle_file(rng.choice(good)), *filters, api_name="/search_image"), False
        if kind == "text":
            return client.predict("blue denim jeans", *filters, api_name="/search_text"), False
        if kind == "filtered":
            return client.predict(handle_file(rng.choice(good)), "Women", "Any", "Any", api_name="/search_image"), False
        if kind == "bad-file":
            return client.predict(handle_file(str(Path(folder) / "text.jpg")), *filters, api_name="/search_image"), True
        if kind == "empty-file":
            return client.predict(handle_file(str(Path(folder) / "empty.jpg")), *filters, api_name="/search_image"), True
        if kind == "bad-url":
            return client.predict("http://169.254.169.254/latest/meta-data", *filters, api_name="/search_url"), True
        return client.predict("ftp://example.com/a.jpg", *filters, api_name="/search_url"), True

    def worker(seed, count):
        rng = random.Random(seed)
        client = Client(args.url, verbose=False)
        for _ in range(count):
            kind = rng.choice(kinds)
            expect_error = kind not in ("good", "text", "filtered")
            try:
                result, _ = one(client, kind, rng)
                outcome = "ok" if (not expect_error and len(result) == 5) else "server errors"
                if outcome != "ok":
                    failures.append((kind, f"unexpected result {result!r:.100}"))
            except Exception as exc:  # noqa: BLE001 - classified below
                message = str(exc)
                outcome = "bad answered" if expect_error and any(m in message for m in BAD_MESSAGES) else "server errors"
                if outcome == "server errors":
                    failures.append((kind, message[:200]))
            with lock:
                counts[outcome] += 1

    warm = Client(args.url, verbose=False)
    for path in good[:8]:
        warm.predict(handle_file(path), "Any", "Any", "Any", api_name="/search_image")
    memory_after_warmup = rss_mb(args.pid)
    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(seed, args.requests // args.clients))
               for seed in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    memory_end = rss_mb(args.pid)
    print(f"{sum(counts.values())} requests from {args.clients} clients in {elapsed:.1f} s: {counts}")
    print(f"app resident memory: {memory_after_warmup:.0f} MB after warm-up, {memory_end:.0f} MB at the end "
          f"({(memory_end / memory_after_warmup - 1):+.1%})")
    for kind, message in failures[:10]:
        print(f"  server error on {kind}: {message}")
    return 1 if counts["server errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
