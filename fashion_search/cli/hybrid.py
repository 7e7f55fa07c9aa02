"""Hybrid text search measured on a clip.py run (fashion_search.shoppers has the protocol): shopper-style queries
from val products choose the lexical ranking's weight in the fusion, those from test products are reported for the
vector, lexical and hybrid rankings, per template; the product-name protocol (text -> image recall@10) for each;
and the match confidence of hybrid and lexical text queries, fitted on val, goes into RUN/calibration.json. The
chosen weight goes to RUN/hybrid.json ("text"), which the app reads.

Usage: python -m fashion_search.cli.hybrid RUN [--queries 400]   (installed: fashion-hybrid)
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fashion_search import calibration, shoppers
from fashion_search.errors import cli
from fashion_search.lexical import FUSION_DEPTH, rank_scores, save_weight
from fashion_search.metrics import search
from fashion_search.runs import load_split
from fashion_search.runtime import add_device_arg, positive_int

WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # the lexical ranking's weight against the vector one's 1


@dataclass(frozen=True)
class HybridConfig:
    """The flags, parsed once (their defaults and meaning: parse_config)."""
    run: str
    device: str
    queries: int
    seed: int


def parse_config(argv=None) -> HybridConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a clip.py run with a usable text tower")
    add_device_arg(parser)
    parser.add_argument("--queries", type=positive_int, default=400, help="queries per template and split")
    parser.add_argument("--seed", type=int, default=0)
    return HybridConfig(**vars(parser.parse_args(argv)))


def embed_texts(encoder, texts: list[str]) -> np.ndarray:
    return np.stack([encoder.embed_text(text) for text in texts]).astype(np.float32)


def name_protocol(run: Path, test, test_meta, weight: float) -> dict:
    """Each test product's name against the test photos, where only its own photo counts: recall@10 for each
    ranking. The lexical side reads every column but the names (else it finds each name trivially)."""
    names = np.load(run / "embeddings" / "text_test.npy")
    index = shoppers.gallery_index(test_meta, without=("productDisplayName",))
    _, vector = search(names, test, FUSION_DEPTH)
    lexical = [[int(key) for key, _ in index.search(name, FUSION_DEPTH)] for name in test_meta["productDisplayName"]]
    hybrid = [[place for place, _ in shoppers.fuse_places(v, w, weight)] for v, w in zip(vector, lexical)]
    recall = {mode: round(float(np.mean([own in list(ranking)[:10] for own, ranking in enumerate(lists)])), 4)
              for mode, lists in (("vector", vector), ("lexical", lexical), ("hybrid", hybrid))}
    return {"protocol": "test product names -> test photos (own photo), recall@10", **recall}


def top5_pairs(prepared: dict, weight: float, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(scores, matches) of every query's top 5 in one ranking, scored as the app scores it: what its confidence is
    fitted on."""
    scores, matches = [], []
    for vector, lexical, rel in zip(prepared["vector"], prepared["lexical"], prepared["relevance"]):
        top = shoppers.fuse_places(vector, lexical, weight)[:5] if mode == "hybrid" else rank_scores(lexical[:5])
        scores += [score for _, score in top]
        matches += [bool(rel[int(place)]) for place, _ in top]
    return np.asarray(scores), np.asarray(matches)


def main(argv=None) -> dict:
    from fashion_search.serving.encoder import run_encoder

    config = parse_config(argv)
    run = Path(config.run)
    encoder = run_encoder(run, config.device, text=True)
    (gallery, gallery_meta), (_, val_meta), (test, test_meta) = (load_split(run, s) for s in ("train", "val", "test"))
    started = time.perf_counter()
    index = shoppers.gallery_index(gallery_meta)
    index_seconds = time.perf_counter() - started
    val_queries = shoppers.make_queries(val_meta, config.queries, config.seed)
    test_queries = shoppers.make_queries(test_meta, config.queries, config.seed + 1)
    val_vectors = embed_texts(encoder, [q["text"] for q in val_queries])
    test_vectors = embed_texts(encoder, [q["text"] for q in test_queries])
    val = shoppers.prepare(val_queries, val_vectors, gallery, gallery_meta, index)
    on_val = {w: shoppers.protocol(val, w)["hybrid"]["all"] for w in WEIGHTS}
    weight = max(WEIGHTS, key=lambda w: (on_val[w]["precision@5"], on_val[w]["success@5"]))
    test_prepared = shoppers.prepare(test_queries, test_vectors, gallery, gallery_meta, index)
    report = {"lexical weight (chosen on val)": weight,
              "val, hybrid by weight": {str(w): figures for w, figures in on_val.items()},
              "test": shoppers.protocol(test_prepared, weight),
              "names": name_protocol(run, test, test_meta, weight),
              "text index": {"items": len(index), "build seconds": round(index_seconds, 2)},
              "examples": [q["text"] for q in test_queries[::max(1, len(test_queries) // 12)]]}
    calibration.save_kinds(run, {f"text {mode}": calibration.fit(*top5_pairs(val, weight, mode))
                                 for mode in ("hybrid", "lexical")})
    save_weight(run, "text", weight, "val shopper queries (python -m fashion_search.cli.hybrid)")
    print(json.dumps(report, indent=1))
    return report


def command():  # fashion-hybrid, python -m fashion_search.cli.hybrid
    cli(main)


if __name__ == "__main__":
    command()
