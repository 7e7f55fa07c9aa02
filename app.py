"""Find the five catalog items that look most like a photo: a Gradio page and a program API over a vector index
of CLIP embeddings (FAISS in the process by default, or Milvus). Queries: an uploaded photo, an image URL, a text
description (CLIP's text tower), or a click on a result. Optional filters (gender, masterCategory, articleType,
baseColour) are applied inside the search.

Usage: python app.py [--run runs/clip] [--dataset PATH] [--index faiss] [--host 127.0.0.1] [--port 7860]
"""
from __future__ import annotations

import argparse
import threading
from pathlib import Path

from fashion_search import calibration, combiner
from fashion_search.data import HUB_DATASET
from fashion_search.errors import UserError, cli
from fashion_search.runtime import device_arg, positive_int
from fashion_search.serving import batching, gate
from fashion_search.serving.catalog import ANY, calibration_photos, catalog_from_dataset, catalog_from_run
from fashion_search.serving.encoder import HUB_MODEL, INT8_CALIBRATION_PHOTOS, Encoder
from fashion_search.serving.errors import Busy, QueryError
from fashion_search.serving.query import Query, from_params, from_text, with_photo
from fashion_search.serving.service import MIN_CONFIDENCE, SearchService

MAX_PENDING = batching.MAX_PENDING  # per route family, as the batcher's own bound
RETRY_AFTER_SECONDS = 1
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
    """The photo, region, URL and text tabs: [(event, search function name, inputs, API name or None)]."""
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
            if service.encoder.text_search:
                text = gr.Textbox(label="description", placeholder="navy blue men's shirt")
                text_button = gr.Button("Search by text", variant="primary")
            else:
                gr.Markdown(f"Text search is off: {service.encoder.text_search_why}")
    routes = [(image_button.click, "search_photo", [image, words, weight], None),
              (words.submit, "search_photo", [image, words, weight], None),
              (image.upload, "search_image_file", [image], None),
              (api_image.click, "search_image_file", [image], "search_image"),
              (region_button.click, "search_image_file", [region], None),
              (url_button.click, "search_url", [url], "search_url"),
              (url.submit, "search_url", [url], None)]
    if service.encoder.text_search:
        return routes + [(text_button.click, "search_text", [text], "search_text"),
                         (text.submit, "search_text", [text], None)]
    text = gr.Textbox(visible=False)  # the API answers why, rather than not knowing the route
    return routes + [(text.submit, "search_text", [text], "search_text")]


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


def build_page(service: SearchService, notice: str = ""):
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
                             allow_preview=False, elem_id="results-gallery")
        more = gr.Button("More results", elem_id="more-results", size="sm")
        details = gr.Markdown(elem_id="results-details")  # each result in full, and "no close match"
        last = gr.State(None)  # the last search, for "more"
        with gr.Accordion("API answer", open=False):
            results = gr.JSON(label="results")
        item_id = gr.Textbox(visible=False)  # ids are numbers or, for a folder of photos, file names
        for trigger, name, sources, api_name in routes:
            trigger(guarded(remembered(service, name)), [*sources, *filters], [results, last], api_name=api_name,
                    api_visibility="public" if api_name else "private")
        gr.api(guarded_search(service), api_name="search")

        def next_page(current, query):
            if not query or not current:
                return current
            return current + getattr(service, query["fn"])(*query["args"], offset=len(current))
        more.click(guarded(next_page), [results, last], results, api_visibility="private")
        # The gallery is drawn on the page's own 'change' of the results, so API calls (which return only the
        # records) never pay for decoding and re-encoding five photos.
        results.change(guarded(service.gallery), results, gallery, api_visibility="private")
        results.change(service.describe, results, details, api_visibility="private")

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


def guarded_search(service: SearchService):
    def search(query: str) -> list[dict]:
        """A composed query as JSON text: {"parts": [{"photo": base64} | {"url": ...} | {"item": id} | {"text": ...},
        each with an optional "weight"], "filters": {...}, "k": 5, "offset": 0, "box": [x0, y0, x1, y1],
        "collapse": true} (docs/api.md)."""
        return guarded(service.search_json)(query)
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/clip", help="a clip.py run folder (fine-tuned model + embeddings)")
    parser.add_argument("--dataset", default=None, help="catalog to index instead of the run's own splits "
                        f"(hub name or folder); without a run it defaults to {HUB_DATASET}")
    parser.add_argument("--model", default=HUB_MODEL, help="CLIP model for the zero-shot fallback when there is no run")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public share link (off by default)")
    parser.add_argument("--device", type=device_arg, default="cpu")
    parser.add_argument("--index", default="faiss", help="where the catalog's vectors live: faiss (a file in the "
                        "run's index folder), milvus:PATH.db (Milvus Lite) or milvus://HOST:PORT/COLLECTION (a Milvus "
                        "server); catalog.py adds and removes items in it while the app serves")
    parser.add_argument("--cache-dir", default="data/cache")
    parser.add_argument("--engine", choices=("local", "ray"), default="local", help="who embeds a --dataset catalog "
                        "at its first start: this process, or a Ray cluster (RAY_ADDRESS, else a local one)")
    parser.add_argument("--ray-actors", type=positive_int, default=2, help="--engine ray: model actors (one GPU "
                        "each on GPUs)")
    parser.add_argument("--max-upload-mb", type=int, default=10)
    parser.add_argument("--min-confidence", type=float, default=MIN_CONFIDENCE,
                        help="a result whose calibrated confidence (the chance that it shares the query's article type, "
                        "from the run's calibration.json) is below this is not a close match; when no result reaches "
                        "it, the page says so and the JSON API answers close_match false")
    parser.add_argument("--allow-private-urls", action="store_true",
                        help="let URL queries reach private/loopback addresses: for local testing only")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="compile the photo query path in the background at start (about a minute on a "
                        "small CPU; until then queries run eager): photo queries then run faster (BENCHMARKS.md, "
                        "section 3)")
    parser.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                        help="with --compile, run batches of 8 concurrent photo queries through an int8 graph "
                        f"calibrated on {INT8_CALIBRATION_PHOTOS} catalog photos (needs torchao and a CPU with int8 "
                        "matrix units); not used if it disagrees with the bf16 model. Also embeds a catalog of 20k+ "
                        "photos in int8 (--no-int8: bf16)")
    return parser.parse_args(argv)


def ray_actors(args) -> int:
    return args.ray_actors if args.engine == "ray" else 0


def load_service(args) -> tuple[SearchService, str]:
    run = Path(args.run)
    if (run / "hf_model" / "config.json").exists():
        encoder = Encoder(str(run / "hf_model"), args.device, args.int8)
        catalog = catalog_from_run(run, encoder, args.dataset, args.cache_dir, args.index, ray_actors(args))
        return SearchService(encoder, catalog, f"fine-tuned CLIP ({run})", args.allow_private_urls,
                             calibration.load(run), args.min_confidence, combiner.load(run)), ""
    notice = (f"No fine-tuned run at {run} (train one with `python clip.py`): using pretrained {args.model} "
              f"zero-shot.")
    print(notice)
    dataset = args.dataset or HUB_DATASET
    try:
        encoder = Encoder(args.model, args.device, args.int8)
        index_dir = Path("runs") / "zero-shot-clip" / "index"
        catalog = catalog_from_dataset(dataset, encoder, index_dir, args.cache_dir, args.model, args.index,
                                       ray_actors(args))
    except UserError as exc:
        cause = str(exc).split(";")[0]  # what failed, without the model scripts' advice
        raise UserError(f"no run at --run {run}, and the zero-shot fallback failed: {cause}; pass --run RUN_DIR "
                               f"(a clip.py run), or local copies with --dataset PATH and --model PATH") from None
    return SearchService(encoder, catalog, f"pretrained {args.model} (zero-shot)", args.allow_private_urls), notice


def add_json_api(fastapi_app, service: SearchService, max_upload_bytes: int):
    """Plain HTTP + JSON routes beside the page, for programs that need speed: one request, no upload step, no
    queue, no event stream. Through gradio_client a query pays the client's and Gradio's own protocol even when no
    model runs (BENCHMARKS.md, section 3); here it costs the model and little else. docs/api.md has an example of
    each.

        POST /api/search          body: {"parts": [...], "filters": {...}, "k": 5, "offset": 0, "box": [...]}
        POST /api/search_image    body: the photo's bytes         \
        GET  /api/search_text?q=..   /api/search_url?url=..         } query string: any filter column (Red,Blue;
        GET  /api/search_item?id=..                                / baseColour!=Black), k, offset, box, collapse
        POST /api/search_batch    multipart: up to MAX_BATCH photos (any field names), filters and k as above
    Answer: {"results": [records, best first]} ({"answers": [...]} for a batch), or {"error": message} with status
    400 (408 for an upload slower than the gate's deadline, 413 for too large, 503 with Retry-After when MAX_PENDING
    requests are already in progress, 500 when the model failed)."""
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    pending = [0]  # requests in progress on these routes, uploads included (one event loop: no lock needed)

    def error(exc: QueryError):
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if exc.status == 503 else None
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)

    def route(read):
        """A route: its slot is taken before anything is read (a full bound answers 503 at once), then ``read``
        makes the search from the request (an upload's body read through the gate), and it runs in a worker thread,
        where concurrent requests meet in the MicroBatcher."""
        async def handle(request):
            if pending[0] >= MAX_PENDING:
                return error(Busy("busy, try again in a moment"))
            pending[0] += 1
            try:
                search = await read(request)
                answer = await run_in_threadpool(search)
                if isinstance(answer, dict):  # a batch
                    return JSONResponse(answer)
                close = service.close_match(answer)
                return JSONResponse({"results": answer} if close is None else {"results": answer, "close_match": close})
            except QueryError as exc:
                return error(exc)
            finally:
                pending[0] -= 1
        return handle

    def params(request, kind, value=None) -> Query:
        return from_params(request.query_params, kind, service.filter_columns, value)

    def one_part(kind):
        async def read(request):
            query = params(request, kind)
            return lambda: service.run(query)
        return read

    async def image(request):
        query = params(request, "photo", b"")  # checked before the body is read
        data = await gate.read_body(request, max_upload_bytes)
        return lambda: service.run(with_photo(query, data))

    async def composed(request):
        query = from_text(await gate.read_body(request, gate.MAX_QUERY_BYTES), max_upload_bytes)
        return lambda: service.run(query)

    async def batch(request):
        query = params(request, "photo", b"")
        photos = await gate.read_photos(request, gate.MAX_BATCH, max_upload_bytes)
        return lambda: {"answers": service.search_batch(photos, query.filters, query.k)}

    fastapi_app.add_route("/api/search", route(composed), methods=["POST"])
    fastapi_app.add_route("/api/search_image", route(image), methods=["POST"])
    fastapi_app.add_route("/api/search_text", route(one_part("text")), methods=["GET"])
    fastapi_app.add_route("/api/search_url", route(one_part("url")), methods=["GET"])
    fastapi_app.add_route("/api/search_item", route(one_part("item")), methods=["GET"])
    fastapi_app.add_route("/api/search_batch", route(batch), methods=["POST"])


def serve(service: SearchService, notice="", host="127.0.0.1", port=7860, share=False, max_upload_mb=10,
          block=True, **launch_kwargs):
    """The page, its Gradio API and the plain JSON API on one server (main() and the tests start it the same way)."""
    page = build_page(service, notice)
    page.queue(default_concurrency_limit=16, max_size=MAX_PENDING)  # concurrent requests meet in the MicroBatcher
    page.launch(server_name=host, server_port=port, share=share, max_file_size=f"{max_upload_mb}mb",
                footer_links=["api"], show_error=False, prevent_thread_lock=True, css=PAGE_CSS, **launch_kwargs)
    add_json_api(page.app, service, max_upload_mb * 2**20)
    if block:
        page.block_thread()
    return page


def main(argv=None):
    args = parse_args(argv)
    service, notice = load_service(args)
    if args.compile:  # serve at once, eager, and switch to the compiled graphs when they are ready
        def compile_queries():
            calibration = calibration_photos(service.catalog, service.encoder.image_size) if args.int8 else None
            service.encoder.compile_queries(calibration)
        threading.Thread(target=compile_queries, daemon=True, name="compile-queries").start()
    print(f"serving {len(service.catalog):,} items with {service.model_name} on http://{args.host}:{args.port} "
          f"(JSON API: POST /api/search_image, GET /api/search_text?q=)")
    serve(service, notice, args.host, args.port, args.share, args.max_upload_mb)


if __name__ == "__main__":
    cli(main)
