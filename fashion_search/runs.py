"""The run folder every model script writes and evaluation.py and app.py read: args.json, log.jsonl, last.pt
(resume), best.pt (the selected model), metrics.json, embeddings/<split>.npy + .parquet. Every file is written
atomically."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from fashion_search import calibration, metrics
from fashion_search.errors import UserError
from fashion_search.files import atomic_save_npy, atomic_write_json, atomic_write_parquet, atomic_write_text, git_commit


class Run:
    """One output folder: args.json, log.jsonl, last.pt (resume), best.pt (selected model), metrics.json,
    embeddings/. Every file is written atomically."""

    def __init__(self, output_dir, config: dict, resume=False, write=True):
        """config: what args.json records (Config.to_dict()). write=False: the paths only (a data-parallel rank other
        than 0, which writes nothing)."""
        self.dir = Path(output_dir)
        self.last, self.best, self.log_path = self.dir / "last.pt", self.dir / "best.pt", self.dir / "log.jsonl"
        if not write:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        record = dict(config)
        record["git_commit"] = git_commit()
        record["command"] = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
        atomic_write_json(self.dir / "args.json", record)
        if not resume:
            for stale in (self.last, self.best, self.log_path, self.dir / "metrics.json"):
                stale.unlink(missing_ok=True)

    def trim_log(self, epochs: int):
        if self.log_path.exists():
            lines = [line for line in self.log_path.read_text().splitlines() if json.loads(line)["epoch"] <= epochs]
            atomic_write_text(self.log_path, "".join(line + "\n" for line in lines))

    def log(self, record: dict):
        # Append one line; the previous lines stay intact even if this process dies mid-write.
        lines = self.log_path.read_text().splitlines() if self.log_path.exists() else []
        atomic_write_text(self.log_path, "\n".join(lines + [json.dumps(record)]) + "\n")


def trained_data(run_dir) -> str:
    """The processed data a run was trained on (its --data), from args.json; runs written before configs hold the
    flags flat."""
    record = json.loads((Path(run_dir) / "args.json").read_text())
    data = record["data"]
    return data["path"] if isinstance(data, dict) else data


def write_embeddings(run_dir, split: str, embeddings: np.ndarray, metadata):
    """embeddings/<split>.npy (float32, L2-normalised, [rows, dim]) and the row-aligned .parquet."""
    if len(embeddings) != len(metadata):
        raise ValueError(f"{split}: {len(embeddings)} embeddings but {len(metadata)} metadata rows")
    folder = Path(run_dir) / "embeddings"
    atomic_save_npy(folder / f"{split}.npy", np.ascontiguousarray(embeddings, dtype=np.float32))
    atomic_write_parquet(folder / f"{split}.parquet", metadata.reset_index(drop=True))


def load_split(run_dir, split):
    """(embeddings [N, D] float32, metadata DataFrame) of one split of a run, checked for consistency."""
    import pandas as pd
    npy, parquet = Path(run_dir) / "embeddings" / f"{split}.npy", Path(run_dir) / "embeddings" / f"{split}.parquet"
    missing = [str(p) for p in (npy, parquet) if not p.exists()]
    if missing:
        raise UserError(f"missing {', '.join(missing)} (is {run_dir} a finished run?)")
    embeddings, metadata = np.load(npy), pd.read_parquet(parquet)
    if embeddings.ndim != 2 or len(embeddings) != len(metadata):
        raise UserError(f"{npy} has shape {embeddings.shape} but {parquet} has {len(metadata)} rows")
    return embeddings.astype(np.float32, copy=False), metadata


def evaluate_run(run_dir, query_split="test", gallery_split="train") -> dict:
    """metrics.json content of a run: query/gallery metrics, plus leave-one-out within the query split."""
    queries, query_meta = load_split(run_dir, query_split)
    gallery, gallery_meta = load_split(run_dir, gallery_split)
    if queries.shape[1] != gallery.shape[1]:
        raise UserError(f"{run_dir}: {query_split} embeddings have dimension {queries.shape[1]} but "
                        f"{gallery_split} ones {gallery.shape[1]}")
    result = {"protocol": f"query/gallery ({query_split} -> {gallery_split})",
              **metrics.evaluate(queries, query_meta["label"], gallery, gallery_meta["label"])}
    loo = metrics.evaluate(queries, query_meta["label"], queries, query_meta["label"], exclude_self=True)
    result["leave_one_out"] = {"protocol": f"leave-one-out within {query_split}", **loo}
    text = Path(run_dir) / "embeddings" / f"text_{query_split}.npy"
    if text.exists():  # a run whose text tower can search (clip.py)
        result["text_to_image"] = text_metrics(run_dir, query_split)
    return result


def text_metrics(run_dir, split="test", splits=("train", "val", "test")) -> dict:
    """Text-to-image search of a run: the productDisplayName embeddings of ``split`` (embeddings/text_<split>.npy,
    row-aligned with <split>.parquet) against that split's photos and against the whole catalog (every split)."""
    texts = np.load(Path(run_dir) / "embeddings" / f"text_{split}.npy")
    photos, meta = load_split(run_dir, split)
    if texts.shape != photos.shape:
        raise UserError(f"{run_dir}/embeddings/text_{split}.npy has shape {texts.shape}, its photos {photos.shape}")
    catalog = [load_split(run_dir, name) for name in splits]
    return {"protocol": f"{split} product names -> {split} photos (own photo) and -> all splits (same type)",
            **metrics.text_to_image(texts, photos, meta["label"], np.concatenate([e for e, _ in catalog]),
                                    np.concatenate([m["label"].to_numpy() for _, m in catalog]))}


def calibrate_run(run_dir) -> list[dict]:
    """Fit the match confidence on val -> train and write <run_dir>/calibration.json; returns the test split's
    reliability table (predicted against observed, in bins)."""
    (val, val_meta), (train, train_meta) = load_split(run_dir, "val"), load_split(run_dir, "train")
    fitted = calibration.fit(*calibration.result_pairs(val, val_meta["label"], train, train_meta["label"]))
    atomic_write_json(Path(run_dir) / calibration.FILE, fitted)
    test, test_meta = load_split(run_dir, "test")
    return calibration.reliability(fitted, *calibration.result_pairs(test, test_meta["label"], train,
                                                                     train_meta["label"]))
