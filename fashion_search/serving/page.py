"""The Gradio page (and its Gradio API): photo, region, URL and text tabs, filters, a gallery of results that can be
searched by in turn, and "more results". Gradio is imported only here, when the page is built."""
from __future__ import annotations

from fashion_search.serving.catalog import ANY
from fashion_search.serving.query import MAX_K, MODES
from fashion_search.errors import QueryError
from fashion_search.serving.json_api import MAX_PENDING
from fashion_search.serving.service import SearchService, shown

# Gradio's cache of uploads and of files it served: every 10 minutes, files older than an hour are removed.
CACHE_CLEANING = (600, 3600)


def guarded(fn):
    """``fn`` with a refused query shown on the page (and raised to API clients) as its message."""
    import gradio as gr

    def call(*args):
        try:
            return fn(*args)
        except QueryError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
    call.__name__ = fn.__name__
    return call


def raw_upload(payload):
    """The image input's preprocess: the uploaded file as it came, for the gate to check. Gradio's own preprocess
    opens every upload with Pillow and converts and re-saves it in the format its file name asks for (a tiny palette
    PNG named x.bmp becomes hundreds of MB) before any check of ours could run. (Set on the instance rather than
    subclassing gr.Image: Gradio writes a .pyi stub beside every subclass.)"""
    import gradio as gr

    if payload is None:
        return None
    if payload.url and payload.url.startswith("data:"):
        raise gr.Error("refused: send the photo as a file upload, not as a data: URL", print_exception=False)
    return payload.path


def query_tabs(service: SearchService):
    """The photo, region, URL and text tabs: [(event, search function name, inputs, API name or None, inputs after
    the filters)]."""
    import gradio as gr

    with gr.Tabs():
        with gr.Tab("Photo"):
            image = gr.Image(type="filepath", sources=["upload", "clipboard"], label="photo (drop, paste or click)")
            image.preprocess = raw_upload
            with gr.Row():
                words = gr.Textbox(label="refine with words (optional)", placeholder="in red",
                                   interactive=service.encoder.text_search, scale=3,
                                   info=None if service.encoder.text_search else service.encoder.text_search_why)
                weight = gr.Slider(-1, 1, value=0.5, step=0.1, label="weight of the words (negative: away from them)",
                                   scale=2)
                refine_mode = gr.Radio(list(MODES), value="hybrid", label="the words rank by", scale=2,
                                       info="hybrid: the catalog's own words and the look; lexical: the words alone")
            image_button = gr.Button("Search by photo", variant="primary")
            api_image = gr.Button(visible=False)  # the Gradio API's /search_image: the photo alone
        with gr.Tab("Region"):
            region = gr.ImageEditor(type="filepath", sources=["upload", "clipboard"], layers=False, brush=False,
                                    eraser=False, transforms=("crop",), label="photo: crop it to the product")
            region.preprocess = raw_composite
            region_button = gr.Button("Search by the cropped region", variant="primary")
        with gr.Tab("Image URL"):
            url = gr.Textbox(label="image URL", placeholder="https://...")
            url_button = gr.Button("Search by URL", variant="primary")
        with gr.Tab("Text"):
            # words search the catalog's own text even where the text tower cannot (then lexically)
            text = gr.Textbox(label="description", placeholder="black leather wallet for men")
            modes = list(MODES) if service.encoder.text_search else ["lexical"]
            text_mode = gr.Radio(modes, value=modes[0], label="rank by",
                                 info="hybrid: the catalog's own words and the look; vector: the look alone; "
                                      "lexical: the words alone" if service.encoder.text_search else
                                      f"the catalog's words alone: {service.encoder.text_search_why}")
            text_button = gr.Button("Search by text", variant="primary")
    return [(image_button.click, "search_photo", [image, words, weight], None, [refine_mode]),
            (words.submit, "search_photo", [image, words, weight], None, [refine_mode]),
            (image.upload, "search_image_file", [image], None, []),
            (api_image.click, "search_image_file", [image], "search_image", []),
            (region_button.click, "search_image_file", [region], None, []),
            (url_button.click, "search_url", [url], "search_url", []),
            (url.submit, "search_url", [url], None, []),
            (text_button.click, "search_text", [text], "search_text", [text_mode]),
            (text.submit, "search_text", [text], None, [text_mode])]


def raw_composite(payload):
    """The region tab's preprocess: the cropped photo as the browser drew it (a PNG file), for the gate to check;
    Gradio's own would open and re-save every layer."""
    if payload is None or payload.composite is None:
        return None
    return raw_upload(payload.composite)


def remembered(service: SearchService, name: str):
    """A page search that also remembers itself (function and inputs), so that "more" can ask for the next page."""
    def call(*args):
        return getattr(service, name)(*args), {"fn": name, "args": list(args)}
    call.__name__ = name
    return call


def build_page(service: SearchService, notice: str = "", max_upload_mb: int = 10):
    import gradio as gr

    catalog = service.catalog
    with gr.Blocks(title="Fashion similarity search", delete_cache=CACHE_CLEANING) as page:
        gr.Markdown(f"## Fashion similarity search\nModel: **{service.model_name}** — searching "
                    f"**{len(catalog):,}** catalog items. {notice}")
        with gr.Row():  # only the columns this catalog has
            # allow_custom_value: an unknown value reaches Catalog.check_filters, which names the valid ones on every
            # route alike (Gradio's own check would log a traceback per request)
            filters = [gr.Dropdown(catalog.choices(column), value=ANY, label=column, allow_custom_value=True)
                       for column in service.page_columns]
        routes = query_tabs(service)
        gallery = gr.Gallery(label="results, best first (click one to search by it)", columns=5, height="auto",
                             allow_preview=False, object_fit="contain",  # each product whole, never cropped
                             elem_id="results-gallery")
        more = gr.Button("More results", elem_id="more-results", size="sm")
        details = gr.Markdown(elem_id="results-details")  # each result in full, and "no close match"
        last = gr.State(None)  # the last search, for "more"
        with gr.Accordion("API answer", open=False):
            results = gr.JSON(label="results")
        item_id = gr.Textbox(visible=False)  # ids are numbers or, for a folder of photos, file names
        for trigger, name, sources, api_name, after in routes:
            trigger(guarded(remembered(service, name)), [*sources, *filters, *after], [results, last],
                    api_name=api_name, api_visibility="public" if api_name else "private")
        gr.api(guarded_search(service, max_upload_mb << 20), api_name="search")

        def next_page(current, query):  # up to MAX_K results in all: the gallery shows no more
            if not query or not current or len(shown(current)) >= MAX_K:
                return current
            return current + getattr(service, query["fn"])(*query["args"], offset=len(current))[:MAX_K - len(current)]
        more.click(guarded(next_page), [results, last], results, api_visibility="private")
        # The gallery is drawn on the page's own 'change' of the results, so API calls (which return only the
        # records) never pay for decoding and re-encoding five photos.
        results.change(guarded(service.gallery), results, gallery, api_visibility="private")
        results.change(guarded(service.describe), results, details, api_visibility="private")

        def clicked(current, selection):
            return current[selection.index]["id"]
        # gr.SelectData is injected by type; the annotation must be the class, not the string the
        # __future__ import would make of it.
        clicked.__annotations__ = {"selection": gr.SelectData}

        gallery.select(clicked, results, item_id, api_visibility="private").success(
            guarded(remembered(service, "search_item")), [item_id, *filters], [results, last],
            api_name="search_item")
    for block in page.blocks.values():
        refuse_urls_as_files(block)
    return page


# The gallery's own height ("auto") left a band of empty space below one row of photos.
PAGE_CSS = "#results-gallery .grid-wrap { min-height: 0 !important; height: auto !important; }"


def guarded_search(service: SearchService, max_photo_bytes: int):
    def search(query: str) -> list[dict]:
        """A composed query as JSON text: {"parts": [{"photo": base64} | {"url": ...} | {"item": id} | {"text": ...},
        each with an optional "weight"], "filters": {...}, "k": 5, "offset": 0, "box": [x0, y0, x1, y1],
        "collapse": true} (docs/api.md)."""
        return guarded(service.search_json)(query, max_photo_bytes)
    return search


def refuse_urls_as_files(block):
    """Gradio takes an http(s) URL wherever a file goes and downloads it itself, outside fetch_url's guards (address
    checks, size cap, content type, deadline). Every component here refuses that, so a file route reads only files
    the user uploaded; URLs go through the URL route."""
    import gradio as gr
    from gradio_client import utils as client_utils

    if not hasattr(block, "async_move_resource_to_block_cache"):
        return

    def refuse_url(url_or_file_path):
        if url_or_file_path is not None and client_utils.is_http_url_like(str(url_or_file_path)):
            raise gr.Error("refused: file inputs take uploaded files only; search by URL through the URL route "
                           "(/search_url)", print_exception=False)

    move, move_async = block.move_resource_to_block_cache, block.async_move_resource_to_block_cache

    def move_local_only(url_or_file_path):
        refuse_url(url_or_file_path)
        return move(url_or_file_path)

    async def move_local_only_async(url_or_file_path):
        refuse_url(url_or_file_path)
        return await move_async(url_or_file_path)
    block.move_resource_to_block_cache = move_local_only
    block.async_move_resource_to_block_cache = move_local_only_async


def page_app(service: SearchService, notice: str = "", max_upload_mb: int = 10):
    """The page as an ASGI app of its own (a FastAPI app with the page mounted at its root), for the server's front
    to start and route to."""
    import gradio as gr
    from fastapi import FastAPI

    page = build_page(service, notice, max_upload_mb)
    page.queue(default_concurrency_limit=16, max_size=MAX_PENDING)  # concurrent requests meet in the MicroBatcher
    return gr.mount_gradio_app(FastAPI(), page, path="", max_file_size=f"{max_upload_mb}mb", footer_links=["api"],
                               show_error=False, css=PAGE_CSS)
