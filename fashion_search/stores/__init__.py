"""Where a catalog's vectors live: one small interface (upsert with payload, delete, search with filters, count) and
two backends behind it, chosen by a spec string (app.py and catalog.py ``--index``):

- ``faiss`` (default): a FAISS index persisted in a folder beside the run, searched inside the process;
- ``milvus:PATH.db``: Milvus Lite, embedded in the process (brute force: tests and small catalogs);
- ``milvus://HOST:PORT/COLLECTION``: a Milvus server or cluster (sharding, replicas, HNSW or DiskANN indexes).

Items are keyed by a string (``key``: the item id as text). Each carries a payload: the record a search returns
(any JSON-able values) and the filter columns as text, which the backend filters on inside its search.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from fashion_search.errors import UserError

# The payload columns a search can filter on (exact match), stored as text by every backend.
FILTER_COLUMNS = ("gender", "masterCategory", "articleType", "baseColour")


@dataclass(frozen=True)
class Hit:
    key: str
    score: float
    record: dict


class VectorStore(Protocol):
    dim: int
    fingerprint: str  # what the base catalog was built from (model and data); "" for an empty store

    def build(self, fingerprint: str, keys: Sequence[str], vectors: np.ndarray, records: Sequence[dict]) -> None:
        """Hold exactly these items, built in bulk (the base catalog), under this fingerprint."""

    def upsert(self, keys: Sequence[str], vectors: np.ndarray, records: Sequence[dict]) -> None:
        """Add items, replacing any with the same key. vectors: float32 [N, dim], L2-normalised."""

    def delete(self, keys: Sequence[str]) -> int:
        """Remove items by key (unknown keys are ignored); returns how many were removed."""

    def search(self, vector: np.ndarray, k: int, filters: dict[str, str] | None = None) -> list[Hit]:
        """The k best items by inner product among those whose filter columns equal every given value."""

    def count(self) -> int: ...

    def fetch(self, key: str) -> tuple[np.ndarray, dict] | None:
        """An item's vector and record, or None."""

    def values(self, column: str) -> list[str]:
        """The distinct values of a filter column, sorted."""

    def refresh(self) -> bool:
        """Pick up writes made by another process; True when something changed."""

    def close(self) -> None: ...


def filter_values(record: dict) -> dict[str, str]:
    """A record's filter columns as the text the backends store ('' where the record lacks one)."""
    return {column: "" if record.get(column) is None else str(record[column]) for column in FILTER_COLUMNS}


def open_store(spec: str, folder: Path, dim: int, fingerprint: str, create: bool = True) -> VectorStore:
    """The store a spec names. ``folder`` is where the FAISS backend keeps its files (the run's index folder).
    ``fingerprint`` is that of the catalog the caller would build. The store's own ``fingerprint`` says what it holds:
    equal, it is ready (with any live updates since); "" (new, or a FAISS file of another catalog, which is derived
    from the run), the caller fills it with ``build``. A Milvus collection built from another catalog is refused:
    it may be shared, so it is never dropped here."""
    if spec == "faiss":
        from fashion_search.stores.faiss_store import FaissStore

        return FaissStore.open(folder, dim, fingerprint)
    if spec.startswith("milvus:"):
        from fashion_search.stores.milvus_store import MilvusStore

        return MilvusStore.open(spec, dim, fingerprint, create)
    raise UserError(f"unknown index {spec!r}: use faiss, milvus:PATH.db or milvus://HOST:PORT/COLLECTION")


def chunks(count: int, size: int):
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))
