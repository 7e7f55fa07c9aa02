"""Retrieval metrics and the comparison of runs.

The metrics are pure functions in fashion_search.metrics. Two protocols:
  - query/gallery (default): queries = test split, gallery = train split (unseen products against the catalog);
  - leave-one-out within one split: every row queries all the others (the query itself excluded), which is how
    the original report measured, kept for comparison with its figures.

Which recall is which (the original report's recall@k, and accuracy@k): fashion_search/metrics.py.
An item is relevant when its label equals the query's label (labels < 0 mean unknown: never relevant).

Usage: python evaluation.py runs/resnet runs/clip [--baseline pixels]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fashion_search import calibration
from fashion_search.data import image_cache, load_processed
from fashion_search.errors import UserError
from fashion_search.files import atomic_write, atomic_write_text
from fashion_search.metrics import CURVE_K, HEADLINE_KEYS, evaluate
from fashion_search.runs import evaluate_run, load_split

def pixel_baseline(reference_run, data_dir, query_split, gallery_split, size=32, cache_dir="data/cache") -> dict:
    """Raw-pixel kNN on exactly the rows the reference run embedded: images at size x size, flattened,
    centred on the gallery mean and L2-normalised. Any learned model must beat it."""
    dataset, _ = load_processed(data_dir)
    vectors, labels = {}, {}
    for split in (query_split, gallery_split):
        _, meta = load_split(reference_run, split)
        rows = meta["row"].to_numpy()
        images, _ = image_cache(dataset[split], size, cache_dir)
        vectors[split] = np.asarray(images[rows], dtype=np.float32).reshape(len(rows), -1)
        labels[split] = np.asarray(dataset[split].select_columns(["label"])["label"])[rows]
    centre = vectors[gallery_split].mean(0)
    for split in vectors:
        vectors[split] -= centre
        vectors[split] /= np.linalg.norm(vectors[split], axis=1, keepdims=True) + 1e-12
    metrics = {"protocol": f"query/gallery ({query_split} -> {gallery_split})",
               **evaluate(vectors[query_split], labels[query_split], vectors[gallery_split], labels[gallery_split])}
    metrics["leave_one_out"] = evaluate(vectors[query_split], labels[query_split], vectors[query_split],
                                        labels[query_split], exclude_self=True)
    return metrics


def comparison_table(rows: dict) -> str:
    """Markdown table: one row per run, the query/gallery metrics, then the report-comparable leave-one-out ones."""
    header = ["run", *HEADLINE_KEYS, "queries", "LOO precision@5", "LOO recall@5", "LOO accuracy@5", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in rows.items():
        loo = m.get("leave_one_out", {})
        cells = [name, *(f"{m[key]:.4f}" for key in HEADLINE_KEYS), str(m["num_queries"]),
                 *(f"{loo[key]:.4f}" if key in loo else "" for key in ("precision@5", "recall@5", "accuracy@5")),
                 str(m.get("train_seconds", ""))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(records: list[dict]) -> str:
    """A markdown table of records (the same keys each)."""
    if not records:
        return ""
    keys = list(records[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for record in records:
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in record.values()) + " |")
    return "\n".join(lines) + "\n"


def detail_tables(rows: dict, runs: dict) -> str:
    """Where macro precision is lost (by class size), text-to-image search where a run has it, and the reliability
    of each run's match confidence on the query split."""
    out = ["\n### precision@5 by class size (gallery items per class)\n"]
    for name, m in rows.items():
        out += [f"\n{name}:\n", markdown(m["by_class_size"])]
    text = {name: m["text_to_image"] for name, m in rows.items() if "text_to_image" in m}
    if text:
        out.append("\n### text -> image (product names as queries)\n\n")
        keys = ("recall@1", "recall@10", "mrr", "catalog_precision@5")
        records = [{"run": name, **{k: t[k] for k in keys}, "queries": t["queries"]} for name, t in text.items()]
        chance = next(iter(text.values()))["chance"]
        records.append({"run": "chance", **{k: chance[k] for k in keys}, "queries": next(iter(text.values()))["queries"]})
        out.append(markdown(records))
    for name, run in runs.items():
        fitted = calibration.load(run)
        if fitted is not None:
            query, gallery = rows[name]["splits"]
            (q, q_meta), (g, g_meta) = load_split(run, query), load_split(run, gallery)
            table = calibration.reliability(fitted, *calibration.result_pairs(q, q_meta["label"], g, g_meta["label"]))
            out += [f"\n### match confidence of {name} on {query} -> {gallery} (fitted on val)\n\n", markdown(table)]
    return "".join(out)


def plot_curves(rows: dict, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, m in rows.items():
        axis.plot(range(1, CURVE_K + 1), m["precision_curve"], marker="o", markersize=3, label=name)
    axis.set_xlabel("k")
    axis.set_ylabel("precision@k")
    axis.set_title(f"precision@k, {next(iter(rows.values()))['protocol']}")
    axis.set_xticks(range(1, CURVE_K + 1))
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (with embeddings/<split>.npy + .parquet)")
    parser.add_argument("--query-split", default="test", help="queries: unseen products")
    parser.add_argument("--gallery-split", default="train", help="the catalog searched")
    parser.add_argument("--baseline", choices=("pixels",), action="append", default=[],
                        help="add a raw-pixel kNN reference row on the same rows (needs the processed data)")
    parser.add_argument("--data", default=None, help="processed data for --baseline (default: the first run's --data)")
    parser.add_argument("--cache-dir", default="data/cache")
    parser.add_argument("--output", default="runs/comparison.md", help="where the markdown table is written")
    parser.add_argument("--plot", default="runs/precision_at_k.png", help="where the precision@k plot is written")
    args = parser.parse_args(argv)
    try:
        rows = {}
        for run in args.runs:
            name = Path(run).name
            rows[name] = evaluate_run(run, args.query_split, args.gallery_split)
            rows[name]["splits"] = (args.query_split, args.gallery_split)
            metrics_path = Path(run) / "metrics.json"
            if metrics_path.exists():
                rows[name]["train_seconds"] = json.loads(metrics_path.read_text()).get("train_seconds", "")
        if "pixels" in args.baseline:
            data_dir = args.data or json.loads((Path(args.runs[0]) / "args.json").read_text())["data"]
            rows["pixels (baseline)"] = pixel_baseline(args.runs[0], data_dir, args.query_split, args.gallery_split,
                                                       cache_dir=args.cache_dir)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = comparison_table(rows) + detail_tables(rows, {Path(run).name: run for run in args.runs})
    print(table, end="")
    atomic_write_text(args.output, table)
    plot_curves(rows, args.plot)
    print(f"table -> {args.output}, plot -> {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
