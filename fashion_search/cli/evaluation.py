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
import html
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fashion_search import calibration
from fashion_search.data import image_cache, load_processed
from fashion_search.errors import UserError
from fashion_search.files import atomic_write, atomic_write_text
from fashion_search.metrics import CURVE_K, HEADLINE_KEYS, evaluate
from fashion_search.runs import evaluate_run, load_split, trained_data

def pixel_vectors(reference_run, data_dir, query_split, gallery_split, size=32, cache_dir="data/cache") -> dict:
    """The pixel baseline's vectors of exactly the rows the reference run embedded: images at size x size, flattened,
    centred on the gallery mean and L2-normalised: {split: (vectors, labels)}."""
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
    return {split: (vectors[split], labels[split]) for split in vectors}


def pixel_baseline(vectors: dict, query_split, gallery_split) -> dict:
    """Raw-pixel kNN (pixel_vectors) on the reference run's rows. Any learned model must beat it."""
    (queries, query_labels), (gallery, gallery_labels) = vectors[query_split], vectors[gallery_split]
    metrics = {"protocol": f"query/gallery ({query_split} -> {gallery_split})",
               **evaluate(queries, query_labels, gallery, gallery_labels)}
    metrics["leave_one_out"] = evaluate(queries, query_labels, queries, query_labels, exclude_self=True)
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


def curves_figure(rows: dict):
    """precision@k for k = 1..CURVE_K, one line per run (a matplotlib figure)."""
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
    return figure


def plot_curves(rows: dict, path):
    import matplotlib.pyplot as plt

    figure = curves_figure(rows)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)


def html_table(records: list[dict]) -> str:
    if not records:
        return ""
    def cells(values, tag):
        return "".join(f"<{tag}>{html.escape(f'{v:.4f}' if isinstance(v, float) else str(v))}</{tag}>"
                       for v in values)

    return ("<table><tr>" + cells(records[0], "th") + "</tr>"
            + "".join("<tr>" + cells(r.values(), "td") + "</tr>" for r in records) + "</table>")


def write_report(path, config: Comparison, rows: dict, pixels: dict | None):
    """--report: the comparison with photos (fashion_search.report), one self-contained HTML file."""
    from fashion_search import report

    splits = (config.query_split, config.gallery_split)
    rankings, fitted, text_runs = [], {}, {}
    for run in config.runs:
        name = Path(run).name
        (queries, query_meta), (gallery, gallery_meta) = load_split(run, splits[0]), load_split(run, splits[1])
        if (run_calibration := calibration.load(run)) is not None:
            fitted[name] = run_calibration
        rankings.append(report.rank(name, queries, query_meta, gallery, gallery_meta, fitted.get(name)))
        names = Path(run) / "embeddings" / f"text_{splits[0]}.npy"
        if names.exists():
            text_runs[name] = (np.load(names), query_meta, gallery, gallery_meta)
    best = max(rankings, key=lambda ranking: rows[ranking.name]["precision@5"])
    baseline = None
    if pixels is not None:  # the vectors of the first run's rows (pixel_vectors)
        baseline = report.rank("pixels (baseline)", pixels[splits[0]][0], rankings[0].query_meta,
                               pixels[splits[1]][0], rankings[0].gallery_meta)
    shown = rankings + ([baseline] if baseline else [])
    dataset, _ = load_processed(config.data or trained_data(config.runs[0]))
    photos = report.Photos(dataset)
    table = [{"run": name, **{key: m[key] for key in HEADLINE_KEYS}, "queries": m["num_queries"],
              **{f"LOO {key}": m.get("leave_one_out", {}).get(key, "") for key in ("precision@5", "accuracy@5")}}
             for name, m in rows.items()]
    sizes = html_table([{"run": name, **band} for name, m in rows.items() for band in m["by_class_size"]])
    sections = [("Comparison", html_table(table) + report.figure_png(curves_figure(rows))),
                ("precision@5 by class size (gallery items per class)", sizes),
                (f"Queries ({splits[0]} -> {splits[1]}): the same for every run",
                 report.query_grid(photos, shown, report.choose_queries(shown, best), splits)),
                ("Most-confused type pairs", report.confusion_section(photos, rankings, splits)),
                (f"precision@5 per class: {best.name}" + (" against the pixel baseline" if baseline else ""),
                 report.per_class_chart(best, baseline))]
    if fitted:
        sections.append(("Match confidence (fitted on val)", report.reliability_chart(rankings, fitted)))
    if text_runs:
        sections.append(("Product names as queries", report.text_section(photos, text_runs, splits)))
    atomic_write_text(path, report.page("Comparison of " + ", ".join(rows), sections, photos))


@dataclass(frozen=True)
class Comparison:
    """The flags, parsed once (their defaults and meaning: parse_config)."""
    runs: list[str]
    query_split: str
    gallery_split: str
    baseline: list[str]
    data: str | None
    cache_dir: str
    output: str
    plot: str
    report: str | None


def parse_config(argv=None) -> Comparison:
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
    parser.add_argument("--report", default=None, metavar="HTML", help="also write the comparison with photos: one "
                        "self-contained HTML file (query grid, confused types, per-class precision, confidence)")
    return Comparison(**vars(parser.parse_args(argv)))


def main(argv=None):
    config = parse_config(argv)
    try:
        rows = {}
        for run in config.runs:
            name = Path(run).name
            rows[name] = evaluate_run(run, config.query_split, config.gallery_split)
            rows[name]["splits"] = (config.query_split, config.gallery_split)
            metrics_path = Path(run) / "metrics.json"
            if metrics_path.exists():
                rows[name]["train_seconds"] = json.loads(metrics_path.read_text()).get("train_seconds", "")
        pixels = None
        if "pixels" in config.baseline:
            data_dir = config.data or trained_data(config.runs[0])
            pixels = pixel_vectors(config.runs[0], data_dir, config.query_split, config.gallery_split,
                                   cache_dir=config.cache_dir)
            rows["pixels (baseline)"] = pixel_baseline(pixels, config.query_split, config.gallery_split)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = comparison_table(rows) + detail_tables(rows, {Path(run).name: run for run in config.runs})
    print(table, end="")
    atomic_write_text(config.output, table)
    plot_curves(rows, config.plot)
    print(f"table -> {config.output}, plot -> {config.plot}")
    if config.report:
        started = time.perf_counter()
        write_report(config.report, config, rows, pixels)
        size = Path(config.report).stat().st_size
        print(f"report -> {config.report} ({size / 2**20:.1f} MB in {time.perf_counter() - started:.0f} s)")
    return 0


def command():  # fashion-evaluate, python evaluation.py
    sys.exit(main())


if __name__ == "__main__":
    command()
