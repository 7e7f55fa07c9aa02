"""Shopper-style text queries from held-out products, and how each ranking (vector, lexical, hybrid) answers them.

A query is made from one product of the query split with a template naming some of its attributes: its type
("wallet"), colour and type ("black wallet"), colour, type and gender ("red t-shirt for men"), or brand and type
("puma sports shoe"; the brand is its name's first word). It is phrased as shoppers write: lower case, the type
singular, hyphen variants. A gallery item is relevant when its columns match every attribute the query names. The
gallery is the train split (the query's own product is never in it). Figures: precision@5, NDCG@10, and success@5
(the share of queries with a relevant item in the top 5)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from fashion_search.lexical import FUSION_DEPTH, TextIndex, fuse
from fashion_search.metrics import search

TEMPLATES = ("type", "colour + type", "colour + type + gender", "brand + type")
PLURAL_ONLY = {"jeans", "shorts", "trousers", "leggings", "sunglasses", "pants", "capris", "briefs", "boxers",
               "trunk", "tights", "jeggings", "flip flops", "churidar", "salwar", "patiala", "stockings",
               "lounge pants", "track pants", "innerwear vests", "rain trousers", "swimwear", "nightdress", "headband"}
GENDER_WORDS = {"Men": "for men", "Women": "for women", "Boys": "for boys", "Girls": "for girls", "Unisex": "unisex"}


def type_words(article: str, rng) -> str:
    """A type as a shopper writes it: lower case, singular ("Casual Shoes" -> "casual shoe"), "Tshirts" as t-shirt
    or tshirt."""
    words = article.lower()
    if words not in PLURAL_ONLY and words.endswith(("ches", "shes", "sses", "xes")):
        words = words[:-2]  # watches, clutches, dresses, boxes
    elif words not in PLURAL_ONLY and words.endswith("s") and not words.endswith("ss"):
        words = words[:-1]
    if words.startswith("tshirt"):
        words = ("t-shirt", "tshirt", "t shirt")[rng.integers(3)] + words[6:]
    return words


def brand(name) -> str:
    return str(name or "").split(" ")[0]


def make_queries(meta: pd.DataFrame, per_template: int, seed: int) -> list[dict]:
    """Up to per_template queries of each template from the products of ``meta`` (seeded): each {"template",
    "text", "attributes": {column: value}}."""
    rng = np.random.default_rng(seed)
    queries = []
    for template in TEMPLATES:
        for place in rng.permutation(len(meta)):
            if sum(q["template"] == template for q in queries) >= per_template:
                break
            row = meta.iloc[int(place)]
            article, colour, gender = row.get("articleType"), row.get("baseColour"), row.get("gender")
            if not article or (("colour" in template) and not colour) or ("gender" in template and
                                                                             gender not in GENDER_WORDS):
                continue
            kind = type_words(article, rng)
            attributes = {"articleType": article}
            if template == "type":
                text = kind
            elif template == "colour + type":
                text, attributes["baseColour"] = f"{colour.lower()} {kind}", colour
            elif template == "colour + type + gender":
                text = f"{colour.lower()} {kind} {GENDER_WORDS[gender]}"
                attributes.update(baseColour=colour, gender=gender)
            else:
                name = brand(row.get("productDisplayName"))
                if not name:
                    continue
                text, attributes["brand"] = f"{name.lower()} {kind}", name
            queries.append({"template": template, "text": text, "attributes": attributes})
    return queries


def relevant(attributes: dict, gallery: pd.DataFrame) -> np.ndarray:
    """bool [N]: the gallery items whose columns match every attribute the query names."""
    match = np.ones(len(gallery), dtype=bool)
    for column, value in attributes.items():
        values = gallery["productDisplayName"].map(brand) if column == "brand" else gallery[column]
        match &= (values == value).to_numpy()
    return match


def figures(rankings: list[np.ndarray], relevance: list[np.ndarray]) -> dict:
    """precision@5, NDCG@10 and success@5 over queries: rankings are gallery places, best first."""
    precision, ndcg, success = [], [], []
    discounts = 1 / np.log2(np.arange(2, 12))
    for ranking, rel in zip(rankings, relevance):
        hits = rel[ranking[:10]] if len(ranking) else np.zeros(0, dtype=bool)
        precision.append(hits[:5].sum() / 5)
        success.append(bool(hits[:5].any()))
        ideal = discounts[:min(10, int(rel.sum()))].sum()
        ndcg.append(float((hits * discounts[:len(hits)]).sum() / ideal) if ideal else 0.0)
    return {"precision@5": round(float(np.mean(precision)), 4), "ndcg@10": round(float(np.mean(ndcg)), 4),
            "success@5": round(float(np.mean(success)), 4), "queries": len(rankings)}


def fuse_places(vector: np.ndarray, lexical: np.ndarray, lexical_weight: float) -> list[tuple[int, float]]:
    """Two rankings of gallery places fused as the app fuses them: (place, fusion score), best first."""
    fused = fuse([[str(i) for i in vector if i >= 0], [str(i) for i in lexical]], [1.0, lexical_weight])
    return [(int(key), score) for key, score in fused[:FUSION_DEPTH]]


def prepare(queries: list[dict], text_vectors: np.ndarray, gallery: np.ndarray, gallery_meta: pd.DataFrame,
            index: TextIndex) -> dict:
    """What every weight's figures share, computed once: each query's vector and lexical rankings (gallery places,
    best first, FUSION_DEPTH deep) and which gallery items are relevant to it."""
    _, vector = search(text_vectors, gallery, FUSION_DEPTH)
    place = {key: i for i, key in enumerate(index.keys)}
    lexical = [np.asarray([place[key] for key, _ in index.search(q["text"], FUSION_DEPTH)], dtype=np.int64)
               for q in queries]
    return {"queries": queries, "vector": [v[v >= 0] for v in vector], "lexical": lexical,
            "relevance": [relevant(q["attributes"], gallery_meta) for q in queries]}


def protocol(prepared: dict, lexical_weight: float) -> dict:
    """Each mode's figures on each template and on all queries together."""
    queries, relevance = prepared["queries"], prepared["relevance"]
    hybrid = [np.asarray([p for p, _ in fuse_places(v, w, lexical_weight)], dtype=np.int64)
              for v, w in zip(prepared["vector"], prepared["lexical"])]
    report = {}
    for mode, lists in (("vector", prepared["vector"]), ("lexical", prepared["lexical"]), ("hybrid", hybrid)):
        report[mode] = {template: figures([r for r, q in zip(lists, queries) if q["template"] == template],
                                          [r for r, q in zip(relevance, queries) if q["template"] == template])
                        for template in TEMPLATES}
        report[mode]["all"] = figures(lists, relevance)
    return report


def gallery_index(gallery_meta: pd.DataFrame, without=()) -> TextIndex:
    """The lexical index of the gallery's records, keyed by place ("0", "1", ...); ``without``: columns left out."""
    records = gallery_meta.drop(columns=[c for c in ("row", "split", "label", *without) if c in gallery_meta])
    return TextIndex([str(i) for i in range(len(gallery_meta))], records.to_dict("records"))
