"""Searches that read the catalog's own words: each catalog version's text index (fashion_search.lexical, built from
the same version's records as the vector index, so one never runs ahead of the other), and the fusion of its
ranking with the vector one for queries with words (mode "hybrid"; "lexical" and "vector" alone).

Both rankings are read FUSION_DEPTH deep (deeper for later pages), with the query's filters applied inside each;
reciprocal rank fusion orders the union; near-duplicates fold over the fused order as over a vector ranking. A fused
result's score is its fusion score, on a scale of its own (the run's "text hybrid" and "composed hybrid" calibrations
map it to a confidence)."""
from __future__ import annotations

import threading
import time

import numpy as np

from fashion_search.lexical import FUSION_DEPTH, LEXICAL_WEIGHT, TextIndex, fuse, rank_scores
from fashion_search.serving import duplicates
from fashion_search.stores import SEARCH_DEPTH, Hit, filter_values

REREAD_SECONDS = 60  # a store that cannot say when it changed (Milvus) has its words re-read at most this often


class Words:
    """The text index of one version of a catalog, and each item's filter values beside it (as the stores compare
    them: stores.filter_values)."""

    def __init__(self, keys: list[str], records: list[dict]):
        started = time.perf_counter()
        self.index = TextIndex(keys, records)
        rows = [filter_values(record) for record in records]
        columns = {column for row in rows for column in row}
        self.filters = {column: np.asarray([row.get(column, "") for row in rows], dtype=object) for column in columns}
        self.seconds = time.perf_counter() - started

    def search(self, text: str, filters: dict, depth: int) -> list[str]:
        """Keys of the ``depth`` best items for the words among those every filter (a stores.Match) matches."""
        allowed = None
        for column, match in filters.items():
            values = self.filters.get(column, np.full(len(self.index), "", dtype=object))
            allowed = match.mask(values) if allowed is None else allowed & match.mask(values)
        return [key for key, _ in self.index.search(text, depth, allowed)]


class StoreWords:
    """The words of a store that ranks them itself (stores' ranks_words: BM25 inside a Milvus server)."""

    def __init__(self, store):
        self.store = store

    def search(self, text: str, filters: dict, depth: int) -> list[str]:
        return self.store.search_words(text, depth, filters)


class CatalogWords:
    """A catalog's current Words, built at first use and again for each new version of the store (where the store
    cannot tell its version: at most every REREAD_SECONDS); the store's own where it ranks words itself."""

    def __init__(self, store):
        self.store, self._words, self._version, self._read_at = store, None, None, 0.0
        self._lock = threading.Lock()

    def current(self) -> Words | StoreWords:
        if self.store.ranks_words:
            return StoreWords(self.store)
        with self._lock:
            version = self.store.version
            stale = version is None and time.monotonic() - self._read_at > REREAD_SECONDS
            if self._words is None or stale or version != self._version:
                self._words, self._version, self._read_at = Words(*self.store.records()), version, time.monotonic()
            return self._words


def ranked_hits(store, keys: list[tuple[str, float]], vectors: bool) -> list[Hit]:
    """Hits of fused (key, score) pairs, read from the store (an item removed meanwhile is left out)."""
    hits = []
    for key, score in keys:
        found = store.fetch(key)
        if found is not None:
            hits.append(Hit(key, score, found[1], found[0] if vectors else None))
    return hits


def search(store, words: Words, vector: np.ndarray, text: str, filters: dict, k: int, offset: int, collapse: bool,
           mode: str, lexical_weight: float = LEXICAL_WEIGHT, duplicate_cosine=duplicates.DUPLICATE_COSINE
           ) -> list[tuple[Hit, list[Hit]]]:
    """(hit, its folded near-duplicates) from offset to offset + k, by the lexical ranking alone or fused with the
    vector one."""
    depth = min(SEARCH_DEPTH, max(FUSION_DEPTH, 2 * (offset + k)))
    lexical = words.search(text, filters, depth)
    if mode == "lexical":
        fused = rank_scores(lexical)
    else:
        semantic = [hit.key for hit in store.search(vector, depth, filters)]
        fused = fuse([semantic, lexical], [1.0, lexical_weight])
    if not collapse:
        return [(hit, []) for hit in ranked_hits(store, fused[offset:offset + k], False)]
    # Folded as Catalog.search folds: a prefix of the fused ranking, doubled until it holds offset + k groups (the
    # groups of a prefix never change as it grows, so pages stay consistent).
    prefix = offset + k
    while True:
        hits = ranked_hits(store, fused[:prefix], True)
        groups = duplicates.fold(np.stack([hit.vector for hit in hits]), duplicate_cosine) if hits else []
        if len(groups) >= offset + k or prefix >= len(fused):
            break
        prefix = min(len(fused), 2 * prefix)
    return [(hits[group[0]], [hits[i] for i in group[1:]]) for group in groups[offset:offset + k]]
