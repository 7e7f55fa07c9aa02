"""The FAISS index of a catalog: its type by catalog size (exact when small, HNSW beyond), and its persistence beside
the run with a fingerprint, so that a stale or mismatched index is rebuilt, never served."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fashion_search.files import atomic_write, atomic_write_json


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


def tune(index):
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = hnsw_ef_search(index.ntotal)  # a search-time setting: set again after every load
    return index


def catalog_fingerprint(parts: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def read_json(path: Path) -> dict:
    """The file's JSON object, or {} when it is missing or damaged (the index is then rebuilt, not served)."""
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def load_or_build_index(index_dir: Path, embeddings: np.ndarray, catalog: str):
    """Reuse the saved index when its fingerprint, dimension and row count match; rebuild it otherwise. A stale
    or mismatched index is never served."""
    import faiss

    fingerprint = catalog_fingerprint({"catalog": catalog, "index": index_kind(len(embeddings))})
    index_path, info_path = index_dir / "catalog.faiss", index_dir / "index.json"
    if index_path.exists() and info_path.exists():
        if read_json(info_path).get("fingerprint") == fingerprint:
            try:
                index = faiss.read_index(str(index_path))
            except RuntimeError:  # unreadable file: rebuilt below
                index = None
            if index is not None and index.d == embeddings.shape[1] and index.ntotal == len(embeddings):
                return tune(index)
        print(f"index in {index_dir} is stale (model or catalog changed): rebuilding")
    index = build_index(embeddings)
    atomic_write(index_path, lambda tmp: faiss.write_index(index, tmp))
    atomic_write_json(info_path, {"fingerprint": fingerprint, "catalog": catalog,
                                         "dim": int(index.d), "rows": int(index.ntotal),
                                         "type": type(index).__name__})
    return index
