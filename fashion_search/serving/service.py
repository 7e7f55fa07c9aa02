"""The search service: everything the page and the API do, without Gradio."""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from fashion_search import calibration
from fashion_search.metrics import TOP_K
from fashion_search.serving.catalog import Catalog
from fashion_search.serving.encoder import Encoder
from fashion_search.errors import QueryError
from fashion_search.serving.fetch import TOTAL_TIMEOUT, Deadline, fetch_url
from fashion_search.photos.pool import open_rgb
from fashion_search.lexical import LEXICAL_WEIGHT, QUERY_KINDS
from fashion_search.serving import gate
from fashion_search.serving.query import MAX_K, Part, Query, from_text, parse_mode

# A result whose calibrated confidence is below this is not a close match (app.py --min-confidence).
MIN_CONFIDENCE = 0.5
GALLERY_SIDE = 256  # catalog photos are shown at most about this size (the gallery's tiles are smaller)


def shown(results) -> list[dict]:
    """Results handed back by the page's client (its gallery and details are drawn from them), checked as
    anything from outside: a list of at most MAX_K records, each with an id, and a score and confidence that are
    numbers. QueryError otherwise."""
    if not isinstance(results, list) or len(results) > MAX_K:
        raise QueryError(f"results are a list of at most {MAX_K} records")
    for record in results:
        if not isinstance(record, dict) or "id" not in record or any(
                not isinstance(record.get(field, 0.0), (int, float)) or isinstance(record.get(field), bool)
                or not math.isfinite(record.get(field, 0.0)) for field in ("score", "confidence")):
            raise QueryError("each result is a record with an id, a score and a confidence")
    return results


def read_upload(path) -> bytes:
    if not path:
        raise QueryError("upload a photo first")
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise QueryError(f"cannot read the upload ({exc.strerror})") from None


class SearchService:
    """Everything the page and the API do, without Gradio: each query returns the top results as records."""

    def __init__(self, encoder: Encoder, catalog: Catalog, model_name: str, allow_private_urls=False,
                 calibration: dict | None = None, min_confidence: float = MIN_CONFIDENCE, combiner=None,
                 lexical_weights: dict | None = None, attributes=None):
        self.encoder, self.catalog, self.model_name = encoder, catalog, model_name
        self.attributes = attributes  # fashion_search.attributes.AttributeModel: photo searches that see colour
        # the catalog's words against the embedding in hybrid rankings, per kind of query (lexical.load_weights)
        self.lexical_weights = lexical_weights or {kind: LEXICAL_WEIGHT for kind in QUERY_KINDS}
        self.combiner = combiner  # fashion_search.combiner.Combiner, for "this photo + words"
        self.allow_private_urls = allow_private_urls
        self.calibration, self.min_confidence = calibration, min_confidence
        self._photos = tempfile.TemporaryDirectory(prefix="fashion-search-photos-")  # removed with the service

    @property
    def filter_columns(self) -> list[str]:
        """Every column this catalog can be filtered by (the JSON API's filters)."""
        return self.catalog.filter_columns

    @property
    def page_columns(self) -> list[str]:
        """The page's filters, in the order the page and the Gradio API take their values."""
        return self.catalog.page_columns

    def filters(self, *values):
        return dict(zip(self.page_columns, values))

    def page_query(self, kind: str, value, values, offset=0) -> list[dict]:
        """A one-part query of the page or its Gradio API (the page's filters, positional, then for words the
        mode), through the one search path every route takes (``run``): five results from ``offset``,
        near-duplicates folded."""
        filters, mode = self.page_values(values)
        return self.run(Query((Part(kind, value),), self.filters(*filters), offset=offset, mode=mode))

    def page_values(self, values) -> tuple[tuple, str]:
        """(the page's filters, the mode) of a page event's positional values: the filters, then the mode where
        the event has one."""
        count = len(self.page_columns)
        return tuple(values[:count]), parse_mode(values[count] if len(values) > count else None)

    def rank(self, vector, filters: dict | None = None, k=TOP_K, offset=0, kind="photo", collapse=False,
             pixels=None) -> list[dict]:
        """Results offset to offset + k for an embedding, each with its match confidence where the run is calibrated
        for this kind of query (photo, text, composed): ``confidence`` (how likely it shares the query's article
        type) and ``close_match`` (confidence at least min_confidence). With ``collapse``, near-duplicates of a
        result are folded into it (``duplicates``: their ids). A photo's ``pixels`` (uint8 [3, S, S]) re-rank the
        results by the type and colour they predict where the run has an attribute model (kind "photo
        attributes")."""
        if pixels is None or self.attributes is None:
            return self.confident(self.catalog.search(vector, filters, k, offset, collapse), kind)
        from fashion_search.attributes import Reranker, colour_features

        probabilities = self.attributes.colour_probabilities(colour_features(pixels[None]), vector[None])[0]
        results = self.catalog.search(vector, filters, k, offset, collapse, Reranker(self.attributes, probabilities))
        return self.confident(results, "photo attributes")

    def confident(self, results: list[dict], kind: str) -> list[dict]:
        """The results with their confidence where the run is calibrated for this kind of query."""
        fitted = calibration.for_kind(self.calibration, kind)
        if fitted is not None and results:
            for record, value in zip(results, calibration.confidence(fitted, [r["score"] for r in results])):
                record["confidence"] = round(float(value), 3)
                record["close_match"] = bool(value >= self.min_confidence)
        return results

    def close_match(self, results) -> bool | None:
        """Whether any result is a close match; None where the run has no calibration to tell."""
        if not results or "close_match" not in results[0]:
            return None
        return any(record["close_match"] for record in results)

    def answer(self, results) -> dict:
        """The JSON routes' answer to one query: its results, and whether any is a close match where the run can
        tell."""
        close = self.close_match(results)
        return {"results": results} if close is None else {"results": results, "close_match": close}

    def search_image_bytes(self, data: bytes, *filters, offset=0):
        return self.page_query("photo", data, filters, offset)

    def run(self, query: Query) -> list[dict]:
        """A query of weighted parts, ranked by its embedding (query_vector), fused with the catalog's own words where
        it has words (mode hybrid), or by those words alone (mode lexical, or text where the run's text tower cannot
        search)."""
        for part in query.parts:
            if part.kind == "text":
                gate.words(str(part.value))
        text_only = all(part.kind == "text" for part in query.parts)
        cannot_embed = text_only and not self.encoder.text_search  # hybrid falls back to the words alone
        if query.ranking == "lexical" or (query.ranking == "hybrid" and cannot_embed):
            results = self.catalog.search_words(None, query.words, query.filters, query.k, query.offset,
                                                query.collapse, "lexical")
            return self.confident(results, "text lexical" if text_only else "composed lexical")
        pixels = self.part_pixels(query.parts, query.box)
        if self.attributes is not None and len(query.parts) == 1 and pixels[0] is not None:
            # one photo: searched by what it looks like, its type and colour included
            vector = self.part_vectors(query.parts, pixels=pixels)[0]
            return self.rank(vector, query.filters, query.k, query.offset, query.kind, query.collapse, pixels[0])
        vector = self.query_vector(query, pixels)
        if query.ranking == "hybrid":
            results = self.catalog.search_words(vector, query.words, query.filters, query.k, query.offset,
                                                query.collapse, "hybrid",
                                                self.lexical_weights["text" if text_only else "composed"])
            return self.confident(results, query.kind)
        return self.rank(vector, query.filters, query.k, query.offset, query.kind, query.collapse)

    def query_vector(self, query: Query, pixels=None) -> np.ndarray:
        """The weighted sum of the parts' unit embeddings, made unit again; or, for one photo (URL, item) and one
        text part of positive weight where the run has a combiner, the combiner's output. ``pixels``: the parts'
        photos, where part_pixels has decoded them."""
        vectors = self.part_vectors(query.parts, query.box, pixels)
        kinds = [part.kind for part in query.parts]
        if self.combiner is not None and len(kinds) == 2 and kinds[1] == "text" and kinds[0] != "text" and \
                query.parts[1].weight > 0:
            from fashion_search.combiner import combine

            vector = combine(self.combiner, vectors[0], vectors[1])
        else:
            total = sum(part.weight * vector for part, vector in zip(query.parts, vectors))
            norm = float(np.linalg.norm(total))
            if norm < 1e-6:
                raise QueryError("the query's parts cancel each other out: nothing is left to search by")
            vector = total / norm
        return vector

    def part_pixels(self, parts, box=None) -> list[np.ndarray | None]:
        """Each photo or URL part's photo decoded through the gate (uint8 [3, S, S]); None for the other parts. URL
        parts (at most query.MAX_URL_PARTS) are fetched together, under one deadline for the whole query."""
        urls = [part.value for part in parts if part.kind == "url"]
        fetched = iter(self.fetch_all(urls)) if urls else None
        return [self.encoder.decode(part.value if part.kind == "photo" else next(fetched), box)
                if part.kind in ("photo", "url") else None for part in parts]

    def part_vectors(self, parts, box=None, pixels=None) -> list[np.ndarray]:
        """Each part's unit embedding (its photo decoded by part_pixels, unless ``pixels`` holds them already)."""
        pixels = self.part_pixels(parts, box) if pixels is None else pixels
        vectors = []
        for part, photo in zip(parts, pixels):
            if photo is not None:
                vectors.append(self.encoder.embed_many([photo])[0])
            elif part.kind == "item":
                vectors.append(self.catalog.vector(part.value))
            else:
                if not self.encoder.text_search:
                    raise QueryError(self.encoder.text_search_why)
                vectors.append(self.encoder.embed_text(part.value))
        return vectors

    def fetch_all(self, urls: list[str]) -> list[bytes]:
        """The URLs' bodies, fetched at once in threads of their own, within one TOTAL_TIMEOUT between them."""
        from concurrent.futures import ThreadPoolExecutor

        deadline = Deadline(TOTAL_TIMEOUT)
        with ThreadPoolExecutor(len(urls), thread_name_prefix="fetch") as pool:
            futures = [pool.submit(fetch_url, url, self.allow_private_urls, deadline=deadline) for url in urls]
            return [future.result() for future in futures]

    def search_batch(self, photos: list[bytes], query: Query) -> list[dict]:
        """One answer per photo, in order, each as the photo route answers (its page of ``query``: filters, k,
        offset, collapse); a photo the gate refuses gets its error in place of results. The photos go to the
        micro-batcher together, so a batch costs about one model batch."""
        if query.box is not None:
            raise QueryError("a batch takes no box: crop each photo before sending it")
        filters = self.catalog.check_filters(query.filters)  # a bad filter fails before any photo is embedded
        pixels, answers = [], []
        for data in photos:
            try:
                pixels.append(self.encoder.decode(data))
                answers.append(None)
            except QueryError as exc:
                answers.append({"error": str(exc)})
        decoded, vectors = iter(pixels), iter(self.encoder.embed_many(pixels))
        return [answer or self.answer(self.rank(next(vectors), filters, query.k, query.offset, "photo",
                                                query.collapse, next(decoded))) for answer in answers]

    def search_image_file(self, path, *filters, offset=0):
        return self.search_image_bytes(read_upload(path), *filters, offset=offset)

    def search_photo(self, path, words="", weight=0.5, *values, offset=0):
        """The page's photo tab: the photo, refined with words at a weight (negative: away from them); the page's
        filters, then the mode."""
        parts = [Part("photo", read_upload(path))]
        if (words or "").strip():
            parts.append(Part("text", words.strip(), float(weight)))
        filters, mode = self.page_values(values)
        return self.run(Query(tuple(parts), self.filters(*filters), offset=offset, mode=mode))

    def search_json(self, text: str, max_photo_bytes: int):
        """The Gradio API's /search: a query as the JSON route takes it, as text (its photos within
        ``max_photo_bytes`` each, as the upload routes')."""
        from fashion_search.serving.gate import MAX_QUERY_BYTES

        if len(text or "") > MAX_QUERY_BYTES:
            raise QueryError(f"the query is over {MAX_QUERY_BYTES // 2**20} MB")
        return self.run(from_text(text, max_photo_bytes))

    def search_url(self, url, *filters, offset=0):
        return self.page_query("url", url or "", filters, offset)

    def search_text(self, text, *values, offset=0):
        """The page's text tab: the page's filters, then the mode (hybrid where it is left out)."""
        return self.page_query("text", text or "", values, offset)

    def search_item(self, item_id, *filters, offset=0):
        return self.page_query("item", item_id, filters, offset)

    def gallery(self, results):
        """(photo file, short caption) per result; describe() gives each result's details in full. The results come
        back from the page's client: at most MAX_K of them are shown, each an item of the catalog."""
        return [(self.photo_file(r["id"]), f"{rank}. {self.how_close(r)}")
                for rank, r in enumerate(shown(results), 1)]

    @staticmethod
    def how_close(record) -> str:
        return f"confidence {record['confidence']:.0%}" if "confidence" in record else f"score {record['score']:.3f}"


    def describe(self, results) -> str:
        """Markdown for the page: a notice when nothing is a close match, then each result in full."""
        if not shown(results):
            return ""
        lines = []
        if self.close_match(results) is False:
            lines.append(f"**Nothing in the catalog is a close match** for this query: even the best result is "
                         f"unlikely to share its article type (confidence {results[0]['confidence']:.0%}, below "
                         f"{self.min_confidence:.0%}). The nearest items are shown all the same.\n")
        lines += ["| # | name | type | colour | gender | match |", "|---:|---|---|---|---|---|"]
        for rank, r in enumerate(results, 1):
            fields = ("productDisplayName", "articleType", "baseColour", "gender")
            cells = [str(r.get(field, "")).replace("|", "/") for field in fields]
            lines.append(f"| {rank} | {' | '.join(cells)} | {self.how_close(r)} |")
        return "\n".join(lines)

    def photo_file(self, item_id) -> str:
        """A catalog photo as a JPEG file for the page's gallery, written the first time the item is shown. Gradio
        serves a file as it is, where it re-encoded a PIL image on every query (as WebP; BENCHMARKS.md, section 3).
        Decoded (through the gate) and re-encoded once, so any format the catalog holds reaches the browser as an
        upright RGB JPEG. The file is named after the item and where its photo is, so an item whose photo
        catalog.py replaced shows the new one. At most a few KB per catalog item, in a folder removed with the
        service."""
        _, record = self.catalog.item(item_id)
        source = [str(record.get(field)) for field in ("id", "photo", "split", "row")]
        name = hashlib.sha256("\0".join(source).encode("utf-8", "surrogatepass")).hexdigest()[:24]  # a safe name
        path = Path(self._photos.name) / f"{name}.jpg"
        if not path.exists():
            partial = path.with_name(f".{name}.{threading.get_ident()}.jpg")
            open_rgb(self.catalog.photos.read(record), GALLERY_SIDE).save(partial, "JPEG", quality=90)
            os.replace(partial, path)  # whole files only, also when two queries show the same item at once
        return str(path)
