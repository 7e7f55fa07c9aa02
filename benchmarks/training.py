"""Training throughput per backbone from the runs' own logs: images/s and the share of step time spent waiting on
data (loading the uint8 batch from the cache, moving it, normalising and augmenting), epoch by epoch.

Usage: python benchmarks/training.py runs/from-scratch/*/
"""
import json
import statistics
import sys
from pathlib import Path


def main(argv=None):
    runs = [Path(p) for p in (argv if argv is not None else sys.argv[1:]) if (Path(p) / "log.jsonl").exists()]
    print("| run | image size | epochs | images/s (median epoch) | data wait (max epoch) |")
    print("|---|---:|---:|---:|---:|")
    for run in runs:
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        size = json.loads((run / "metrics.json").read_text())["image_size"]
        print(f"| {run.name} | {size} | {len(log)} | {statistics.median(r['images_per_second'] for r in log):.0f} | "
              f"{max(r['data_wait_share'] for r in log):.1%} |")


if __name__ == "__main__":
    main()
