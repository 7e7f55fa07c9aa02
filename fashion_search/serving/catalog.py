"""The catalog: its items in a vector store (fashion_search.stores) with their records, each item's photo, and the
search with filters. Built from a clip.py run's own embeddings, or from any dataset embedded with the run's model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from fashion_search.data import (SPLITS, catalog_splits, cell_bytes, encoded_images, image_cache, load_processed,
                                 metadata_frame)
from fashion_search.errors import UserError
from fashion_search.files import fingerprint, remembered_sha256
from fashion_search.metrics import TOP_K
from fashion_search.serving.query import check_page
from fashion_search.photos.pool import decode_square
from fashion_search.lexical import LEXICAL_WEIGHT
from fashion_search.serving import gate, hybrid
from fashion_search.serving.gate import item_id
from fashion_search.runs import load_split, trained_data
from fashion_search.serving import duplicates
from fashion_search.serving.build import embed_in_chunks
from fashion_search.serving.encoder import INT8_CALIBRATION_PHOTOS, QUERY_BATCH, Encoder
from fashion_search.errors import QueryError
from fashion_search.stores import FILTER_COLUMNS, SEARCH_DEPTH, Match, as_text, open_store

MAX_CHOICES = 1_000
ANY = "Any"


def split_values(value) -> list[str]:
    """Filter values as given: a list, or text with commas between several ("Red,Blue"); Any and blanks dropped."""
    if value is None:
        return []
    parts = value if isinstance(value, (list, tuple)) else as_text(value).split(",")
    return [text for part in parts if (text := as_text(part).strip()) and text != ANY]


RESULT_FIELDS = ("id", "productDisplayName", "articleType", "baseColour", "gender")
RECORDS_VERSION = 2  # part of a catalog's fingerprint: 2 = records carry every metadata column (any one filters)
HASH_LEDGER = "sha256.json"  # beside the index: the hashes of the files it was built from (files.remembered_sha256)


class Catalog:
    """The catalog items in a store (their vectors and records) and where each item's photo comes from. Searches see
    items another process adds or removes (catalog.py) without a restart."""

    def __init__(self, store, photos: "PhotoSource", duplicate_cosine: float = duplicates.DUPLICATE_COSINE):
        self.store, self.photos, self.duplicate_cosine = store, photos, duplicate_cosine
        self.words = hybrid.CatalogWords(store)  # the text index, of the same version as the vectors
        self._refresh_choices()

    def _read_choices(self) -> dict:
        """Each filter column's values: the page's columns first, then the others; a column of more than MAX_CHOICES
        distinct values (free text, numbers) is not a category and is not offered."""
        values = self.store.values()
        order = [*FILTER_COLUMNS, *sorted(set(values) - set(FILTER_COLUMNS))]
        return {column: values[column] for column in order if 0 < len(values.get(column, ())) <= MAX_CHOICES}

    def _refresh_choices(self):
        self._choices = self._read_choices()
        self._known = {column: frozenset(values) for column, values in self._choices.items()}

    def __len__(self):
        self.refresh()
        return self.store.count()

    @property
    def filter_columns(self) -> list[str]:
        """Every column this catalog can be filtered by (the API's filters)."""
        return list(self._choices)

    @property
    def page_columns(self) -> list[str]:
        """The page's filter columns this catalog has values for, in the page's order (its dropdowns, and the
        positional filters of the Gradio API)."""
        return [column for column in FILTER_COLUMNS if column in self._choices]

    def choices(self, column):
        return [ANY] + self._choices.get(column, [])

    def refresh(self):
        if self.store.refresh():
            self._refresh_choices()

    def check_filters(self, filters: dict) -> dict[str, Match]:
        """The filters that restrict, as Matches: a value, several (a list, or "Red,Blue"), or a Match (exclusions);
        None, "" and Any restrict nothing. Each column's values are counted once, and never more than the column
        holds, so a filter costs at most the catalog's own choices. QueryError for a column the catalog lacks or a
        value it never holds, naming the valid ones, rather than an empty result."""
        active = {}
        for column, value in filters.items():
            gate.text(str(column), "a filter column")
            match = value if isinstance(value, Match) else Match(tuple(split_values(value)))
            values = tuple(dict.fromkeys(gate.text(one, f"a {column} filter value") for one in match.values))
            if not values:
                continue
            if column not in self._choices:
                offered = ", ".join(self._choices) or "none"
                raise QueryError(f"this catalog cannot be filtered by {str(column)[:100]} (filters: {offered})")
            if len(values) > len(self._known[column]):
                raise QueryError(f"more {column} values than the catalog holds ({len(self._known[column])})")
            for one in values:
                if one not in self._known[column]:
                    raise QueryError(f"unknown {column} {one[:100]!r}; valid values: "
                                     f"{', '.join(self._choices[column])}")
            active[column] = Match(values, match.exclude)
        return active

    def search(self, vector: np.ndarray, filters: dict | None = None, k: int = TOP_K, offset: int = 0,
               collapse: bool = False, rerank=None) -> list[dict]:
        """Results offset to offset + k by cosine similarity, best first, or in the order ``rerank`` gives the first
        ``rerank.depth`` hits (fashion_search.attributes.Reranker). The store filters inside its search, so k
        matching items come back whenever k exist; the pages of one query never overlap or skip."""
        check_page(k, offset)
        self.refresh()
        filters = self.check_filters(filters or {})
        if not collapse and rerank is None:
            return [result_record(hit) for hit in self.store.search(vector, k, filters, offset)]
        # Folded: pages of groups. The ranking is read deeper until it holds offset + k groups (or SEARCH_DEPTH
        # items); groups of a prefix never change as it grows, so pages stay consistent. A re-ranking reads at
        # least its own depth, and leaves the hits after it in their order.
        depth = offset + k if rerank is None else min(SEARCH_DEPTH, max(offset + k, rerank.depth))
        while True:
            hits = self.store.search(vector, depth, filters, vectors=collapse)
            hits = hits if rerank is None else rerank(hits)
            if not collapse:
                return [result_record(hit) for hit in hits[offset:offset + k]]
            groups = duplicates.fold(np.stack([hit.vector for hit in hits]), self.duplicate_cosine) if hits else []
            if len(groups) >= offset + k or len(hits) < depth or depth >= SEARCH_DEPTH:
                break
            depth = min(SEARCH_DEPTH, depth * 2)
        return [{**result_record(hits[group[0]]), "duplicates": [hits[i].record.get("id") for i in group[1:]]}
                for group in groups[offset:offset + k]]

    def search_words(self, vector: np.ndarray, text: str, filters: dict | None = None, k: int = TOP_K,
                     offset: int = 0, collapse: bool = False, mode: str = "hybrid",
                     lexical_weight: float = LEXICAL_WEIGHT) -> list[dict]:
        """Results offset to offset + k for a query with words: by the catalog's text alone (mode "lexical"), or
        fused with the vector ranking ("hybrid"); folded as search() folds."""
        check_page(k, offset)
        self.refresh()
        filters = self.check_filters(filters or {})
        found = hybrid.search(self.store, self.words.current(), vector, text, filters, k, offset, collapse, mode,
                              lexical_weight, self.duplicate_cosine)
        return [{**result_record(hit), **({"duplicates": [d.record.get("id") for d in folded]} if collapse else {})}
                for hit, folded in found]

    def item(self, value) -> tuple[np.ndarray, dict]:
        """An item's vector and record by its id (any text: it stays data); QueryError when the catalog lacks it."""
        self.refresh()
        found = self.store.fetch(item_id(value))
        if found is None:
            raise QueryError(f"no catalog item with id {str(value)[:100]!r}: it is not in the catalog")
        return found

    def vector(self, value) -> np.ndarray:
        return self.item(value)[0]

    def image_bytes(self, value) -> bytes:
        return self.photos.read(self.item(value)[1])


def result_record(hit) -> dict:
    # a field the catalog lacks (a user's own photos) shows as empty
    return {**{field: "" if hit.record.get(field) is None else hit.record[field] for field in RESULT_FIELDS},
            "score": round(hit.score, 4)}


class PhotoSource:
    """An item's photo: a row of the catalog's dataset (records with split and row), or a file that catalog.py
    copied into the index's photos folder (records with photo)."""

    def __init__(self, splits: dict, folder: Path):
        self.folder = Path(folder)
        self._dataset = dataset_image_bytes(splits)
        self.splits = {name: len(split) for name, split in splits.items()}

    def read(self, record: dict) -> bytes:
        if record.get("photo"):
            return (self.folder / Path(record["photo"]).name).read_bytes()  # a bare file name: nothing outside
        return self._dataset(record["split"], record["row"])

    def spread(self, count: int):
        """Encoded photos of up to ``count`` dataset rows, spread evenly over the whole catalog."""
        places = [(name, row) for name, rows in self.splits.items() for row in range(rows)]
        for place in np.linspace(0, len(places) - 1, min(count, len(places))).astype(int):
            yield self._dataset(*places[place])


def item_records(meta: pd.DataFrame) -> tuple[list[str], list[dict]]:
    """Store keys and records of catalog rows: the result fields, the filter columns and where the photo is."""
    columns = [c for c in dict.fromkeys(("id",) + RESULT_FIELDS + FILTER_COLUMNS + tuple(meta.columns))
               if c in meta and c != "label"]  # every metadata column: any categorical one filters
    records = json.loads(meta[columns].to_json(orient="records"))  # plain Python values, missing ones as None
    try:
        keys = [item_id(value) for value in meta["id"]]
    except QueryError as exc:
        raise UserError(f"the catalog has an unusable item id: {exc}") from None
    if len(set(keys)) < len(keys):
        twice = pd.Series(keys)[pd.Series(keys).duplicated()].iloc[0]
        raise UserError(f"the catalog has item id {twice} more than once: ids must be unique")
    return keys, records


def dataset_image_bytes(splits: dict):
    """(split, row) -> the row's encoded image bytes, as stored in the dataset (decoded only for display)."""
    raw = {name: encoded_images(split) for name, split in splits.items()}

    def get(split, row):
        return cell_bytes(raw[split][int(row)]["image"])
    return get


def quiet(phase: str, done: int | None = None, total: int | None = None):
    """The progress callback of a build that reports to no one."""


def catalog_source(dataset: str | None) -> str:
    """Where a catalog comes from, as its store remembers it: "run" (the run's own splits), or "dataset:" and the
    dataset (a folder as its absolute path, so that the app and catalog.py name it alike from any folder)."""
    if not dataset:
        return "run"
    return "dataset:" + (str(Path(dataset).resolve()) if Path(dataset).exists() else dataset)


def catalog_from_run(run: Path, encoder: Encoder, dataset: str | None, cache_dir: str,
                     index: str = "faiss", ray_actors: int = 0, progress=None,
                     rebuild: bool = True) -> Catalog:
    """The fine-tuned run's own embeddings of every split (the whole catalog), or, with --dataset, that dataset
    embedded with the run's model (by Ray actors with ray_actors), in the store ``index`` names. Each phase is
    reported to ``progress`` (``progress(phase)`` as a phase begins, ``progress(phase, done, total)`` as photos are
    embedded). Without ``rebuild``, an index of another source is refused (stores.OtherCatalog)."""
    progress = progress or quiet
    if dataset:
        return catalog_from_dataset(dataset, encoder, run / "index", cache_dir, str(run / "hf_model"), index,
                                    ray_actors, progress, rebuild)
    progress("loading the catalog")
    data, _ = load_processed(trained_data(run))
    paths = {split: run / "embeddings" / f"{split}.npy" for split in SPLITS}
    for path in paths.values():
        if not path.exists():
            raise UserError(f"{path} is missing: rerun clip.py or pass --dataset")
    ledger = run / "index" / HASH_LEDGER
    parts = {split: remembered_sha256(path, ledger) for split, path in paths.items()}
    parts["model"] = remembered_sha256(next((run / "hf_model").glob("*.safetensors")), ledger)
    parts["records"] = RECORDS_VERSION
    built_from = f"{catalog_source(None)}#{fingerprint(parts)}"
    store = open_store(index, run / "index", encoder.dim, built_from, rebuild=rebuild)
    if store.fingerprint != built_from:  # new, or built from another model or catalog
        splits = [load_split(run, split) for split in SPLITS]
        embeddings = np.concatenate([vectors for vectors, _ in splits])
        if embeddings.shape[1] != encoder.dim:
            raise UserError(f"{run}/embeddings have dimension {embeddings.shape[1]} but {run}/hf_model "
                            f"embeds to {encoder.dim}: the run's files do not belong together")
        keys, records = item_records(pd.concat([meta for _, meta in splits]))
        progress("building the index")
        store.build(built_from, keys, embeddings, records)
    return Catalog(store, PhotoSource(data, run / "index" / "photos"))


class EncoderEmbedder:
    """A picklable recipe for the encoder's embedding function, built where it runs (a Ray actor)."""

    def __init__(self, model_path: str, device: str):
        self.model_path, self.device = model_path, device

    def __call__(self):
        return Encoder(self.model_path, self.device, int8=False).embed_pixels


def embed_dataset(splits: dict, encoder: Encoder, cache_dir: str, chunks: Path, ray_actors: int = 0,
                  on_chunk=None):
    """Every decodable photo of a dataset's splits embedded with the encoder: (float32 [N, D], row metadata with
    split and row). In this process, chunk by chunk through ``chunks`` (serving.build: resumable, telling
    ``on_chunk(done, total)``); with ray_actors, by a pool of that many Ray actors over the decoded cache in
    ``cache_dir`` (--engine ray)."""
    if not ray_actors:
        return embed_in_chunks(splits, encoder, chunks, on_chunk=on_chunk)
    from fashion_search import ray_engine

    cached = {name: image_cache(split, encoder.image_size, cache_dir) for name, split in splits.items()}
    image_sets = [images if ok.all() else images[np.flatnonzero(ok)] for images, ok in cached.values()]
    factory = EncoderEmbedder(encoder.model_path, str(encoder.device))
    embeddings = ray_engine.embed(factory, image_sets, ray_actors,
                                  gpus_per_actor=1 if encoder.device.type == "cuda" else 0)
    metas = [metadata_frame(split.select(np.flatnonzero(ok)), name, every_column=True, rows=np.flatnonzero(ok))
             for (name, split), (_, ok) in zip(splits.items(), cached.values())]
    return np.concatenate(embeddings), pd.concat(metas, ignore_index=True)


def catalog_from_dataset(spec: str, encoder: Encoder, index_dir: Path, cache_dir: str, model_id: str,
                         index: str = "faiss", ray_actors: int = 0, progress=None,
                         rebuild: bool = True):
    """Embed a whole dataset (hub name, hub-layout or processed folder, or a folder of image files) and index it;
    the store keeps it (a FAISS store in index_dir), so a second start embeds nothing. Each phase, and the
    embedding's photos done, is reported to ``progress`` (as catalog_from_run's)."""
    progress = progress or quiet
    progress("loading the catalog")
    splits = catalog_splits(spec)
    weights = sorted(Path(model_id).glob("*.safetensors")) if Path(model_id).is_dir() else []
    parts = {"model": remembered_sha256(weights[0], Path(index_dir) / HASH_LEDGER) if weights else model_id,
             "image_size": encoder.image_size,
             # datasets' own hash of each split (its cache key; there is no public one): a changed dataset rebuilds
             "records": RECORDS_VERSION, **{f"data:{name}": split._fingerprint for name, split in splits.items()}}
    built_from = f"{catalog_source(spec)}#{fingerprint(parts)}"
    store = open_store(index, index_dir, encoder.dim, built_from, rebuild=rebuild)
    if store.fingerprint != built_from:
        chunks = Path(index_dir) / f"build-{built_from[:16]}"  # the embedded chunks, kept until the index is whole
        phase = "embedding the catalog" + (" on Ray" if ray_actors else "")
        progress(phase)
        embeddings, meta = embed_dataset(splits, encoder, cache_dir, chunks, ray_actors,
                                         lambda done, total: progress(phase, done, total))
        keys, records = item_records(meta)
        progress("building the index")
        store.build(built_from, keys, embeddings, records)
        shutil.rmtree(chunks, ignore_errors=True)
    return Catalog(store, PhotoSource(splits, index_dir / "photos"))


def calibration_photos(catalog: Catalog, size: int, count=INT8_CALIBRATION_PHOTOS) -> np.ndarray | None:
    """uint8 [N, 3, S, S]: catalog photos spread over the whole catalog, decoded as queries are, to calibrate the
    int8 graph on (None when fewer than a batch of them decode)."""
    photos = []
    for data in catalog.photos.spread(count):
        try:
            photos.append(decode_square(data, size))
        except (ValueError, OSError, KeyError):  # a missing or broken photo: calibrate on the others
            continue
    return np.stack(photos) if len(photos) >= QUERY_BATCH else None
