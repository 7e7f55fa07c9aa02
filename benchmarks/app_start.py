"""App start-up: seconds from launching `app.py` to its first answer on the JSON route, twice (the first start builds
the catalog's index, or embeds the catalog, and saves it; the second reuses it), and its resident memory once
serving. Each start is a fresh process on 127.0.0.1, stopped once measured.

Usage: python benchmarks/app_start.py --clear runs/clip/index -- --run runs/clip [other app.py options]
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_once(app_args, port, timeout):
    """(seconds to the first answer, RSS MB then)."""
    command = [sys.executable, "app.py", *app_args, "--port", str(port)]
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would stall the app
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    try:
        while time.perf_counter() - started < timeout:
            if process.poll() is not None:
                log.seek(0)
                raise SystemExit(f"app.py exited with {process.returncode}:\n{log.read()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/search_text", params={"q": "shirt"}, timeout=5).status_code:
                    return time.perf_counter() - started, rss_mb(process.pid)
            except httpx.HTTPError:
                time.sleep(0.2)
        raise SystemExit(f"no answer within {timeout} s")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=7863)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--clear", help="a folder removed before the first start (the run's index/), so that it "
                        "builds for real")
    parser.add_argument("app_args", nargs=argparse.REMAINDER, help="after --: the options for app.py")
    args = parser.parse_args(argv)
    app_args = [a for a in args.app_args if a != "--"]
    if args.clear:
        shutil.rmtree(args.clear, ignore_errors=True)
    print("| start | seconds to first answer | RSS MB |\n|---|---:|---:|")
    for label in ("first (builds and saves)", "second (reuses)"):
        seconds, rss = start_once(app_args, args.port, args.timeout)
        print(f"| {label} | {seconds:.1f} | {rss:.0f} |", flush=True)


if __name__ == "__main__":
    main()
