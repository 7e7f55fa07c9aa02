"""Composed retrieval ("like this photo, but in red") measured on this data, as FashionIQ and CIRR do on theirs, and
the match confidence of each kind of query (photo, text, composed) fitted on the val split.

The protocol. A query is a photo of the query split (type T, colour C) plus the word for another colour C2, where the
train gallery holds at least MIN_TARGETS items of type T in colour C2 (one C2 per photo, drawn with a fixed seed).
Success@5 is the share of the top 5 that have type T and colour C2. Baselines, in the same run: the photo alone, the
colour word alone, and the text "C2 T" (which names the type in words: a stronger reference than a shopper gives).
The composed query is the weighted sum of the unit embeddings, made unit again: photo + w * word, with w chosen on
val.

Usage: python -m fashion_search.cli.composed RUN [--no-combiner]   (prints the protocol's figures on val and test,
trains the combiner (fashion_search.combiner) beside the run, and fits the text and composed calibrations into
RUN/calibration.json)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fashion_search import calibration
from fashion_search import combiner as combiners
from fashion_search.lexical import save_weight
from fashion_search.metrics import TOP_K, search

MIN_TARGETS = 5
MAX_QUERIES = 2000
WEIGHTS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)


def colour_queries(query_meta, gallery_meta, seed=0, limit=MAX_QUERIES, min_targets=MIN_TARGETS
                   ) -> list[tuple[int, str, str]]:
    """(query row, type T, target colour C2) for photos with a type and colour, C2 != their colour drawn among those
    with at least MIN_TARGETS gallery items of type T."""
    targets = combiners.colour_targets(gallery_meta, min_targets)
    rng = np.random.default_rng(seed)
    queries = []
    for row, (article, colour) in enumerate(zip(query_meta["articleType"], query_meta["baseColour"])):
        other = combiners.other_colour(targets, article, colour, rng)
        if other is not None:
            queries.append((row, article, other))
    if len(queries) > limit:
        queries = [queries[i] for i in sorted(rng.choice(len(queries), limit, replace=False))]
    return queries


def word(colour: str) -> str:
    return colour.lower()


def phrase(colour: str, article: str) -> str:
    return f"{colour} {article}".lower()


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def matches(indices: np.ndarray, gallery_meta, queries) -> tuple[np.ndarray, np.ndarray]:
    """(type T in colour C2, type T) of each result, bool [Q, k] (a place < 0, no result, is neither)."""
    found = indices >= 0
    types = gallery_meta["articleType"].to_numpy()[indices]
    colours = gallery_meta["baseColour"].to_numpy()[indices]
    same_type = found & (types == np.asarray([article for _, article, _ in queries])[:, None])
    return same_type & (colours == np.asarray([colour for _, _, colour in queries])[:, None]), same_type


def success(indices: np.ndarray, gallery_meta, queries) -> tuple[float, float]:
    """(success@5: share of the top TOP_K with type T and colour C2, share with type T) over the queries."""
    hit, same_type = matches(indices, gallery_meta, queries)
    return float(hit.mean()), float(same_type.mean())


def protocol_vectors(queries, photos: np.ndarray, embed_text) -> dict[str, np.ndarray]:
    """The unit vectors of each query's parts: photo, word, phrase ("C2 T"). embed_text: text -> unit vector."""
    cache = {}

    def text(value):
        if value not in cache:
            cache[value] = embed_text(value)
        return cache[value]
    return {"photo": photos[[row for row, _, _ in queries]],
            "word": np.stack([text(word(colour)) for _, _, colour in queries]),
            "phrase": np.stack([text(phrase(colour, article)) for _, article, colour in queries])}


def figures(parts: dict, gallery: np.ndarray, gallery_meta, queries, weight: float) -> dict:
    """success@5 and the type-T share of every query form, at one weight."""
    forms = {"photo alone": parts["photo"], "colour word alone": parts["word"], '"C2 T" text': parts["phrase"],
             "composed": unit(parts["photo"] + weight * parts["word"])}
    out = {}
    for name, vectors in forms.items():
        _, indices = search(np.ascontiguousarray(vectors, dtype=np.float32), gallery, TOP_K)
        hit, same_type = success(indices, gallery_meta, queries)
        out[name] = {"success@5": round(hit, 4), "type T share": round(same_type, 4)}
    return out


def choose_weight(parts, gallery, gallery_meta, queries) -> tuple[float, dict]:
    """The weight with the best composed success@5 on these (val) queries, and success@5 at every weight."""
    scores = {}
    for weight in WEIGHTS:
        vectors = unit(parts["photo"] + weight * parts["word"])
        _, indices = search(np.ascontiguousarray(vectors, dtype=np.float32), gallery, TOP_K)
        scores[weight] = round(success(indices, gallery_meta, queries)[0], 4)
    return max(scores, key=scores.get), scores


def colour_evidence(run_dir, train, train_meta) -> dict:
    """Photo-to-photo search, test against train: the share of the top 5 with the query's colour, with its type, and
    with both, beside the colour share a search blind to colour would get (the query type's own colour mix)."""
    from fashion_search.runs import load_split

    photos, meta = load_split(run_dir, "test")
    _, indices = search(np.ascontiguousarray(photos, dtype=np.float32), train, TOP_K)
    colours = train_meta["baseColour"].to_numpy()[indices]
    types = train_meta["articleType"].to_numpy()[indices]
    same_colour = colours == meta["baseColour"].to_numpy()[:, None]
    same_type = types == meta["articleType"].to_numpy()[:, None]
    mix = train_meta.groupby("articleType")["baseColour"].value_counts(normalize=True)
    blind = np.mean([mix.get((article, colour), 0.0) for article, colour in zip(meta["articleType"],
                                                                                 meta["baseColour"])])
    return {"colour precision@5": round(float(same_colour.mean()), 4),
            "type precision@5": round(float(same_type.mean()), 4),
            "type and colour precision@5": round(float((same_colour & same_type).mean()), 4),
            "colour precision@5 of a colour-blind search within the right type": round(float(blind), 4)}


def run_protocol(run_dir, embed_text, train_combiner: bool = True, combiner_epochs: int = 12,
                 min_targets: int = MIN_TARGETS) -> dict:
    """The protocol on val (weight chosen) and test; with ``train_combiner``, the combiner too (fitted on train
    triplets, its epochs chosen on val, saved beside the run). Then the text and composed calibrations, fitted on val,
    are written into the run's calibration.json under "kinds" (composed: of the form the app uses, the combiner where
    there is one), with their test reliability."""
    from fashion_search.runs import load_split

    run_dir = Path(run_dir)
    train, train_meta = load_split(run_dir, "train")
    report, kinds, by_split = {}, {}, {}
    for split in ("val", "test"):
        photos, meta = load_split(run_dir, split)
        queries = colour_queries(meta, train_meta, min_targets=min_targets)
        if not queries:
            raise ValueError(f"the {split} split has no composed query: no type has {min_targets}+ train photos in "
                             f"another colour")
        by_split[split] = (queries, protocol_vectors(queries, photos, embed_text))
    val_queries, val_parts = by_split["val"]
    weight, by_weight = choose_weight(val_parts, train, train_meta, val_queries)
    report["weight (chosen on val)"] = weight
    report["val success@5 by weight"] = by_weight
    for split, (queries, parts) in by_split.items():
        report[split] = {"queries": len(queries), **figures(parts, train, train_meta, queries, weight)}

    def composed_vectors(parts, model):
        if model is None:
            return unit(parts["photo"] + weight * parts["word"])
        return combiners.combine(model, parts["photo"], parts["word"])

    model = None
    if train_combiner:
        colours = sorted({c for c in train_meta["baseColour"] if c})
        words = {colour: embed_text(word(colour)) for colour in colours}

        def val_check(candidate):
            vectors = combiners.combine(candidate, val_parts["photo"], val_parts["word"])
            _, indices = search(np.ascontiguousarray(vectors, dtype=np.float32), train, TOP_K)
            return success(indices, train_meta, val_queries)[0]
        model, log = combiners.fit(train, train_meta, words, val_check, epochs=combiner_epochs,
                                   min_targets=min_targets)
        for split, (queries, parts) in by_split.items():
            _, indices = search(np.ascontiguousarray(composed_vectors(parts, model), dtype=np.float32), train, TOP_K)
            hit, same_type = success(indices, train_meta, queries)
            report[split]["composed (combiner)"] = {"success@5": round(hit, 4), "type T share": round(same_type, 4)}
        combiners.save(model, run_dir, {"fitted_on": "train-split triplets (photo, colour word, train photos of its "
                                        "type and gender in that colour)", "epochs": log,
                                        "val success@5": max(entry["val success@5"] for entry in log)})
        report["combiner epochs"] = log

    hybrid = hybrid_form(by_split, train, train_meta, composed_vectors, model)
    for split in ("val", "test"):
        report[split]["composed (hybrid: and the colour word in the catalog's text)"] = hybrid[split]["figures"]
    report["hybrid lexical weight (chosen on val)"] = hybrid["weight"]
    save_weight(run_dir, "composed", hybrid["weight"], "val composed queries (python -m fashion_search.cli.composed)")
    kinds["composed hybrid"] = calibration.fit(*hybrid["val"]["pairs"])
    kinds["composed hybrid"]["fitted_on"] = ("top-5 results of the val split's composed queries ranked hybrid (the "
                                             "vector ranking fused with the colour word's BM25 ranking)")

    def pairs(split):
        queries, parts = by_split[split]
        scores, indices = search(np.ascontiguousarray(composed_vectors(parts, model), dtype=np.float32), train, TOP_K)
        return scores.ravel(), matches(indices, train_meta, queries)[0].ravel()
    kinds["composed"] = calibration.fit(*pairs("val"))
    kinds["composed"]["fitted_on"] = ("top-5 results of the val split's composed queries (photo + colour word, "
                                      f"{'the combiner' if model else f'weight {weight}'}) against the train split; a "
                                      "match has type T in colour C2")
    report["composed reliability on test"] = calibration.reliability(kinds["composed"], *pairs("test"))
    report["photo-to-photo on test (does the image embedding carry colour?)"] = colour_evidence(run_dir, train,
                                                                                             train_meta)
    text_paths = {split: run_dir / "embeddings" / f"text_{split}.npy" for split in ("val", "test")}
    if all(path.exists() for path in text_paths.values()):
        text_pairs = {}
        for split, path in text_paths.items():
            _, meta = load_split(run_dir, split)
            text_pairs[split] = calibration.result_pairs(np.load(path), meta["label"], train, train_meta["label"])
        kinds["text"] = calibration.fit(*text_pairs["val"])
        kinds["text"]["fitted_on"] = ("top-5 results of the val split's product names (text queries) against the "
                                      "train split's photos; a match shares the named product's article type")
        report["text reliability on test"] = calibration.reliability(kinds["text"], *text_pairs["test"])
    calibration.save_kinds(run_dir, kinds)  # the kinds other commands fitted (the hybrid text ones) stay
    return report


HYBRID_WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0)


def hybrid_form(by_split, train, train_meta, composed_vectors, model) -> dict:
    """The composed query ranked as the app's hybrid mode ranks it: the composed vector's ranking fused with the BM25
    ranking of the colour word over the train split's text, the lexical weight chosen on val. Per split: its figures
    and the (score, match) pairs of its top 5; and the weight."""
    from fashion_search.lexical import FUSION_DEPTH
    from fashion_search.shoppers import fuse_places, gallery_index

    index = gallery_index(train_meta)
    lexical = {colour: np.asarray([int(key) for key, _ in index.search(word(colour), FUSION_DEPTH)], dtype=np.int64)
               for colour in {colour for queries, _ in by_split.values() for _, _, colour in queries}}
    semantic = {split: search(np.ascontiguousarray(composed_vectors(parts, model), dtype=np.float32), train,
                              FUSION_DEPTH)[1] for split, (_, parts) in by_split.items()}  # once, for every weight

    def ranked(split, weight):
        queries = by_split[split][0]
        tops = [fuse_places(vector, lexical[colour], weight)[:TOP_K]
                for (_, _, colour), vector in zip(queries, semantic[split])]
        indices = np.asarray([[place for place, _ in top] + [-1] * (TOP_K - len(top)) for top in tops])
        scores = np.asarray([[score for _, score in top] + [0.0] * (TOP_K - len(top)) for top in tops])
        hit, same_type = matches(indices, train_meta, queries)
        found = indices >= 0
        figures = {"success@5": round(float(hit.mean()), 4), "type T share": round(float(same_type.mean()), 4)}
        return {"figures": figures, "pairs": (scores[found], hit[found])}

    on_val = {w: ranked("val", w) for w in HYBRID_WEIGHTS}
    weight = max(HYBRID_WEIGHTS, key=lambda w: on_val[w]["figures"]["success@5"])
    return {"weight": weight, "val": on_val[weight], "test": ranked("test", weight)}
