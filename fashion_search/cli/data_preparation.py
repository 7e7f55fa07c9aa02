"""Prepare the product photos for training: drop undecodable images and classes too small to learn, map the
label column to ids, split train/val/test stratified by label, and save with ``save_to_disk``.

Usage: python data_preparation.py [--dataset ashraq/fashion-product-images-small | PATH] [--output-dir data/processed]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fashion_search.data import HUB_DATASET, decode_cells, encoded_images, load_raw_dataset, report_left_out
from fashion_search.errors import UserError, cli
from fashion_search.files import atomic_write_json
from fashion_search.runtime import decode_threads


@dataclass(frozen=True)
class PrepareConfig:
    """The flags, parsed once and checked (their defaults and meaning: parse_config)."""
    dataset: str
    output_dir: str
    label_column: str
    min_class_size: int
    val_fraction: float
    test_fraction: float
    seed: int


def parse_config(argv=None) -> PrepareConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=HUB_DATASET,
                        help="hub name, a local folder in the hub layout, or a save_to_disk folder")
    parser.add_argument("--output-dir", default="data/processed", help="where the splits and label_map.json go")
    parser.add_argument("--label-column", default="articleType", help="the column whose values are the classes")
    parser.add_argument("--min-class-size", type=int, default=2,
                        help="drop classes with fewer rows: a class seen once can never be retrieved correctly")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0, help="the split depends on nothing else")
    config = PrepareConfig(**vars(parser.parse_args(argv)))
    if config.min_class_size < 1:
        parser.error("--min-class-size must be at least 1")
    val, test = config.val_fraction, config.test_fraction
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        parser.error("--val-fraction and --test-fraction must be in [0, 1) and sum to less than 1")
    return config


def decodable_rows(dataset) -> np.ndarray:
    """Indices of rows whose image decodes (truncated, corrupt, missing or refused images are dropped, not fatal,
    and counted with their reasons)."""
    raw = encoded_images(dataset).select_columns(["image"])
    keep, left_out = [], Counter()
    with ThreadPoolExecutor(decode_threads(), thread_name_prefix="decode") as pool:
        for start in tqdm(range(0, len(raw), 1000), desc="check images", unit="batch", leave=False, disable=None):
            # the training decoder; at 32 px JPEG draft mode makes it cheap
            pixels = decode_cells(raw[start:start + 1000]["image"], 32, pool, left_out)
            keep += [start + offset for offset, image in enumerate(pixels) if image is not None]
    report_left_out(left_out, "the image check")
    return np.asarray(keep, dtype=np.int64)


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int):
    """Per class: shuffle (seeded), then the first round(n * test) rows to test, the next round(n * val) to val,
    the rest to train. A class that cannot give every split a row and keep one in train goes to train whole.
    Returns (split name per row, list of classes kept whole in train)."""
    rng = np.random.default_rng(seed)
    assignment = np.full(len(labels), "train", dtype=object)
    train_only = []
    for label in sorted(set(labels.tolist())):
        rows = rng.permutation(np.flatnonzero(labels == label))
        n_test, n_val = int(round(len(rows) * test_fraction)), int(round(len(rows) * val_fraction))
        if (test_fraction > 0 and n_test == 0) or (val_fraction > 0 and n_val == 0) or len(rows) - n_test - n_val < 1:
            train_only.append(label)
            continue
        assignment[rows[:n_test]] = "test"
        assignment[rows[n_test:n_test + n_val]] = "val"
    return assignment, train_only


def save_atomically(dataset_dict, output_dir: Path):
    """save_to_disk into a temp folder beside the target, then swap it in: a crash leaves the old data whole."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}."))
    try:
        dataset_dict.save_to_disk(str(tmp / "data"))
        return tmp / "data", tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_source(name: str, label_column: str):
    """The source rows as one dataset, checked for the columns preparation needs."""
    import datasets

    dataset = load_raw_dataset(name)
    if isinstance(dataset, datasets.DatasetDict):  # a save_to_disk folder of splits: prepare all rows again
        dataset = datasets.concatenate_datasets([dataset[s] for s in dataset])
    for column in (label_column, "image", "id"):
        if column not in dataset.column_names:
            raise UserError(f"{name} has no column {column!r} (columns: {', '.join(dataset.column_names)})")
    return dataset.remove_columns([c for c in ("label",) if c in dataset.column_names])


def publish(saved: Path, tmp, output_dir: Path):
    """Put the finished folder in place of the old one (if any), never leaving a half-written one there."""
    if output_dir.exists():
        old = output_dir.with_name(f".{output_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        output_dir.rename(old)
        saved.rename(output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        saved.rename(output_dir)
    shutil.rmtree(tmp, ignore_errors=True)


def print_summary(rows, train_only, output_dir: Path):
    width = max(len(name) for name, _ in rows)
    print(f"| {'':<{width}} | count |\n|{'-' * (width + 2)}|------:|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value:>5} |")
    if train_only:
        print(f"train-only classes: {', '.join(train_only)}")
    print(f"saved to {output_dir} (label map: {output_dir / 'label_map.json'})")


def main(argv=None):
    import datasets

    config = parse_config(argv)
    dataset = load_source(config.dataset, config.label_column)
    total = len(dataset)

    keep = decodable_rows(dataset)
    undecodable = total - len(keep)
    dataset = dataset.select(keep)
    labels = np.asarray([("" if v is None else str(v)) for v in dataset[config.label_column]], dtype=object)
    has_label = labels != ""
    counts = Counter(labels[has_label].tolist())
    small = {label for label, count in counts.items() if count < config.min_class_size}
    keep = np.flatnonzero(has_label & ~np.isin(labels, list(small)))
    dataset, labels = dataset.select(keep), labels[keep]
    if len(dataset) == 0:
        raise UserError(f"no rows left in {config.dataset} after dropping undecodable images and small classes")

    names = sorted(set(labels.tolist()))
    label_ids = {name: i for i, name in enumerate(names)}
    dataset = dataset.add_column("label", [label_ids[v] for v in labels.tolist()])
    assignment, train_only = stratified_split(labels, config.val_fraction, config.test_fraction, config.seed)
    # Rows are shuffled within each split (seeded), so that --limit N in the model scripts takes a random sample.
    rng = np.random.default_rng(config.seed + 1)
    splits = datasets.DatasetDict({
        split: dataset.select(rng.permutation(np.flatnonzero(assignment == split)))
        for split in ("train", "val", "test")})
    ids = {split: set(splits[split]["id"]) for split in splits}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"]), \
        "a product id landed in two splits"

    output_dir = Path(config.output_dir)
    saved, tmp = save_atomically(splits, output_dir)
    class_counts = Counter(labels.tolist())
    atomic_write_json(saved / "label_map.json", {
        "label_column": config.label_column,
        "labels": {name: {"id": label_ids[name], "count": class_counts[name]} for name in names},
        "source": config.dataset, "seed": config.seed, "min_class_size": config.min_class_size,
        "dropped": {"undecodable_images": undecodable, "missing_label": int((~has_label).sum()),
                    "small_classes": {label: counts[label] for label in sorted(small)}},
        "train_only_classes": train_only,
    })
    publish(saved, tmp, output_dir)

    rows = [("rows in source", total), ("classes (decodable rows with a label)", len(counts)),
            ("  of them with 1 row", sum(1 for c in counts.values() if c == 1)),
            ("  of them with < 10 rows", sum(1 for c in counts.values() if c < 10)),
            ("dropped: undecodable image", undecodable),
            ("dropped: missing label", int((~has_label).sum())),
            (f"dropped: classes with < {config.min_class_size} rows ({len(small)} classes)", sum(counts[c] for c in small)),
            ("classes kept", len(names)),
            ("classes too small to stratify, all in train", len(train_only)),
            ("classes kept with < 10 rows (in val and test where they could be)",
             sum(1 for name in names if class_counts[name] < 10))]
    rows += [(f"{split} rows", len(splits[split])) for split in splits]
    print_summary(rows, train_only, output_dir)
    return splits


def command():  # fashion-prepare, python data_preparation.py
    cli(main)


if __name__ == "__main__":
    command()
