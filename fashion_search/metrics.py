"""Retrieval metrics: pure functions over arrays (labels < 0 mean unknown: never relevant).

Which recall is which:
  - ``recall@k`` is the original report's recall: relevant items retrieved in the top k / all relevant items in
    the gallery. With hundreds of same-class items per query and k = 5 it is tiny by construction (at most
    5 / class size); it is reported for comparison, not as a quality figure.
  - ``accuracy@k`` is "at least one relevant item in the top k", which the metric-learning literature calls
    Recall@k. The original report calls it retrieval accuracy.
"""
from __future__ import annotations

import numpy as np

TOP_K = 5  # the results a search shows (the page's five), and the k of the headline metrics and the calibration
HEADLINE_KEYS = ("precision@5", "recall@5", "accuracy@5", "precision@1", "map@r", "macro_precision@5")
CURVE_K = 20
CLASS_SIZE_EDGES = (20, 100)  # gallery items per class: the bands of precision by class size


def search(queries: np.ndarray, gallery: np.ndarray, k: int, exclude_self: bool = False):
    """Exact top-k by inner product (cosine similarity for L2-normalised rows) with FAISS.

    queries [Q, D], gallery [G, D] float32 -> (scores [Q, k] float32, indices [Q, k] int64), best first.
    Equal scores are ordered by gallery index (lower first). Where the gallery has fewer than k candidates the
    row is padded with index -1 and score -inf. exclude_self: queries are the gallery's own rows (in order) and
    each query's row is removed from its own results (leave-one-out)."""
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    if exclude_self and len(queries) != len(gallery):
        raise ValueError("exclude_self needs the queries to be the gallery's own rows")
    num_queries = len(queries)
    scores = np.full((num_queries, k), -np.inf, dtype=np.float32)
    indices = np.full((num_queries, k), -1, dtype=np.int64)
    fetch = min(k + int(exclude_self), len(gallery))
    if num_queries == 0 or fetch == 0:
        return scores, indices
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    found_scores, found = _search_ties_by_index(index, queries, fetch)
    if exclude_self:
        keep = found != np.arange(num_queries)[:, None]
        # Move each row's own index to the end (stable, so the ranking is kept), then keep the first k.
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
        valid = np.take_along_axis(keep, order, 1)
        width = order.shape[1]
        indices[:, :width] = np.where(valid, np.take_along_axis(found, order, 1), -1)
        scores[:, :width] = np.where(valid, np.take_along_axis(found_scores, order, 1), -np.inf)
    else:
        indices[:, :fetch], scores[:, :fetch] = found, found_scores
    return scores, indices


def _search_ties_by_index(index, queries, need):
    """FAISS top-``need`` with equal scores ordered by gallery index, also across the cut-off. FAISS keeps an
    arbitrary subset of the items tied at the last place; one extra result tells whether a tie crosses the cut,
    and only such rows are searched again, deeper, until the whole tie is in view."""
    scores = np.empty((len(queries), need), dtype=np.float32)
    ids = np.empty((len(queries), need), dtype=np.int64)
    pending, depth = np.arange(len(queries)), min(need + 1, index.ntotal)
    while len(pending):
        deep_scores, deep_ids = index.search(queries[pending], depth)
        order = np.lexsort((deep_ids, -deep_scores), axis=1)
        deep_scores, deep_ids = np.take_along_axis(deep_scores, order, 1), np.take_along_axis(deep_ids, order, 1)
        unresolved = (deep_scores[:, -1] == deep_scores[:, need - 1]) if depth < index.ntotal \
            else np.zeros(len(pending), dtype=bool)
        done = pending[~unresolved]
        scores[done], ids[done] = deep_scores[~unresolved, :need], deep_ids[~unresolved, :need]
        pending, depth = pending[unresolved], min(index.ntotal, depth * 2)
    return scores, ids


def relevance(query_labels, gallery_labels, indices) -> np.ndarray:
    """bool [Q, k]: the retrieved gallery item has the query's label (padding -1 and unknown labels never)."""
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    retrieved = np.where(indices >= 0, gallery_labels[np.clip(indices, 0, None)], -2)
    return (retrieved == query_labels[:, None]) & (query_labels[:, None] >= 0)


def relevant_counts(query_labels, gallery_labels, exclude_self=False) -> np.ndarray:
    """int [Q]: how many gallery items share each query's label (the query itself excluded if exclude_self)."""
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    values, counts = np.unique(gallery_labels[gallery_labels >= 0], return_counts=True)
    lookup = dict(zip(values.tolist(), counts.tolist()))
    total = np.array([lookup.get(label, 0) if label >= 0 else 0 for label in query_labels.tolist()], dtype=np.int64)
    return total - 1 if exclude_self else total


def precision_at_k(rel: np.ndarray, k: int) -> float:
    """Mean over queries of (relevant items in the top k) / k. Missing results (k > gallery) count as wrong."""
    return float(rel[:, :k].sum(1).mean() / k) if len(rel) else float("nan")


def recall_at_k(rel: np.ndarray, k: int, num_relevant: np.ndarray) -> float:
    """The original report's recall: (relevant items in the top k) / (all relevant items in the gallery),
    averaged over queries that have at least one relevant item (for the others it is 0/0)."""
    has = num_relevant > 0
    return float((rel[has, :k].sum(1) / num_relevant[has]).mean()) if has.any() else float("nan")


def accuracy_at_k(rel: np.ndarray, k: int) -> float:
    """Share of queries with at least one relevant item in the top k (metric learning's Recall@k)."""
    return float(rel[:, :k].any(1).mean()) if len(rel) else float("nan")


def map_at_r(rel: np.ndarray, num_relevant: np.ndarray) -> float:
    """MAP@R (Musgrave et al. 2020): for a query with R relevant gallery items,
    AP@R = (1/R) * sum_{i<=R} precision@i * rel_i over its top R results. ``rel`` must hold at least max(R)
    columns. Averaged over queries with R > 0."""
    has = num_relevant > 0
    if not has.any():
        return float("nan")
    rel, num_relevant = rel[has].astype(np.float64), num_relevant[has]
    width = int(num_relevant.max())
    if rel.shape[1] < width:
        raise ValueError(f"map@r needs the top {width} results, got {rel.shape[1]}")
    rel = rel[:, :width]
    ranks = np.arange(1, width + 1)
    within_r = ranks[None, :] <= num_relevant[:, None]
    precision_at_i = np.cumsum(rel, axis=1) / ranks
    return float(((precision_at_i * rel * within_r).sum(1) / num_relevant).mean())


def macro_precision_at_k(rel: np.ndarray, query_labels, k: int) -> float:
    """Mean over classes of the mean precision@k of that class's queries: every class weighs the same,
    however many products it has (the data set is very imbalanced)."""
    query_labels = np.asarray(query_labels)
    per_query = rel[:, :k].sum(1) / k
    classes = np.unique(query_labels[query_labels >= 0])
    return float(np.mean([per_query[query_labels == c].mean() for c in classes])) if len(classes) else float("nan")


def evaluate(query_embeddings, query_labels, gallery_embeddings, gallery_labels, exclude_self=False, k=5) -> dict:
    """Every metric of one protocol, from one exact search deep enough for MAP@R and the precision curve."""
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    num_relevant = relevant_counts(query_labels, gallery_labels, exclude_self)
    depth = int(max(k, CURVE_K, num_relevant.max(initial=0)))
    _, indices = search(query_embeddings, gallery_embeddings, depth, exclude_self)
    rel = relevance(query_labels, gallery_labels, indices)
    return {
        f"precision@{k}": precision_at_k(rel, k),
        f"recall@{k}": recall_at_k(rel, k, num_relevant),
        f"accuracy@{k}": accuracy_at_k(rel, k),
        "precision@1": precision_at_k(rel, 1),
        "map@r": map_at_r(rel, num_relevant),
        f"macro_precision@{k}": macro_precision_at_k(rel, query_labels, k),
        "num_queries": int(len(query_labels)),
        "num_gallery": int(len(gallery_labels) - int(exclude_self)),
        "precision_curve": [precision_at_k(rel, j) for j in range(1, CURVE_K + 1)],
        "by_class_size": precision_by_class_size(rel, query_labels, gallery_labels, k),
    }


def precision_by_class_size(rel: np.ndarray, query_labels, gallery_labels, k: int, edges=CLASS_SIZE_EDGES) -> list[dict]:
    """What macro precision weighs: classes grouped by how many gallery (training) items they have, with their
    share of classes and queries and their macro precision@k."""
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    per_query = rel[:, :k].sum(1) / k
    sizes = relevant_counts(query_labels, gallery_labels)
    bounds = [0, *edges, np.inf]
    rows = []
    for low, high in zip(bounds[:-1], bounds[1:]):
        inside = (sizes >= low) & (sizes < high) & (query_labels >= 0)
        classes = np.unique(query_labels[inside])
        if len(classes):
            rows.append({"gallery items per class": f"{low}-{int(high) - 1}" if high < np.inf else f"{low}+",
                         "classes": int(len(classes)), "queries": int(inside.sum()),
                         f"macro_precision@{k}": float(np.mean([per_query[query_labels == c].mean()
                                                                for c in classes]))})
    return rows


def leave_one_out_precision(embeddings, labels, k=5) -> float:
    """precision@k of every row against all other rows of the same split (used for model selection on val)."""
    _, indices = search(embeddings, embeddings, k, exclude_self=True)
    return precision_at_k(relevance(labels, labels, indices), k)


def exact_match_ranks(query_embeddings, target_embeddings) -> np.ndarray:
    """int [Q]: 0-based rank of target i among all targets for query i (query i's own match is target i), by inner
    product; an equal score ranks ahead only when its target comes first. Q x Q scores, computed in blocks."""
    queries = np.ascontiguousarray(query_embeddings, dtype=np.float32)
    targets = np.ascontiguousarray(target_embeddings, dtype=np.float32)
    if len(queries) != len(targets):
        raise ValueError("exact-match ranks need one target per query, in the same order")
    ranks = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), 1024):
        scores = queries[start:start + 1024] @ targets.T  # [B, Q]
        rows = np.arange(start, min(start + 1024, len(queries)))
        own = scores[rows - start, rows][:, None]
        ahead = (scores > own) | ((scores == own) & (np.arange(len(targets))[None, :] < rows[:, None]))
        ranks[rows] = ahead.sum(1)
    return ranks


def text_to_image(text_embeddings, photo_embeddings, query_labels, catalog_embeddings, catalog_labels, k=5) -> dict:
    """Text search measured two ways, as fashion retrieval benchmarks do: each product's name queries (1) the photos
    of the same split, where only its own photo counts (recall@1, recall@10, MRR), and (2) the whole catalog, where
    any photo of its article type counts (precision@k). Chance levels beside each."""
    ranks = exact_match_ranks(text_embeddings, photo_embeddings)
    count = len(ranks)
    query_labels, catalog_labels = np.asarray(query_labels), np.asarray(catalog_labels)
    _, indices = search(text_embeddings, catalog_embeddings, k)
    same_type = relevant_counts(query_labels, catalog_labels) / max(1, len(catalog_labels))
    return {
        "queries": int(count), "photos": int(count), "catalog": int(len(catalog_labels)),
        "recall@1": float(np.mean(ranks < 1)), "recall@10": float(np.mean(ranks < 10)),
        "mrr": float(np.mean(1.0 / (ranks + 1))), f"catalog_precision@{k}": precision_at_k(
            relevance(query_labels, catalog_labels, indices), k),
        "chance": {"recall@1": 1 / count, "recall@10": min(1.0, 10 / count),
                   "mrr": float(np.sum(1.0 / np.arange(1, count + 1)) / count),
                   f"catalog_precision@{k}": float(same_type.mean())},
    }
