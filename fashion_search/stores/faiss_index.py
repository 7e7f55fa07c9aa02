"""The FAISS index of one version of the store: which kind a catalog's size calls for, how it is built and searched,
and the State of one version (positions, keys, tombstones, records, filter values)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from fashion_search.stores import FILTER_COLUMNS, filter_values

# Index type by catalog size (benchmarks/search.py; BENCHMARKS.md, section 2): exact search grows linearly with the
# catalog while HNSW stays well under a millisecond, and efSearch 64 keeps recall@5 near 1 up to 200k items (128
# beyond). Small catalogs stay exact.
EXACT_UP_TO = 5_000
HNSW_M, HNSW_EF_CONSTRUCTION = 32, 64
BUILD_CHUNK = 2_000


def hnsw_ef_search(rows: int) -> int:
    return 64 if rows <= 200_000 else 128


def index_kind(rows: int) -> str:
    return "Flat" if rows <= EXACT_UP_TO else f"HNSW{HNSW_M},ef{hnsw_ef_search(rows)}"


def build_index(embeddings: np.ndarray):
    import faiss

    rows, dim = embeddings.shape
    if index_kind(rows) == "Flat":
        index = faiss.IndexFlatIP(dim)
        index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
        return index
    index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    # added in chunks, so that a progress bar (at a terminal) can follow the build
    for start in tqdm(range(0, rows, BUILD_CHUNK), desc=f"HNSW index over {rows:,} items", unit="chunk",
                      disable=None):
        index.add(np.ascontiguousarray(embeddings[start:start + BUILD_CHUNK], dtype=np.float32))
    return tune(index)


def search_one(index, query, k, params):
    """(scores [k], positions [k]) of one query. (faiss.contrib.torch_utils, which some libraries import, replaces
    search with a version without params; the numpy original stays as search_numpy.)"""
    search = getattr(index, "search_numpy", index.search)
    scores, positions = search(query, k, params=params) if params is not None else search(query, k)
    return scores[0], positions[0]


def tune(index):
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = hnsw_ef_search(index.ntotal)  # a search-time setting: set again after every load
    return index


def stored_vectors(index) -> np.ndarray:
    """float32 [ntotal, d]: the vectors an IndexFlat or IndexHNSWFlat holds, as a view (no copy; invalid after an
    add, which may move them)."""
    import faiss

    flat = faiss.downcast_index(index.storage) if hasattr(index, "storage") else index
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


@dataclass
class State:
    """One version of the store. Position p is the index's internal id; live[p] is False for a tombstone."""
    version: int
    fingerprint: str
    index: object
    keys: np.ndarray  # str [P]
    live: np.ndarray  # bool [P]
    records: np.ndarray  # str [P]: each record as JSON
    filters: dict  # column -> str [P]

    @classmethod
    def empty(cls, dim: int, fingerprint: str = "", version: int = 0):
        """No items. ``version``: the last one on disk, so that a rebuilt store never reuses an old version's name."""
        import faiss

        return cls(version, fingerprint, faiss.IndexFlatIP(dim), np.array([], dtype=object),
                   np.array([], dtype=bool), np.array([], dtype=object),
                   {c: np.array([], dtype=object) for c in FILTER_COLUMNS})  # more columns as items bring them

    @property
    def dead(self) -> int:
        return int(len(self.live) - self.live.sum())

    def position(self) -> dict:
        return {key: p for p, key in enumerate(self.keys) if self.live[p]}

    def append(self, keys, vectors, records):
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self.add_items(keys, records)

    def add_items(self, keys, records):
        """Keys, records and filter values of items whose vectors the index has just taken."""
        self.keys = np.concatenate([self.keys, np.asarray(keys, dtype=object)])
        self.live = np.concatenate([self.live, np.ones(len(keys), dtype=bool)])
        self.records = np.concatenate([self.records, np.asarray([json.dumps(r, default=str) for r in records],
                                                                 dtype=object)])
        rows = [filter_values(r) for r in records]
        columns = list(dict.fromkeys([*self.filters, *(c for row in rows for c in row)]))
        before = len(self.keys) - len(keys)
        self.filters = {c: np.concatenate([self.filters.get(c, np.full(before, "", dtype=object)),
                                           np.asarray([row.get(c, "") for row in rows], dtype=object)])
                        for c in columns}

    def compacted(self):
        """The live items only, in a freshly built index of the kind their number calls for."""
        keep = np.flatnonzero(self.live)
        index = build_index(stored_vectors(self.index)[keep])
        return State(self.version, self.fingerprint, index, self.keys[keep], self.live[keep], self.records[keep],
                     {c: values[keep] for c, values in self.filters.items()})
