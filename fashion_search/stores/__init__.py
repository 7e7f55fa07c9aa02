"""Where a catalog's vectors live: one small interface (upsert with payload, delete, search with filters, count) and
two backends behind it, chosen by a spec string (app.py and catalog.py ``--index``):

- ``faiss`` (default): a FAISS index persisted in a folder beside the run, searched inside the process;
- ``milvus:PATH.db``: Milvus Lite, embedded in the process (brute force: tests and small catalogs);
- ``milvus://HOST:PORT/COLLECTION``: a Milvus server or cluster (sharding, replicas, HNSW or DiskANN indexes).

Items are keyed by a string (``key``: the item id as text). Each carries a payload: the record a search returns
(any JSON-able values) and its filter columns as text, which the backend filters on inside its search: every field
of the record but those in NOT_FILTERS (the hub data's gender, masterCategory, subCategory, articleType, baseColour,
season, usage, year; a user's catalog's own columns). A filter is a Match per column: one or several values, or
every value but those.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from fashion_search.errors import UserError

# The filter columns of the page, in its order; the Milvus backend keeps them as indexed scalar fields.
FILTER_COLUMNS = ("gender", "masterCategory", "articleType", "baseColour")
# Fields a catalog writes into each record beside the data's own columns: where the photo is, and the search's score.
RECORD_FIELDS = ("photo", "split", "row", "score")
# Record fields that are not filters: identities, free text, where the photo is.
NOT_FILTERS = ("id", "productDisplayName", *RECORD_FIELDS)
MAX_KEY_BYTES = 512  # an item's key (its id as UTF-8 text): the Milvus key field's length, and the gate's limit
# A search looks this deep into the ranking whatever page it returns, so that pages of one query never overlap or
# skip (an HNSW search of another breadth may rank differently); offset + k stays within it.
SEARCH_DEPTH = 500


@dataclass(frozen=True)
class Match:
    """A filter on one column: items whose value is one of ``values`` (or, with ``exclude``, none of them)."""
    values: tuple[str, ...]
    exclude: bool = False

    def mask(self, column: np.ndarray) -> np.ndarray:
        """bool [N]: which of a column's values (object [N]) match, by hashing (np.isin on objects compares every
        pair: values x items)."""
        import pandas as pd

        return pd.Series(column, copy=False).isin(self.values).to_numpy() != self.exclude


def as_match(value) -> Match:
    return value if isinstance(value, Match) else Match((str(value),))


@dataclass(frozen=True)
class Hit:
    key: str
    score: float
    record: dict
    vector: np.ndarray | None = None  # with search(..., vectors=True)


class VectorStore(Protocol):
    dim: int
    # What the base catalog was built from: "SOURCE#HASH", its source (stores.source_of) and a hash of its model and
    # data; "" for an empty store.
    fingerprint: str
    # Which version of the items this store holds (FAISS: its version number, new at every write); None where it
    # cannot tell (Milvus: every search asks the server), so that what is derived from all items (the text index) is
    # re-read now and then instead.
    version: int | None
    # Whether the store ranks its items' words itself (search_words: Milvus 2.5+ and Lite, BM25 in the server);
    # where it does not, the app builds a BM25 index of its own from records() (serving.hybrid).
    ranks_words: bool

    def build(self, fingerprint: str, keys: Sequence[str], vectors: np.ndarray, records: Sequence[dict]) -> None:
        """Hold exactly these items, built in bulk (the base catalog), under this fingerprint."""

    def upsert(self, keys: Sequence[str], vectors: np.ndarray, records: Sequence[dict]) -> None:
        """Add items, replacing any with the same key. vectors: float32 [N, dim], L2-normalised."""

    def delete(self, keys: Sequence[str]) -> int:
        """Remove items by key (unknown keys are ignored); returns how many were removed."""

    def search(self, vector: np.ndarray, k: int, filters: dict[str, Match] | None = None, offset: int = 0,
               vectors: bool = False) -> list[Hit]:
        """Items offset to offset + k by inner product among those every filter matches, from a ranking
        SEARCH_DEPTH deep (consistent across pages); with ``vectors``, each hit carries its vector."""

    def count(self) -> int: ...

    def fetch(self, key: str) -> tuple[np.ndarray, dict] | None:
        """An item's vector and record, or None."""

    def items(self) -> tuple[list[str], np.ndarray]:
        """Every item's key and vector (float32 [N, dim])."""

    def records(self) -> tuple[list[str], list[dict]]:
        """Every item's key and record (the text index reads the catalog's words from them)."""

    def values(self) -> dict[str, list[str]]:
        """Each filter column's distinct values, sorted ('' left out)."""

    def refresh(self) -> bool:
        """Pick up writes made by another process; True when something changed."""

    def close(self) -> None: ...


def as_text(value) -> str:
    """A filter value as the text the backends store and compare: '' for none, 2012 for 2012.0."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def filter_values(record: dict) -> dict[str, str]:
    """A record's filter columns as text: the page's columns always ('' where the record lacks one), then every
    other field with a plain value."""
    values = {column: as_text(record.get(column)) for column in FILTER_COLUMNS}
    values.update({column: as_text(value) for column, value in record.items()
                   if column not in NOT_FILTERS and column not in values and isinstance(value, (str, int, float))
                   and not isinstance(value, bool)})
    return values


def source_of(fingerprint: str) -> str:
    """The source part of a store's fingerprint: "run" (a clip.py run's own splits) or "dataset:SPEC"."""
    return fingerprint.split("#", 1)[0]


class OtherCatalog(UserError):
    """The store holds the catalog of another source than the caller's (say, a --dataset catalog, while the caller
    would serve the run's own): refused without writing anything."""

    def __init__(self, message: str, source: str):
        super().__init__(message)
        self.source = source


def open_store(spec: str, folder: Path, dim: int, fingerprint: str, create: bool = True,
               rebuild: bool = True) -> VectorStore:
    """The store a spec names. ``folder`` is where the FAISS backend keeps its files (the run's index folder).
    ``fingerprint`` is that of the catalog the caller would build. The store's own ``fingerprint`` says what it holds:
    equal, it is ready (with any live updates since); "" (new, or a FAISS file of another catalog, which is derived
    from the run), the caller fills it with ``build``. A Milvus collection built from another catalog is refused:
    it may be shared, so it is never dropped here. Without ``rebuild`` (catalog.py, which updates the catalog an app
    serves), a store built from another source is refused (OtherCatalog) rather than emptied."""
    if spec == "faiss":
        from fashion_search.stores.faiss_store import FaissStore

        return FaissStore.open(folder, dim, fingerprint, rebuild)
    if spec.startswith("milvus:"):
        from fashion_search.stores.milvus_store import MilvusStore

        return MilvusStore.open(spec, dim, fingerprint, create)
    raise UserError(f"unknown index {spec!r}: use faiss, milvus:PATH.db or milvus://HOST:PORT/COLLECTION")


def chunks(count: int, size: int):
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))
