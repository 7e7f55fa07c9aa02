"""The search service: everything the page and the API do, without Gradio."""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path

from fashion_search import calibration
from fashion_search.serving.catalog import Catalog
from fashion_search.serving.encoder import Encoder
from fashion_search.serving.errors import QueryError
from fashion_search.serving.fetch import fetch_url
from fashion_search.serving.gate import open_rgb

# A result whose calibrated confidence is below this is not a close match (app.py --min-confidence).
MIN_CONFIDENCE = 0.5
GALLERY_SIDE = 256  # catalog photos are shown at most about this size (the gallery's tiles are smaller)


class SearchService:
    """Everything the page and the API do, without Gradio: each query returns the top results as records."""

    def __init__(self, encoder: Encoder, catalog: Catalog, model_name: str, allow_private_urls=False,
                 calibration: dict | None = None, min_confidence: float = MIN_CONFIDENCE):
        self.encoder, self.catalog, self.model_name = encoder, catalog, model_name
        self.allow_private_urls = allow_private_urls
        self.calibration, self.min_confidence = calibration, min_confidence
        self._photos = tempfile.TemporaryDirectory(prefix="fashion-search-photos-")  # removed with the service

    @property
    def filter_columns(self) -> list[str]:
        """The filters this catalog offers, in the order the page and the Gradio API take their values."""
        return self.catalog.filter_columns

    def filters(self, *values):
        return dict(zip(self.filter_columns, values))

    def search(self, vector, *filters) -> list[dict]:
        """The top results for an embedding, each with its match confidence where the run is calibrated:
        ``confidence`` (how likely it shares the query's article type) and ``close_match`` (confidence at least
        min_confidence)."""
        results = self.catalog.search(vector, self.filters(*filters))
        if self.calibration is not None and results:
            for record, value in zip(results, calibration.confidence(self.calibration, [r["score"] for r in results])):
                record["confidence"] = round(float(value), 3)
                record["close_match"] = bool(value >= self.min_confidence)
        return results

    def close_match(self, results) -> bool | None:
        """Whether any result is a close match; None where the run has no calibration to tell."""
        if self.calibration is None or not results:
            return None
        return any(record["close_match"] for record in results)

    def search_image_bytes(self, data: bytes, *filters):
        return self.search(self.encoder.embed_image(data), *filters)

    def search_image_file(self, path, *filters):
        if not path:
            raise QueryError("upload a photo first")
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise QueryError(f"cannot read the upload ({exc.strerror})") from None
        return self.search_image_bytes(data, *filters)

    def search_url(self, url, *filters):
        return self.search_image_bytes(fetch_url(url, self.allow_private_urls), *filters)

    def search_text(self, text, *filters):
        if not self.encoder.text_search:
            raise QueryError(self.encoder.text_search_why)
        return self.search(self.encoder.embed_text(text), *filters)

    def search_item(self, item_id, *filters):
        return self.search(self.catalog.vector(item_id), *filters)

    def gallery(self, results):
        """(photo file, short caption) per result; describe() gives each result's details in full."""
        return [(self.photo_file(r["id"]), f"{rank}. {self.how_close(r)}")
                for rank, r in enumerate(results, 1)]

    @staticmethod
    def how_close(record) -> str:
        return f"confidence {record['confidence']:.0%}" if "confidence" in record else f"score {record['score']:.3f}"

    def describe(self, results) -> str:
        """Markdown for the page: a notice when nothing is a close match, then each result in full."""
        if not results:
            return ""
        lines = []
        if self.close_match(results) is False:
            lines.append(f"**Nothing in the catalog is a close match** for this query: even the best result is "
                         f"unlikely to share its article type (confidence {results[0]['confidence']:.0%}, below "
                         f"{self.min_confidence:.0%}). The nearest items are shown all the same.\n")
        lines += ["| # | name | type | colour | gender | match |", "|---:|---|---|---|---|---|"]
        for rank, r in enumerate(results, 1):
            cells = [str(r[field]).replace("|", "/") for field in ("productDisplayName", "articleType", "baseColour",
                                                                  "gender")]
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
