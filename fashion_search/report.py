"""The comparison report (evaluation.py --report): one self-contained HTML file, photos inline, no script, nothing
fetched. The table and precision@k curves; a grid of the same queries for every run, each result framed right or
wrong (the query's article type or not) with its score and confidence; each run's most-confused type pairs; per-class
precision@5 of the best run against the pixel baseline; the reliability of each run's match confidence; and, for runs
with a text tower, product names as queries.

Every photo is read from the processed data and decoded through the gate (fashion_search.photos.pool)."""
from __future__ import annotations

import base64
import collections
import datetime
import html
import io
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fashion_search import calibration
from fashion_search.data import cell_bytes, encoded_images
from fashion_search.errors import QueryError
from fashion_search.metrics import CLASS_SIZE_EDGES, TOP_K, relevance, relevant_counts, search
from fashion_search.photos.pool import open_rgb

PER_BAND = 3  # grid queries per class-size band
HARDEST = 3  # and the best run's worst queries
CONFUSED_PAIRS = 5  # per run
TEXT_QUERIES = 4
THUMB = 96  # px, the long side of every photo in the report


@dataclass(frozen=True)
class Ranking:
    """One run's top-k for every query of the query split, against the gallery split."""
    name: str
    query_meta: pd.DataFrame  # rows of the query split (the dataset's own "row" and "articleType" among them)
    gallery_meta: pd.DataFrame
    indices: np.ndarray  # int [Q, k] places in gallery_meta
    scores: np.ndarray  # float [Q, k]
    relevant: np.ndarray  # bool [Q, k]: the result has the query's label
    confidence: np.ndarray | None  # float [Q, k] where the run is calibrated

    @property
    def per_query(self) -> np.ndarray:  # precision@k of each query
        return self.relevant.mean(1)


def rank(name, queries, query_meta, gallery, gallery_meta, fitted: dict | None = None, k: int = TOP_K) -> Ranking:
    scores, indices = search(queries, gallery, k)
    rel = relevance(query_meta["label"].to_numpy(), gallery_meta["label"].to_numpy(), indices)
    confidence = calibration.confidence(fitted, scores) if fitted else None
    return Ranking(name, query_meta.reset_index(drop=True), gallery_meta.reset_index(drop=True), indices, scores,
                   rel, confidence)


def choose_queries(rankings: list[Ranking], best: Ranking, seed: int = 0) -> list[int]:
    """Dataset rows of the query split that every run ranked: PER_BAND from each class-size band (seeded), then the
    HARDEST for the best run (lowest precision@k, then lowest top score)."""
    common = set(rankings[0].query_meta["row"])
    for ranking in rankings[1:]:
        common &= set(ranking.query_meta["row"])
    meta = best.query_meta
    eligible = meta["row"].isin(common).to_numpy() & (meta["label"].to_numpy() >= 0)
    sizes = relevant_counts(meta["label"].to_numpy(), best.gallery_meta["label"].to_numpy())
    rng = np.random.default_rng(seed)
    chosen = []
    bounds = [0, *CLASS_SIZE_EDGES, np.inf]
    for low, high in zip(bounds[:-1], bounds[1:]):
        band = np.flatnonzero(eligible & (sizes >= low) & (sizes < high))
        chosen += sorted(rng.choice(band, min(PER_BAND, len(band)), replace=False).tolist())
    order = np.lexsort((best.scores[:, 0], best.per_query))  # worst precision first, the least sure among equals
    chosen += [int(i) for i in order if eligible[i] and i not in chosen][:HARDEST]
    return [int(meta["row"].iloc[i]) for i in chosen]


def confused_pairs(ranking: Ranking, limit: int = CONFUSED_PAIRS) -> list[tuple[str, str, int, int]]:
    """(query type, the wrong type, how many of the query type's top-k results it filled, an example query's place):
    the pairs that fill most wrong results."""
    counts, example = collections.Counter(), {}
    query_types = ranking.query_meta["articleType"].to_numpy()
    result_types = ranking.gallery_meta["articleType"].to_numpy()[ranking.indices]
    for q in range(len(query_types)):
        wrong = collections.Counter(result_types[q][~ranking.relevant[q]])
        for other, n in wrong.items():
            counts[(query_types[q], other)] += n
            if n > example.get((query_types[q], other), (0, -1))[0]:
                example[(query_types[q], other)] = (n, q)
    return [(a, b, n, example[(a, b)][1]) for (a, b), n in counts.most_common(limit)]


class Photos:
    """Thumbnails of dataset rows, each encoded once and referred to by a CSS class (a photo shown ten times is
    stored once)."""

    def __init__(self, dataset):
        self.dataset, self.classes, self.styles, self.columns = dataset, {}, [], {}

    def __call__(self, split: str, row: int) -> str:
        key = (split, int(row))
        if key not in self.classes:
            self.classes[key] = f"p{len(self.classes)}"
            self.styles.append(f".{self.classes[key]}{{background-image:url(data:image/jpeg;base64,"
                               f"{self._thumbnail(split, int(row))})}}")
        return self.classes[key]

    def _thumbnail(self, split, row) -> str:
        if split not in self.columns:
            self.columns[split] = encoded_images(self.dataset[split].select_columns(["image"]))
        try:
            image = open_rgb(cell_bytes(self.columns[split][row]["image"]), max_side=THUMB)
        except QueryError:
            return ""  # an unreadable photo is an empty tile
        image.thumbnail((THUMB, THUMB))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
        return base64.b64encode(buffer.getvalue()).decode()

    def css(self) -> str:
        return "\n".join(self.styles)


def tile(photos: Photos, split: str, meta_row, caption: str, verdict: str = "") -> str:
    """One photo, whole (contain, not cover), framed right / wrong where it is a result."""
    title = html.escape(f"{meta_row.get('productDisplayName') or ''} (id {meta_row.get('id', '')})")
    return (f'<figure class="hit {verdict}" title="{title}"><div class="ph {photos(split, meta_row["row"])}"></div>'
            f"<figcaption>{caption}</figcaption></figure>")


def result_row(photos: Photos, ranking: Ranking, q: int, gallery_split: str, label: str) -> str:
    cells = []
    for j, place in enumerate(ranking.indices[q]):
        if place < 0:
            continue
        item = ranking.gallery_meta.iloc[int(place)]
        sure = f" · {ranking.confidence[q, j]:.0%}" if ranking.confidence is not None else ""
        caption = f"{html.escape(str(item['articleType']))}<br>{ranking.scores[q, j]:.3f}{sure}"
        cells.append(tile(photos, gallery_split, item, caption, "right" if ranking.relevant[q, j] else "wrong"))
    return (f'<div class="grid-row" data-run="{html.escape(ranking.name)}" data-precision="{ranking.per_query[q]:.4f}">'
            f'<div class="run">{html.escape(label)}<br>{ranking.per_query[q]:.2f}</div>{"".join(cells)}</div>')


def query_grid(photos: Photos, rankings: list[Ranking], rows: list[int], splits: tuple[str, str]) -> str:
    out = []
    for row in rows:
        first = rankings[0].query_meta
        query = first[first["row"] == row].iloc[0]
        out.append(f'<div class="query" data-row="{row}"><div class="grid-row">'
                   f'{tile(photos, splits[0], query, "query: " + html.escape(str(query["articleType"])))}</div>')
        for ranking in rankings:
            q = int(np.flatnonzero(ranking.query_meta["row"].to_numpy() == row)[0])
            out.append(result_row(photos, ranking, q, splits[1], ranking.name))
        out.append("</div>")
    return "\n".join(out)


def confusion_section(photos: Photos, rankings: list[Ranking], splits: tuple[str, str]) -> str:
    out = []
    for ranking in rankings:
        out.append(f"<h3>{html.escape(ranking.name)}</h3>")
        for query_type, other, n, q in confused_pairs(ranking):
            query = ranking.query_meta.iloc[q]
            out.append(f"<p>{html.escape(str(query_type))} → {html.escape(str(other))}: {n} wrong results</p>"
                       f'<div class="grid-row">{tile(photos, splits[0], query, "query")}</div>'
                       f"{result_row(photos, ranking, q, splits[1], 'example')}")
    return "\n".join(out)


def text_section(photos: Photos, text_runs: dict, splits: tuple[str, str], seed: int = 0) -> str:
    """Product names of the query split (seeded) searched among the gallery's photos: text_runs maps a run's name to
    (name embeddings [Q, D] row-aligned with query_meta, query_meta, gallery photo embeddings, gallery_meta)."""
    out = []
    for name, (texts, query_meta, gallery, gallery_meta) in text_runs.items():
        rng = np.random.default_rng(seed)
        picks = sorted(rng.choice(len(texts), min(TEXT_QUERIES, len(texts)), replace=False).tolist())
        scored = rank(name, texts[picks], query_meta.iloc[picks], gallery, gallery_meta)
        out.append(f"<h3>{html.escape(name)}</h3>")
        for q in range(len(picks)):
            words = html.escape(str(scored.query_meta.iloc[q]["productDisplayName"]))
            out.append(f'<p class="words">"{words}"</p>{result_row(photos, scored, q, splits[1], "top 5")}')
    return "\n".join(out)


def figure_png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return f'<img class="plot" alt="" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def per_class_chart(best: Ranking, baseline: Ranking | None) -> str:
    """Per-class precision@k as horizontal bars, worst classes of the best run first, the baseline beside them."""
    import matplotlib.pyplot as plt

    def by_class(ranking):
        frame = pd.DataFrame({"type": ranking.query_meta["articleType"], "p": ranking.per_query})
        return frame[ranking.query_meta["label"].to_numpy() >= 0].groupby("type")["p"].mean()

    ours = by_class(best).sort_values()
    figure, axis = plt.subplots(figsize=(7, 1 + 0.16 * len(ours)))
    places = np.arange(len(ours))
    axis.barh(places, ours.to_numpy(), height=0.4, label=best.name)
    if baseline is not None:
        axis.barh(places + 0.4, by_class(baseline).reindex(ours.index).to_numpy(), height=0.4, label=baseline.name)
    axis.set_yticks(places + 0.2, ours.index, fontsize=6)
    axis.invert_yaxis()
    axis.set_xlabel(f"precision@{best.indices.shape[1]}")
    axis.legend(loc="lower right")
    return figure_png(figure)


def reliability_chart(rankings: list[Ranking], fitted: dict) -> str:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 4.5))
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect")
    for ranking in rankings:
        if ranking.name in fitted:
            table = calibration.reliability(fitted[ranking.name], ranking.scores.ravel(), ranking.relevant.ravel())
            axis.plot([b["predicted"] for b in table], [b["observed"] for b in table], marker="o", label=ranking.name)
    axis.set_xlabel("predicted confidence")
    axis.set_ylabel("observed share of right results")
    axis.legend()
    return figure_png(figure)


STYLE = """body{font:14px system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th:first-child,td:first-child{text-align:left}
.query{margin:14px 0;padding:6px;border-top:2px solid #888}.grid-row{display:flex;gap:6px;align-items:flex-start}
.run{width:110px;font-size:12px;padding-top:30px}.hit{margin:0;width:104px;border:4px solid transparent}
.hit.right{border-color:#2a9d3a}.hit.wrong{border-color:#d3352f}figcaption{font-size:11px;text-align:center}
.ph{width:96px;height:96px;background:#fff center/contain no-repeat}.plot{max-width:100%}.words{font-style:italic}"""


def page(title: str, sections: list[tuple[str, str]], photos: Photos) -> str:
    body = "\n".join(f"<h2>{html.escape(heading)}</h2>\n{content}" for heading, content in sections)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}\n{photos.css()}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>written {stamp}; green frame: the query's article type, red: another.</p>\n{body}</body></html>\n")
