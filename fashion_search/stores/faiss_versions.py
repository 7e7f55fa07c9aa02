"""The FAISS store's versions on disk: ``CURRENT`` names the version folder in use (``v000007/``: index.faiss,
items.parquet, store.json). A version is written whole in a temporary folder, renamed into place, then named by
CURRENT; a reader that cannot read CURRENT's version reads CURRENT again and may fall back to the newest version that
reads; a writer keeps the newest KEEP_VERSIONS and never removes one a reader is loading (readers hold a shared lock
on its store.json)."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pandas as pd

from fashion_search.files import atomic_write_json, read_json
from fashion_search.stores.faiss_index import State, tune

CURRENT = "CURRENT"
KEEP_VERSIONS = 3  # the current one and two before it, for readers that read CURRENT just before a write
READ_TRIES = 3


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
