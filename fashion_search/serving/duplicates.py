"""Near-duplicates: the same photo, or all but the same (re-encoded, resized, a pixel off), listed twice. Two items
are near-duplicates when their embeddings' cosine is at least DUPLICATE_COSINE, a threshold chosen on the full
catalog against exact duplicates found by pixel hash (BENCHMARKS.md, section 8)."""
from __future__ import annotations

import numpy as np

DUPLICATE_COSINE = 0.99995


def fold(vectors: np.ndarray, threshold: float = DUPLICATE_COSINE) -> list[list[int]]:
    """Groups of a ranked list, in rank order: each item joins the first earlier group whose leader it nearly
    duplicates, else leads a group of its own. A group depends only on the items ranked before it, so folding a
    longer prefix of the same ranking never changes the groups of a shorter one (pages stay consistent).
    vectors: float32 [N, D], unit length."""
    groups, leaders = [], []
    for position, vector in enumerate(vectors):
        similar = [g for g, leader in enumerate(leaders) if float(vectors[leader] @ vector) >= threshold]
        if similar:
            groups[similar[0]].append(position)
        else:
            leaders.append(position)
            groups.append([position])
    return groups


def catalog_groups(vectors: np.ndarray, threshold: float = DUPLICATE_COSINE, batch: int = 1024) -> list[list[int]]:
    """Groups of near-duplicates over a whole catalog: the connected components of "cosine at least threshold"
    (every pair compared exactly, in blocks), each sorted, in order of their first item; items without a
    near-duplicate are left out. vectors: float32 [N, D], unit length."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    rows, cols = [], []
    for start in range(0, len(vectors), batch):
        block = vectors[start:start + batch] @ vectors.T  # [B, N]
        i, j = np.nonzero(block >= threshold)
        keep = i + start < j  # each pair once, never an item with itself
        rows.append(i[keep] + start)
        cols.append(j[keep])
    rows, cols = np.concatenate(rows or [[]]).astype(np.int64), np.concatenate(cols or [[]]).astype(np.int64)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(len(vectors), len(vectors)))
    _, labels = connected_components(graph, directed=False)
    order = np.argsort(labels, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(labels[order])) + 1)
    return sorted((group.tolist() for group in groups if len(group) > 1), key=lambda group: group[0])
