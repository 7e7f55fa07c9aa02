"""The catalog: every item's metadata, embedding and photo, its index, and the search with filters. Built from a
clip.py run's own embeddings, or from any dataset embedded with the run's model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from fashion_search.data import SPLITS, catalog_splits, cell_bytes, image_cache, load_processed, metadata_frame
from fashion_search.embed import job_embed
from fashion_search.errors import UserError
from fashion_search.files import atomic_save_npy, atomic_write_parquet, file_sha256
from fashion_search.images import decode_square
from fashion_search.inference import EMBED_BATCH
from fashion_search.runs import load_split
from fashion_search.serving.encoder import INT8_CALIBRATION_PHOTOS, QUERY_BATCH, Encoder
from fashion_search.serving.errors import QueryError
from fashion_search.serving.index import catalog_fingerprint, load_or_build_index, read_json

TOP_K = 5
ANY = "Any"


FILTER_COLUMNS = ("gender", "masterCategory", "articleType", "baseColour")


RESULT_FIELDS = ("id", "productDisplayName", "articleType", "baseColour", "gender")


class Catalog:
    """Metadata, embeddings and FAISS index of every catalog item, with the image of each row on demand."""

    def __init__(self, embeddings: np.ndarray, meta: pd.DataFrame, image_bytes, index):
        """image_bytes(split, row) -> the encoded photo of a catalog row."""
        self.embeddings, self.meta, self.index = embeddings, meta.reset_index(drop=True), index
        self._image_bytes = image_bytes
        self.row_of_id = {id_key(i): r for r, i in enumerate(self.meta["id"])}
        # String views of the filter columns the catalog has, made once rather than on every filtered query.
        self.filter_values = {c: self.meta[c].astype(str).to_numpy() for c in FILTER_COLUMNS if c in self.meta}
        self.valid_values = {c: set(values) for c, values in self.filter_values.items()}
        # The result columns as arrays: a query's 5 records cost far less from these than from pandas cell look-ups
        # (DataFrame.at; BENCHMARKS.md, section 3). A column the catalog lacks (a user's own photos) shows as empty.
        self.result_values = {field: self.meta[field].to_numpy() if field in self.meta else np.full(len(meta), "")
                              for field in RESULT_FIELDS}

    def __len__(self):
        return len(self.meta)

    def image_bytes(self, row: int) -> bytes:
        return self._image_bytes(self.meta.at[row, "split"], self.meta.at[row, "row"])

    def choices(self, column):
        return [ANY] + sorted(self.meta[column].dropna().astype(str).unique().tolist())

    def check_filters(self, filters: dict) -> dict:
        """The filters that restrict (value given and not Any); QueryError for a column the catalog lacks or a value
        it never holds, naming the valid ones, rather than an empty result."""
        active = {column: str(value) for column, value in filters.items() if value not in (None, "", ANY)}
        for column, value in active.items():
            if column not in self.filter_values:
                offered = ", ".join(self.filter_values) or "none"
                raise QueryError(f"this catalog cannot be filtered by {column} (filters: {offered})")
            if value not in self.valid_values[column]:
                raise QueryError(f"unknown {column} {value!r}; valid values: "
                                 f"{', '.join(self.choices(column)[1:])}")
        return active

    def search(self, vector: np.ndarray, filters: dict | None = None, k: int = TOP_K) -> list[dict]:
        """Top k rows by cosine similarity, best first. Filters restrict the candidates before ranking, so k
        matching items come back whenever k exist."""
        vector = np.ascontiguousarray(vector, dtype=np.float32)[None]
        mask = np.ones(len(self.meta), dtype=bool)
        for column, value in self.check_filters(filters or {}).items():
            mask &= self.filter_values[column] == value
        if mask.all():
            scores, rows = self.index.search(vector, min(k, len(self.meta)))
            scores, rows = scores[0], rows[0]
        else:
            candidates = np.flatnonzero(mask)
            similarity = self.embeddings[candidates] @ vector[0]  # exact over the filtered subset
            top = np.argsort(-similarity, kind="stable")[:k]
            scores, rows = similarity[top], candidates[top]
        return [{**{field: _plain(values[row]) for field, values in self.result_values.items()},
                 "score": round(float(s), 4)} for s, row in zip(scores, rows) if row >= 0]


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def id_key(value) -> str:
    """The look-up key of an item id: ids may be numbers (the hub dataset) or file names (a folder of photos), and a
    number may arrive as 10003, 10003.0 or "10003"."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    return str(_plain(value)).strip()


def dataset_image_bytes(splits: dict):
    """(split, row) -> the row's encoded image bytes, as stored in the dataset (decoded only for display)."""
    from datasets import Image as ImageFeature

    raw = {name: split.cast_column("image", ImageFeature(decode=False)) for name, split in splits.items()}

    def get(split, row):
        return cell_bytes(raw[split][int(row)]["image"])
    return get


def catalog_from_run(run: Path, encoder: Encoder, dataset: str | None, cache_dir: str) -> Catalog:
    """The fine-tuned run's own embeddings of every split (the whole catalog), or, with --dataset, that dataset
    embedded with the run's model."""
    if dataset:
        return catalog_from_dataset(dataset, encoder, run / "index", cache_dir, model_id=str(run / "hf_model"))
    args = json.loads((run / "args.json").read_text())
    data, _ = load_processed(args["data"])
    parts, embeddings, metas = {}, [], []
    for split in SPLITS:
        path = run / "embeddings" / f"{split}.npy"
        if not path.exists():
            raise UserError(f"{path} is missing: rerun clip.py or pass --dataset")
        vectors, meta = load_split(run, split)
        embeddings.append(vectors)
        metas.append(meta)
        parts[split] = file_sha256(path)
    embeddings = np.concatenate(embeddings)
    if embeddings.shape[1] != encoder.dim:
        raise UserError(f"{run}/embeddings have dimension {embeddings.shape[1]} but {run}/hf_model "
                               f"embeds to {encoder.dim}: the run's files do not belong together")
    meta = pd.concat(metas, ignore_index=True)
    parts["model"] = file_sha256(next((run / "hf_model").glob("*.safetensors")))
    fingerprint = catalog_fingerprint(parts)
    index = load_or_build_index(run / "index", embeddings, fingerprint)
    return Catalog(embeddings, meta, dataset_image_bytes(data), index)


def catalog_from_dataset(spec: str, encoder: Encoder, index_dir: Path, cache_dir: str, model_id: str):
    """Embed a whole dataset (hub name, hub-layout or processed folder, or a folder of image files) and index it;
    cached in index_dir."""
    splits = catalog_splits(spec)
    weights = sorted(Path(model_id).glob("*.safetensors")) if Path(model_id).is_dir() else []
    parts = {"model": file_sha256(weights[0]) if weights else model_id, "image_size": encoder.image_size,
             **{f"data:{name}": split._fingerprint for name, split in splits.items()}}
    fingerprint = catalog_fingerprint(parts)
    cached_vectors, cached_meta = index_dir / "catalog.npy", index_dir / "catalog.parquet"
    info_path = index_dir / "index.json"
    fresh = read_json(info_path).get("catalog") == fingerprint
    if fresh and cached_vectors.exists() and cached_meta.exists():
        embeddings, meta = np.load(cached_vectors), pd.read_parquet(cached_meta)
    else:
        embeddings, metas = [], []
        cached = {name: image_cache(split, encoder.image_size, cache_dir) for name, split in splits.items()}
        with job_embed(encoder, [images for images, _ in cached.values()], encoder.device, encoder.dtype,
                              EMBED_BATCH) as compiled:  # one graph for every split
            for name, split in splits.items():
                images, ok = cached[name]
                keep = np.flatnonzero(ok)
                embeddings.append(encoder.embed_pixels(images if ok.all() else images[keep], progress=True,
                                                       compiled=compiled))
                metas.append(metadata_frame(split.select(keep), name).assign(row=keep))
        embeddings, meta = np.concatenate(embeddings), pd.concat(metas, ignore_index=True)
        atomic_save_npy(cached_vectors, embeddings)
        atomic_write_parquet(cached_meta, meta)
    index = load_or_build_index(index_dir, embeddings, fingerprint)
    return Catalog(embeddings, meta, dataset_image_bytes(splits), index)


def calibration_photos(catalog: Catalog, size: int, count=INT8_CALIBRATION_PHOTOS) -> np.ndarray | None:
    """uint8 [N, 3, S, S]: catalog photos spread over the whole catalog, decoded as queries are, to calibrate the
    int8 graph on (None when fewer than a batch of them decode)."""
    photos = []
    for row in np.linspace(0, len(catalog) - 1, min(count, len(catalog))).astype(int):
        try:
            photos.append(decode_square(catalog.image_bytes(row), size))
        except (ValueError, OSError, TypeError, KeyError):  # a missing or broken photo: calibrate on the others
            continue
    return np.stack(photos) if len(photos) >= QUERY_BATCH else None
