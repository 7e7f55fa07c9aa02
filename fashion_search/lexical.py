"""Lexical search over the catalog's own words: BM25 (bm25s) over each item's text columns, stemmed (Snowball, through
PyStemmer), and the fusion of a lexical and a vector ranking (reciprocal rank fusion).

Words meet across the catalog's spellings: case and accents fold, a hyphen or space inside a word joins it
("t-shirt", "T Shirt" and "Tshirts" all become "tshirt"), and stems meet ("Wallets" and "wallet"). A query reaches the
engine as a list of tokens, never as text in its query language: no operator, quote or field name of the engine can
be written in a query. Words absent from the catalog are ignored."""
from __future__ import annotations

import re
import threading
import unicodedata

import numpy as np

# The catalog's fields that are not words about the product: its id, where its photo is, its place in a split.
NOT_WORDS = ("id", "photo", "split", "row", "score", "year")
# Two-letter and longer words (single letters carry nothing once "t-shirt" is joined); stop words dropped.
STOP_WORDS = frozenset("a an and for in of on or the to with by at from".split())
# Letters that a space or hyphen separates from the rest of a word that the catalog writes joined ("t shirt").
JOINED = re.compile(r"\b(t)[\s-]+(shirts?)\b")
TOKEN = re.compile(r"\w{2,}")
FUSION_K = 60  # reciprocal rank fusion's constant (Cormack et al. 2009): 1 / (FUSION_K + rank)
FUSION_DEPTH = 100  # each ranking is read this deep before a fusion (deeper for later pages of the app)
LEXICAL_WEIGHT = 1.0  # the lexical ranking's weight in a fusion, against 1 for the vector one, where none was chosen
# Beside a run: the lexical weight chosen on val for each kind of query with words, "text" (python -m
# fashion_search.cli.hybrid) and "composed" (python -m fashion_search.cli.composed); the app reads it.
WEIGHTS_FILE = "hybrid.json"
QUERY_KINDS = ("text", "composed")


def words(text: str) -> list[str]:
    """Text -> normalised, stemmed tokens."""
    text = unicodedata.normalize("NFKD", str(text).lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = JOINED.sub(r"\1\2", text)
    text = re.sub(r"(\w)-(\w)", r"\1\2", text)  # hyphenated words join: "t-shirt", "v-neck"
    return _stemmer().stemWords([t for t in TOKEN.findall(text) if t not in STOP_WORDS])


_PER_THREAD = threading.local()  # a PyStemmer stemmer is not thread-safe: one per thread, gone with its thread


def _stemmer():
    import Stemmer

    if not hasattr(_PER_THREAD, "stemmer"):
        _PER_THREAD.stemmer = Stemmer.Stemmer("english")
    return _PER_THREAD.stemmer


def item_text(record: dict) -> str:
    """The words of an item: every text field of its record but those that are not about the product."""
    return " ".join(str(value) for field, value in record.items()
                    if field not in NOT_WORDS and isinstance(value, str) and value)


class TextIndex:
    """BM25 over a fixed set of items (one version of a catalog: a new version gets a new index)."""

    def __init__(self, keys: list[str], records: list[dict]):
        import bm25s

        self.keys = list(keys)
        self.engine, self.vocabulary = None, set()
        if self.keys:  # (bm25s cannot index nothing: an empty catalog has no words)
            self.engine = bm25s.BM25()
            corpus = [words(item_text(record)) or ["\0"] for record in records]  # an item without words matches none
            self.engine.index(corpus, show_progress=False)
            self.vocabulary = set(self.engine.vocab_dict)

    def __len__(self):
        return len(self.keys)

    def search(self, text: str, depth: int, allowed: np.ndarray | None = None) -> list[tuple[str, float]]:
        """(key, BM25 score) of the ``depth`` best items with any of the query's words, best first; ``allowed``
        (bool [N], in key order): only those items."""
        tokens = [t for t in words(text) if t in self.vocabulary]
        if not tokens or not self.keys:
            return []
        depth = min(depth, len(self.keys))
        mask = None if allowed is None else np.asarray(allowed, dtype=np.float32)
        places, scores = self.engine.retrieve([tokens], k=depth, show_progress=False, weight_mask=mask)
        return [(self.keys[int(place)], float(score)) for place, score in zip(places[0], scores[0]) if score > 0]


def load_weights(run_dir) -> dict[str, float]:
    """Each kind's lexical weight from the run's hybrid.json; LEXICAL_WEIGHT where it has none or it cannot be read."""
    import json
    from pathlib import Path

    try:
        chosen = json.loads((Path(run_dir) / WEIGHTS_FILE).read_text())
    except (OSError, ValueError):
        chosen = {}
    weights = {}
    for kind in QUERY_KINDS:
        try:
            weight = float(chosen[kind]["lexical_weight"])
            weights[kind] = weight if 0 <= weight <= 100 else LEXICAL_WEIGHT
        except (KeyError, TypeError, ValueError):
            weights[kind] = LEXICAL_WEIGHT
    return weights


def save_weight(run_dir, kind: str, weight: float, chosen_on: str):
    """Record one kind's chosen weight in the run's hybrid.json, keeping the other kind's."""
    import json
    from pathlib import Path

    from fashion_search.files import atomic_write_json

    path = Path(run_dir) / WEIGHTS_FILE
    try:
        chosen = json.loads(path.read_text())
    except (OSError, ValueError):
        chosen = {}
    atomic_write_json(path, {**(chosen if isinstance(chosen, dict) else {}),
                             kind: {"lexical_weight": weight, "chosen_on": chosen_on}})


def rank_scores(keys: list[str]) -> list[tuple[str, float]]:
    """A lexical ranking's results as the app scores them: 1 / rank (its confidence map is fitted on these)."""
    return [(key, 1.0 / (rank + 1)) for rank, key in enumerate(keys)]


def fuse(rankings: list[list[str]], weights: list[float], k: int = FUSION_K) -> list[tuple[str, float]]:
    """Reciprocal rank fusion: each key scores sum(weight / (k + rank)) over the rankings it is in (rank from 1);
    best first, ties by first appearance."""
    scores: dict[str, float] = {}
    for ranking, weight in zip(rankings, weights):
        for rank, key in enumerate(ranking, 1):
            scores[key] = scores.get(key, 0.0) + weight / (k + rank)
    return sorted(scores.items(), key=lambda item: -item[1])
