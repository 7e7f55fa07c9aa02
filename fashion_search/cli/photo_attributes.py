"""Photo search that sees colour, fitted on a clip.py run (fashion_search.attributes has the model): the colour model
is fitted on the train split's photos, the re-ranking's weights are chosen on val photos against the train gallery
(the best type-and-colour precision@5 whose type precision@5 stays within 0.01 of the embedding's alone), and test
photos are reported against the train gallery, before and after. The match confidence of re-ranked photo queries,
fitted on val, goes into RUN/calibration.json ("photo attributes"); the model goes to RUN/attributes.safetensors,
which the app reads.

Usage: python -m fashion_search.cli.photo_attributes RUN   (installed: fashion-attributes)
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fashion_search import attributes, calibration
from fashion_search.data import image_cache, load_processed
from fashion_search.errors import UserError, cli
from fashion_search.metrics import precision_at_k, relevance, search
from fashion_search.runs import load_split, trained_data

TAUS = (0.01, 0.02, 0.05)
WEIGHTS = (0.0, 0.05, 0.1, 0.2)  # each of the type and colour terms' weight against the cosine's 1
TYPE_SLACK = 0.01  # how much type precision@5 (on val) the colour may cost


@dataclass(frozen=True)
class AttributesConfig:
    """The flags, parsed once (their defaults and meaning: parse_config)."""
    run: str
    cache_dir: str


def parse_config(argv=None) -> AttributesConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a clip.py run (its embeddings and its data)")
    parser.add_argument("--cache-dir", default="data/cache", help="the decoded photos (data.image_cache)")
    return AttributesConfig(**vars(parser.parse_args(argv)))


def load_photos(run: Path, cache_dir: str) -> dict:
    """Each split's (embeddings, metadata, colour features), row-aligned."""
    dataset, _ = load_processed(trained_data(run))
    size = json.loads((run / "metrics.json").read_text())["image_size"]
    splits = {}
    for name in ("train", "val", "test"):
        vectors, meta = load_split(run, name)
        images, _ = image_cache(dataset[name], size, cache_dir)
        splits[name] = (vectors, meta, attributes.colour_features(images[meta["row"].to_numpy()]))
    return splits


def codes(*columns) -> np.ndarray:
    """Rows' values of one or more columns as one integer label each (metrics.relevance compares them)."""
    joined = ["\0".join(map(str, values)) for values in zip(*columns)]
    return np.unique(joined, return_inverse=True)[1]


class Protocol:
    """Query photos (val or test) against the train gallery: each query's first DEPTH results by cosine, and its
    type and type-and-colour precision@5 under any re-ranking."""

    def __init__(self, model, queries, gallery):
        (vectors, meta, features), (gallery_vectors, gallery_meta, _) = queries, gallery
        self.scores, self.indices = search(vectors, gallery_vectors, attributes.DEPTH)
        self.scores = np.where(self.indices >= 0, self.scores, -np.inf)
        safe = np.maximum(self.indices, 0)
        self.types = gallery_meta["articleType"].to_numpy(dtype=object)[safe]
        self.colours = gallery_meta["baseColour"].to_numpy(dtype=object)[safe]
        self.probabilities = model.colour_probabilities(features, vectors)
        both = [np.concatenate([m[c].astype(str).to_numpy() for m in (meta, gallery_meta)])
                for c in ("articleType", "baseColour")]
        labels, colour_labels = codes(both[0]), codes(*both)
        self.labels = {"type": (labels[:len(meta)], labels[len(meta):]),
                       "type and colour": (colour_labels[:len(meta)], colour_labels[len(meta):])}

    def combined(self, model) -> np.ndarray:
        return model.combined(self.scores, self.types, self.colours, self.probabilities)

    def precisions(self, model=None) -> dict:
        """type and type-and-colour precision@5 of the cosine ranking (model None) or of model's re-ranking."""
        order = np.argsort(-self.combined(model), 1, kind="stable") if model else slice(None)
        indices = self.indices if model is None else np.take_along_axis(self.indices, order, 1)
        return {f"{name} precision@5": round(precision_at_k(relevance(query, gallery, indices), 5), 4)
                for name, (query, gallery) in self.labels.items()}

    def top5_pairs(self, model) -> tuple[np.ndarray, np.ndarray]:
        """(scores, matches): each query's top 5 re-ranking scores and whether each shares its type (what the
        confidence is fitted on)."""
        combined = self.combined(model)
        order = np.argsort(-combined, 1, kind="stable")[:, :5]
        query, gallery = self.labels["type"]
        matches = relevance(query, gallery, np.take_along_axis(self.indices, order, 1))
        return np.take_along_axis(combined, order, 1).ravel(), matches.ravel()


def main(argv=None) -> dict:
    config = parse_config(argv)
    run = Path(config.run)
    started = time.perf_counter()
    splits = load_photos(run, config.cache_dir)
    feature_seconds = time.perf_counter() - started
    vectors, meta, features = splits["train"]
    if "baseColour" not in meta or "articleType" not in meta:
        raise UserError(f"{run}'s catalog has no baseColour or articleType column to learn from")
    started = time.perf_counter()
    fitted = attributes.fit(features, vectors, meta["baseColour"].to_numpy(dtype=object))
    fit_seconds = time.perf_counter() - started
    val = Protocol(fitted, splits["val"], splits["train"])
    base = val.precisions()
    on_val = {(tau, t, c): val.precisions(fitted.with_weights(t, c, tau))
              for tau, t, c in itertools.product(TAUS, WEIGHTS, WEIGHTS)}
    allowed = [key for key, p in on_val.items() if p["type precision@5"] >= base["type precision@5"] - TYPE_SLACK]
    tau, type_weight, colour_weight = max(allowed, key=lambda key: (on_val[key]["type and colour precision@5"],
                                                                      on_val[key]["type precision@5"]))
    model = fitted.with_weights(type_weight, colour_weight, tau)
    test = Protocol(model, splits["test"], splits["train"])
    report = {"protocol": "photos of unseen products (test) against the train gallery",
              "chosen on val": {"tau": tau, "type weight": type_weight, "colour weight": colour_weight},
              "val": {"cosine": base, "re-ranked": on_val[(tau, type_weight, colour_weight)]},
              "test": {"cosine": test.precisions(), "re-ranked": test.precisions(model)},
              "colour classes": len(model.colours),
              "seconds": {"colour features (all splits)": round(feature_seconds, 1),
                          "colour model fit": round(fit_seconds, 1)}}
    calibration.save_kinds(run, {"photo attributes": calibration.fit(*val.top5_pairs(model))})
    attributes.save(model, run, {"chosen_on": "val photos (python -m fashion_search.cli.photo_attributes)",
                                 "test": report["test"]})
    print(json.dumps(report, indent=1))
    return report


def command():  # fashion-attributes, python -m fashion_search.cli.photo_attributes
    cli(main)


if __name__ == "__main__":
    command()
