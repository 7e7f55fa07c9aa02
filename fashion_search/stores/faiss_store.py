"""The default store: a FAISS index in a folder beside the run, searched inside the process.

Versions: every write makes a whole new version on disk and then switches ``CURRENT`` to it, so a crash at any point
leaves the previous version servable, and nothing that still reads is lost (stores.faiss_versions). Readers (the app)
notice a new CURRENT and load it without a restart, once per new version however many queries are in flight (a version
that fails to load is tried once, until CURRENT changes again). Writers take a lock on the
folder, so two updates never lose each other's items.

Removal: FAISS's HNSW graph cannot drop nodes, so every index here is addressed by position and a removed item is a
tombstone: it stays in the graph, still helps navigation, and is never returned (searches pass a selector of the live
positions). Once tombstones pass a quarter of the index, the next write rebuilds it from the live items. A replaced
item (upsert of an existing key) is a tombstone plus a new position.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import threading
from pathlib import Path

import numpy as np

from fashion_search.stores import SEARCH_DEPTH, Hit, OtherCatalog, as_match, source_of
from fashion_search.stores.faiss_index import State, search_one, build_index, index_kind, stored_vectors
from fashion_search.stores.faiss_versions import CURRENT, latest_version, read_version, write_version

# A filtered search ranks the matching items exactly up to this many (a few ms); beyond, HNSW with a selector.
EXACT_FILTERED_UP_TO = 50_000
COMPACT_AT_DEAD_FRACTION = 0.25


class FaissStore:
    ranks_words = False  # the app ranks this store's words with an index of its own (serving.hybrid)

    def __init__(self, folder: Path, dim: int, state: State):
        self.folder, self.dim, self._state = Path(folder), dim, state
        self._position = state.position()
        self._current_stamp = self._stamp()
        self._failed_stamp = None  # the stamp of a CURRENT whose version failed to load
        self._refreshing = threading.Lock()

    @classmethod
    def open(cls, folder, dim: int, fingerprint: str, rebuild: bool = True) -> "FaissStore":
        folder = Path(folder)
        stamp = cls._stamp_of(folder)
        state = read_version(folder, dim, fall_back=True)
        if state is not None and not rebuild and source_of(state.fingerprint) != source_of(fingerprint):
            held = source_of(state.fingerprint)
            raise OtherCatalog(f"the index in {folder} holds the catalog of {held or 'an unknown source'}, not "
                               f"of {source_of(fingerprint)}: nothing was changed", held)
        if state is not None and state.fingerprint != fingerprint:
            print(f"index in {folder} was built from another model or catalog: rebuilding")
            state = None
        store = cls(folder, dim, state or State.empty(dim, version=latest_version(folder)))
        store._current_stamp = stamp  # as CURRENT was when reading began: a write since then is loaded next
        return store

    @property
    def fingerprint(self) -> str:
        return self._state.fingerprint

    @property
    def version(self) -> int:
        return self._state.version

    def count(self) -> int:
        return len(self._position)

    @property
    def kind(self) -> str:
        return type(self._state.index).__name__

    # reads ---------------------------------------------------------------------------------------------------------

    def search(self, vector, k, filters=None, offset=0, vectors=False) -> list[Hit]:
        import faiss

        state = self._state  # one version for the whole query, whatever a refresh does meanwhile
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        mask = state.live if state.dead else None  # tombstones are never returned
        for column, match in (filters or {}).items():
            column_values = state.filters.get(column, np.full(len(state.keys), "", dtype=object))
            matches = as_match(match).mask(column_values)
            mask = matches if mask is None else mask & matches
        depth = min(offset + k, len(state.keys))
        if k <= 0 or depth <= offset:  # an empty catalog, or a page past its end
            return []
        graph = hasattr(state.index, "hnsw")
        # One breadth for every page: a graph search of another breadth may rank differently
        breadth = faiss.SearchParametersHNSW(efSearch=max(state.index.hnsw.efSearch, SEARCH_DEPTH)) if graph else None
        if mask is None:
            scores, positions = search_one(state.index, query, depth, breadth)
        elif graph and (not filters or mask.sum() > EXACT_FILTERED_UP_TO):
            # tombstones only, or many matching items: the graph search skips the others as it goes
            bitmap = np.packbits(mask, bitorder="little")
            params = faiss.SearchParametersHNSW(sel=faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap)),
                                                efSearch=breadth.efSearch)
            scores, positions = search_one(state.index, query, depth, params)
        else:  # a selective filter (or an exact index): rank the matching items exactly
            candidates = np.flatnonzero(mask)
            similarity = stored_vectors(state.index)[candidates] @ query[0]
            top = np.argsort(-similarity, kind="stable")[:depth]
            scores, positions = similarity[top], candidates[top]
        stored = stored_vectors(state.index) if vectors else None
        return [Hit(state.keys[p], float(s), json.loads(state.records[p]), None if stored is None else stored[p].copy())
                for s, p in zip(scores[offset:], positions[offset:]) if p >= 0]

    def fetch(self, key):
        state, position = self._state, self._position.get(key)
        if position is None:
            return None
        return stored_vectors(state.index)[position].copy(), json.loads(state.records[position])

    def items(self) -> tuple[list[str], np.ndarray]:
        """Every live item's key and vector (float32 [N, dim]), in index order."""
        state = self._state
        return [str(key) for key in state.keys[state.live]], stored_vectors(state.index)[state.live].copy()

    def records(self) -> tuple[list[str], list[dict]]:
        """Every live item's key and record, in index order."""
        state = self._state
        return [str(key) for key in state.keys[state.live]], [json.loads(r) for r in state.records[state.live]]

    def values(self) -> dict[str, list[str]]:
        state = self._state
        return {column: sorted(set(values[state.live]) - {""}) for column, values in state.filters.items()}

    def refresh(self) -> bool:
        """Load the version CURRENT names, if another process wrote one since (a stat per call). One thread loads
        it while the others wait and then take it. A version that fails to load is remembered as failed until
        CURRENT changes again, so a damaged file costs one load, not one per query; searches meanwhile keep the
        version they have."""
        stamp = self._stamp()
        if stamp in (self._current_stamp, self._failed_stamp):
            return False
        with self._refreshing:
            stamp = self._stamp()
            if stamp in (self._current_stamp, self._failed_stamp):  # loaded (or failed) in another thread meanwhile
                return False
            state = read_version(self.folder, self.dim)
            if state is None:
                self._failed_stamp = stamp
                return False
            self._current_stamp = stamp
            if state.version <= self._state.version:
                return False
            self._state, self._position = state, state.position()
            return True

    def _stamp(self):
        return self._stamp_of(self.folder)

    @staticmethod
    def _stamp_of(folder: Path):
        with contextlib.suppress(OSError):
            stat = (folder / CURRENT).stat()
            return stat.st_mtime_ns, stat.st_ino
        return None

    # writes --------------------------------------------------------------------------------------------------------

    def build(self, fingerprint, keys, vectors, records):
        with self._writing():
            state = State.empty(self.dim, fingerprint, self._state.version)
            state.index = build_index(np.asarray(vectors, dtype=np.float32))
            state.add_items(keys, records)
            self._state = state

    def upsert(self, keys, vectors, records):
        keys = list(keys)
        if len(set(keys)) != len(keys):
            raise ValueError("upsert: duplicate keys in one call")
        with self._writing():
            self._kill([k for k in keys if k in self._position])
            self._state.append(keys, vectors, records)

    def delete(self, keys) -> int:
        with self._writing():
            return self._kill([k for k in set(keys) if k in self._position])

    def _kill(self, keys) -> int:
        if keys:
            live = self._state.live.copy()
            live[[self._position[k] for k in keys]] = False
            self._state.live = live
        return len(keys)

    @contextlib.contextmanager
    def _writing(self):
        """Under the folder's lock: bring this store up to the latest version, let the caller change it, then save
        it as the next version."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.refresh()
            self._position = self._state.position()
            yield
            state = self._state
            if state.dead > COMPACT_AT_DEAD_FRACTION * len(state.live) or (
                    index_kind(int(state.live.sum())) != "Flat") != hasattr(state.index, "hnsw"):
                state = state.compacted()
            state.version = max(state.version, latest_version(self.folder)) + 1  # numbers never repeat
            write_version(self.folder, state, self.dim)
            self._state, self._position, self._current_stamp = state, state.position(), self._stamp()

    def close(self):
        pass
