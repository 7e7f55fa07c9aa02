"""The search service: everything the page and the API do, without Gradio."""
from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

from fashion_search.images import open_image
from fashion_search.serving.catalog import FILTER_COLUMNS, Catalog, id_key
from fashion_search.serving.encoder import Encoder
from fashion_search.serving.errors import QueryError
from fashion_search.serving.fetch import fetch_url


class SearchService:
    """Everything the page and the API do, without Gradio: each query returns the top results as records."""

    def __init__(self, encoder: Encoder, catalog: Catalog, model_name: str, allow_private_urls=False):
        self.encoder, self.catalog, self.model_name = encoder, catalog, model_name
        self.allow_private_urls = allow_private_urls
        self._photos = tempfile.TemporaryDirectory(prefix="fashion-search-photos-")  # removed with the service

    @property
    def filter_columns(self) -> list[str]:
        """The filters this catalog offers, in the order the page and the Gradio API take their values."""
        return [column for column in FILTER_COLUMNS if column in self.catalog.filter_values]

    def filters(self, *values):
        return dict(zip(self.filter_columns, values))

    def search_image_bytes(self, data: bytes, *filters):
        return self.catalog.search(self.encoder.embed_image(data), self.filters(*filters))

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
        return self.catalog.search(self.encoder.embed_text(text), self.filters(*filters))

    def search_item(self, item_id, *filters):
        row = self.catalog.row_of_id.get(id_key(item_id))
        if row is None:
            raise QueryError(f"no catalog item with id {item_id}")
        return self.catalog.search(self.catalog.embeddings[row], self.filters(*filters))

    def gallery(self, results):
        return [(self.photo_file(self.catalog.row_of_id[id_key(r["id"])]),
                 f"score {r['score']:.3f} · {r['articleType']} · {r['baseColour']} · {r['gender']} · "
                 f"{r['productDisplayName']}") for r in results]

    def photo_file(self, row: int) -> str:
        """A catalog photo as a JPEG file for the page's gallery, written the first time the item is shown. Gradio
        serves a file as it is, where it re-encoded a PIL image on every query (as WebP: 26-35 ms for a gallery of
        five, BENCHMARKS.md section 3). Decoded and re-encoded once, so any format the catalog holds reaches the
        browser as an upright RGB JPEG. At most one file of a few KB per catalog item, in a folder removed with the
        service."""
        path = Path(self._photos.name) / f"{row}.jpg"
        if not path.exists():
            partial = path.with_name(f".{row}.{threading.get_ident()}.jpg")
            open_image(self.catalog.image_bytes(row)).save(partial, "JPEG", quality=90)
            os.replace(partial, path)  # whole files only, also when two queries show the same item at once
        return str(path)
