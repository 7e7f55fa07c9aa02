"""App start-up: seconds from launching `app.py` to its first answer on the JSON route and to its page, twice (the
first start builds the catalog's index, or embeds the catalog, and saves it; the second reuses it), with where the
time went (each phase's start, from the app's GET /api/status timeline) and its resident memory once serving. With
--kill-at F the first start is killed with SIGKILL once F of the catalog is embedded, and a resumed start follows.
Each start is a fresh process on 127.0.0.1, stopped once measured.

Usage: python benchmarks/app_start.py [--clear runs/clip/index] [--kill-at 0.8] -- --run runs/clip [app.py options]
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
PHASES = ("listening", "loading the model", "loading the catalog", "embedding the catalog", "building the index",
          "ready", "page")


def rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_once(app_args, port, timeout, kill_at=None):
    """{phase: seconds from launch}, with "first answer" (a 200 on the JSON route) and "RSS MB"; with ``kill_at``,
    the process is killed with SIGKILL once that share of the catalog is embedded, and the phases seen until then
    are returned."""
    command = [sys.executable, "app.py", *app_args, "--port", str(port)]
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would stall the app
    launched = time.time()
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    figures, status = {}, {}
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)  # one connection: polls cost little
    try:
        while time.time() - launched < timeout:
            if process.poll() is not None:
                log.seek(0)
                raise SystemExit(f"app.py exited with {process.returncode}:\n{log.read()[-2000:]}")
            try:
                status = client.get("/api/status").json()
                if kill_at is not None and status["total"] and status["done"] >= kill_at * status["total"]:
                    process.kill()
                    figures["killed at"] = status["done"] / status["total"]
                    break
                if status["state"] == "ready" and "first answer" not in figures:
                    answer = client.get("/api/search_text", params={"q": "shirt"})
                    if answer.status_code == 200:
                        figures["first answer"] = time.time() - launched
                if status["page"] != "starting" and "first answer" in figures:
                    figures["RSS MB"] = rss_mb(process.pid)
                    break
            except httpx.HTTPError:
                pass
            # while it embeds, a poll a second (the poller must not slow what it measures), else every 50 ms
            time.sleep(1.0 if status.get("phase") == "embedding the catalog" else 0.05)
        else:
            raise SystemExit(f"not ready within {timeout} s")
    finally:
        client.close()
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
    for phase, at in status.get("timeline", []):
        figures.setdefault(phase, at - launched)
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=7863)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--clear", help="a folder removed before the first start (the run's index/), so that it "
                        "builds for real")
    parser.add_argument("--kill-at", type=float, help="kill the first start with SIGKILL once this share of the "
                        "catalog is embedded, then time the resumed start")
    parser.add_argument("app_args", nargs=argparse.REMAINDER, help="after --: the options for app.py")
    args = parser.parse_args(argv)
    app_args = [a for a in args.app_args if a != "--"]
    if args.clear:
        shutil.rmtree(args.clear, ignore_errors=True)
    starts = [("first (builds and saves)" if args.clear else "first (reuses what is on disk)", None)]
    if args.kill_at is not None:
        starts = [("first, killed", args.kill_at), ("resumed", None)]
    starts.append(("second (reuses)", None))
    print("Seconds from launch at which each phase began, and to the first answer:\n")
    print(f"| start | {' | '.join(PHASES)} | first answer | RSS MB |\n|---|{'---:|' * (len(PHASES) + 2)}")
    for label, kill_at in starts:
        figures = start_once(app_args, args.port, args.timeout, kill_at)
        if "killed at" in figures:  # the share embedded when the kill came (a whole number of chunks)
            label = f"first, killed with SIGKILL at {figures['killed at']:.0%} embedded"
        cells = [f"{figures[p]:.1f}" if p in figures else "–" for p in (*PHASES, "first answer")]
        rss = f"{figures['RSS MB']:.0f}" if "RSS MB" in figures else "–"
        print(f"| {label} | {' | '.join(cells)} | {rss} |", flush=True)


if __name__ == "__main__":
    main()
