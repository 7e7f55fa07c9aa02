"""The default store: a FAISS index in a folder beside the run, searched inside the process.

Layout: ``CURRENT`` names the version folder in use (``v000007/``: index.faiss, items.parquet, store.json). A write
makes the next version in a temporary folder, renames it into place and only then rewrites CURRENT (atomically), so
a crash at any point leaves the previous version servable. Readers (the app) notice a new CURRENT and load it without
a restart, once per new version however many queries are in flight, and record it only once it has loaded (a failed
load is tried again at the next query). Writers take a lock on the folder, so two updates never lose each other's
items.

Nothing that still reads is lost. Opening a store whose CURRENT version cannot be read (damaged, or removed while
being read) reads CURRENT again, then falls back to the newest version that reads, with the updates it holds; the
version numbers only grow. A writer keeps the newest KEEP_VERSIONS versions and never removes one that a reader is
loading (readers hold a shared lock on its store.json while they load it).

Removal: FAISS's HNSW graph cannot drop nodes, so every index here is addressed by position and a removed item is a
tombstone: it stays in the graph, still helps navigation, and is never returned (searches pass a selector of the live
positions). Once tombstones pass a quarter of the index, the next write rebuilds it from the live items. A replaced
item (upsert of an existing key) is a tombstone plus a new position.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from fashion_search.files import atomic_write_json, read_json
from fashion_search.stores import FILTER_COLUMNS, SEARCH_DEPTH, Hit, as_match, filter_values

# Index type by catalog size (benchmarks/search.py; BENCHMARKS.md, section 2): exact search grows linearly with the
# catalog while HNSW stays well under a millisecond, and efSearch 64 keeps recall@5 near 1 up to 200k items (128
# beyond). Small catalogs stay exact.
EXACT_UP_TO = 5_000
HNSW_M, HNSW_EF_CONSTRUCTION = 32, 64
BUILD_CHUNK = 2_000
# A filtered search ranks the matching items exactly up to this many (a few ms); beyond, HNSW with a selector.
EXACT_FILTERED_UP_TO = 50_000
COMPACT_AT_DEAD_FRACTION = 0.25
CURRENT = "CURRENT"
KEEP_VERSIONS = 3  # the current one and two before it, for readers that read CURRENT just before a write
READ_TRIES = 3


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


def _search(index, query, k, params):
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


class FaissStore:
    def __init__(self, folder: Path, dim: int, state: State):
        self.folder, self.dim, self._state = Path(folder), dim, state
        self._position = state.position()
        self._current_stamp = self._stamp()
        self._refreshing = threading.Lock()

    @classmethod
    def open(cls, folder, dim: int, fingerprint: str) -> "FaissStore":
        folder = Path(folder)
        stamp = cls._stamp_of(folder)
        state = read_version(folder, dim, fall_back=True)
        if state is not None and state.fingerprint != fingerprint:
            print(f"index in {folder} was built from another model or catalog: rebuilding")
            state = None
        store = cls(folder, dim, state or State.empty(dim, version=latest_version(folder)))
        store._current_stamp = stamp  # as CURRENT was when reading began: a write since then is loaded next
        return store

    @property
    def fingerprint(self) -> str:
        return self._state.fingerprint

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
            scores, positions = _search(state.index, query, depth, breadth)
        elif graph and (not filters or mask.sum() > EXACT_FILTERED_UP_TO):
            # tombstones only, or many matching items: the graph search skips the others as it goes
            bitmap = np.packbits(mask, bitorder="little")
            params = faiss.SearchParametersHNSW(sel=faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap)),
                                                efSearch=breadth.efSearch)
            scores, positions = _search(state.index, query, depth, params)
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

    def keys(self) -> list[str]:
        """Every item's key, in index order."""
        state = self._state
        return [str(key) for key in state.keys[state.live]]

    def values(self) -> dict[str, list[str]]:
        state = self._state
        return {column: sorted(set(values[state.live]) - {""}) for column, values in state.filters.items()}

    def refresh(self) -> bool:
        """Load the version CURRENT names, if another process wrote one since (a stat per call). One thread loads
        it while the others wait and then take it; the new stamp is recorded only once the load succeeded."""
        if self._stamp() == self._current_stamp:
            return False
        with self._refreshing:
            stamp = self._stamp()
            if stamp == self._current_stamp:  # loaded by another thread meanwhile
                return False
            state = read_version(self.folder, self.dim)
            if state is None:
                return False  # stamp not recorded: tried again at the next query
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


def version_name(version: int) -> str:
    return f"v{version:06d}"


def write_version(folder: Path, state: State, dim: int):
    """The next version as a whole folder, renamed into place, then named by CURRENT: each step is atomic, so a
    crash leaves CURRENT naming a complete version."""
    import faiss

    name = version_name(state.version)
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    faiss.write_index(state.index, str(tmp / "index.faiss"))
    pd.DataFrame({"key": state.keys.astype(str), "live": state.live, "record": state.records.astype(str),
                  **{c: v.astype(str) for c, v in state.filters.items()}}).to_parquet(tmp / "items.parquet",
                                                                                    index=False)
    (tmp / "store.json").write_text(json.dumps({"fingerprint": state.fingerprint, "dim": dim,
                                                "version": state.version, "type": type(state.index).__name__,
                                                "items": int(state.live.sum()), "tombstones": state.dead}))
    for path in tmp.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(folder / name, ignore_errors=True)  # a version a crashed writer renamed but never made current
    os.rename(tmp, folder / name)
    atomic_write_json(folder / CURRENT, {"version": name})
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # the renames themselves
    finally:
        os.close(fd)
    remove_old_versions(folder, name, dim)


def version_numbers(folder: Path) -> list[int]:
    """The numbers of the version folders on disk, newest first."""
    found = [int(path.name[1:]) for path in folder.glob("v*") if path.is_dir() and path.name[1:].isdigit()]
    return sorted(found, reverse=True)


def latest_version(folder: Path) -> int:
    """The highest version number on disk or named by CURRENT (whose folder may be gone): the next write takes the
    one after it, so that no reader ever meets a number twice."""
    current = str(read_json(folder / CURRENT).get("version", ""))
    named = [int(current[1:])] if current[1:].isdigit() else []
    return max(version_numbers(folder) + named, default=0)


def remove_old_versions(folder: Path, keep: str, dim: int):
    """Leftover temporary folders, versions that no longer read, and readable ones beyond the newest KEEP_VERSIONS
    (``keep`` among them), except any that a reader is loading right now (it holds a shared lock on the version's
    store.json). Writes are rare (catalog.py), so each candidate is checked by loading it."""
    for old in folder.glob(".v*.tmp"):
        if old.is_dir() and not old.name.endswith(f".{os.getpid()}.tmp"):
            shutil.rmtree(old, ignore_errors=True)
    kept = {keep}
    for number in version_numbers(folder):
        path = folder / version_name(number)
        if path.name in kept:
            continue
        if len(kept) < KEEP_VERSIONS and load_version(path, dim) is not None:
            kept.add(path.name)
            continue
        try:
            with open(path / "store.json", "rb") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a reader holds it
                shutil.rmtree(path, ignore_errors=True)
        except BlockingIOError:
            continue  # a reader is loading it: removed by a later write
        except OSError:  # no store.json: a damaged version, which no reader can load
            shutil.rmtree(path, ignore_errors=True)


def read_version(folder: Path, dim: int, fall_back: bool = False) -> State | None:
    """The version CURRENT names. If it cannot be read, CURRENT is read again (a writer may have moved on) up to
    READ_TRIES times; then, with ``fall_back``, the newest version on disk that reads. None when none does."""
    tried = []
    for _ in range(READ_TRIES):
        name = read_json(folder / CURRENT).get("version")
        if not isinstance(name, str) or not name.startswith("v") or name in tried:
            break
        state = load_version(folder / name, dim)
        if state is not None:
            return state
        tried.append(name)
    if not fall_back:
        return None
    for number in version_numbers(folder):
        if version_name(number) not in tried and (state := load_version(folder / version_name(number), dim)):
            if tried:
                print(f"index in {folder}: {tried[0]} cannot be read; serving {version_name(number)}, the newest "
                      f"version that reads")
            return state
    if tried:
        print(f"index in {folder} cannot be read: rebuilding")
    return None


def load_version(path: Path, dim: int) -> State | None:
    """One version folder, read under a shared lock on its store.json (writers do not remove it meanwhile); None
    when it is missing, damaged or of another dimension."""
    import faiss

    try:
        with open(path / "store.json", "rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            info = json.loads(lock.read())
            index = tune(faiss.read_index(str(path / "index.faiss")))
            items = pd.read_parquet(path / "items.parquet")
        if index.d != dim or index.ntotal != len(items) or info.get("dim") != dim:
            return None
        return State(int(info["version"]), info["fingerprint"], index, items["key"].to_numpy(object),
                     items["live"].to_numpy(bool), items["record"].to_numpy(object),
                     {c: items[c].to_numpy(object) for c in items.columns if c not in ("key", "live", "record")})
    except (OSError, ValueError, RuntimeError, KeyError, TypeError):
        return None
