"""The plain HTTP + JSON routes (docs/api.md), a Starlette app that the server's front hands /api/ to once the
index is whole."""
from __future__ import annotations

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.routing import Route

from fashion_search.serving import batching, gate
from fashion_search.errors import Busy, QueryError
from fashion_search.serving.query import Query, from_params, from_text, with_photo
from fashion_search.serving.service import SearchService

MAX_PENDING = batching.MAX_PENDING  # per route family, as the batcher's own bound
RETRY_AFTER_SECONDS = 1


def json_app(service: SearchService, max_upload_bytes: int) -> Starlette:
    """Plain HTTP + JSON routes beside the page, for programs that need speed: one request, no upload step, no
    queue, no event stream. Through gradio_client a query pays the client's and Gradio's own protocol even when no
    model runs (BENCHMARKS.md, section 3); here it costs the model and little else. docs/api.md has an example of
    each.

        POST /api/search          body: {"parts": [...], "filters": {...}, "k": 5, "offset": 0, "box": [...]}
        POST /api/search_image    body: the photo's bytes         \
        GET  /api/search_text?q=..   /api/search_url?url=..         } query string: any filter column (Red,Blue;
        GET  /api/search_item?id=..                                / baseColour!=Black), k, offset, box, collapse
        POST /api/search_batch    multipart: up to MAX_BATCH photos (any field names), filters and k as above
    Answer: {"results": [records, best first], "close_match": ...} ({"answers": [...]} for a batch, one such answer
    per photo), or {"error": message} with status 400 (408 for an upload slower than the gate allows, 413 for too
    large, 422 for a photo too costly to decode, 503 with Retry-After when MAX_PENDING requests of the route's family
    are already in progress, 500 when the model failed)."""
    # Requests in progress, uploads included, per family: the routes that read a body, and those that do not (a
    # trickle of slow uploads never takes the slots of a text search). One event loop: no lock needed.
    pending = {"body": 0, "query": 0}

    def error(exc: QueryError):
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if exc.status == 503 else None
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)

    def route(read, family="query"):
        """A route: its slot is taken before anything is read (a full bound answers 503 at once), then ``read``
        makes the search from the request (an upload's body read through the gate), and it runs in a worker thread,
        where concurrent requests meet in the MicroBatcher."""
        async def handle(request):
            if pending[family] >= MAX_PENDING:
                return error(Busy("busy, try again in a moment"))
            pending[family] += 1
            try:
                search = await read(request)
                answer = await run_in_threadpool(search)
                if isinstance(answer, dict):  # a batch
                    return JSONResponse(answer)
                return JSONResponse(service.answer(answer))
            except QueryError as exc:
                return error(exc)
            finally:
                pending[family] -= 1
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
        body = await gate.read_body(request, gate.MAX_QUERY_BYTES)
        query = await run_in_threadpool(from_text, body, max_upload_bytes)  # parsed off the event loop
        return lambda: service.run(query)

    async def batch(request):
        query = params(request, "photo", b"")
        photos = await gate.read_photos(request, gate.MAX_BATCH, max_upload_bytes)
        return lambda: {"answers": service.search_batch(photos, query)}

    return Starlette(routes=[
        Route("/api/search", route(composed, "body"), methods=["POST"]),
        Route("/api/search_image", route(image, "body"), methods=["POST"]),
        Route("/api/search_text", route(one_part("text")), methods=["GET"]),
        Route("/api/search_url", route(one_part("url")), methods=["GET"]),
        Route("/api/search_item", route(one_part("item")), methods=["GET"]),
        Route("/api/search_batch", route(batch, "body"), methods=["POST"])])
