"""The server's front: it listens from the first seconds of a start and says how far the start has got (GET
/api/status, and a page that refreshes itself), then answers searches once the index is whole: the JSON routes
first, the Gradio page a few seconds later (importing and building it takes longer than loading a saved index).

Until the index is whole every search gets 503 "index building" with Retry-After, rather than results over the part
embedded so far: a catalog is embedded in its dataset's order (split by split, often sorted by category), so a
partial index would answer from a skewed sample, and every answer given would be worth asking again. A 503 is what
HTTP clients and load balancers already wait on.

Only the standard library, Starlette and Uvicorn are imported here: the front adds no import to a start. (app.py
imports torch with the rest of the package before it starts the front: BENCHMARKS.md, section 6.)"""
from __future__ import annotations

import asyncio
import html
import threading
import time

import uvicorn
from starlette.responses import HTMLResponse, JSONResponse

from fashion_search.errors import UserError

MAX_RETRY_AFTER = 30  # seconds: a client told to wait for the whole build would miss its end by minutes
PAGE_START_TIMEOUT = 120


class Startup:
    """Where a start has got: its phase, and while the catalog is embedded, photos done of total and about how long
    is left, from this start's own rate (chunks resumed from disk do not count as speed; once two chunks are done,
    the rate is read from the end of the first, which also paid for compiling the graph). Written by the loading
    thread, read by the server's, under a lock."""

    def __init__(self):
        self._lock = threading.Lock()
        self.state, self.phase = "building", "starting"
        self.done = self.total = self.items = None
        self._reports = []  # (monotonic time, done) of this phase's first two progress reports
        self.page = "starting"  # then "serving", or "off" (app.py --no-page)
        self.timeline = [("listening", time.time())]  # (phase, wall-clock time it began): where a start's time goes

    def begin(self, phase: str):
        with self._lock:
            self.phase, self.done, self.total, self._reports = phase, None, None, []
            self.timeline.append((phase, time.time()))

    def report(self, phase: str, done: int | None = None, total: int | None = None):
        """The progress callback a catalog's build takes (serving.catalog): a phase begins, or ``done`` of ``total``
        photos of it are embedded."""
        if phase != self.phase:
            self.begin(phase)
        if done is not None:
            self.advance(done, total)

    def advance(self, done: int, total: int):
        """``done`` of ``total`` photos embedded (the first call may count chunks resumed from disk)."""
        with self._lock:
            if len(self._reports) < 2:
                self._reports.append((time.monotonic(), done))
            self.done, self.total = done, total

    def ready(self, items: int):
        with self._lock:
            self.state, self.phase, self.items = "ready", "serving the JSON API", items
            self.timeline.append(("ready", time.time()))

    def page_ready(self):
        with self._lock:
            self.page, self.phase = "serving", "serving"
            self.timeline.append(("page", time.time()))

    def page_off(self):
        with self._lock:
            self.page = "off"

    def failed(self, message: str):
        with self._lock:
            self.state, self.phase = "failed", message

    def seconds_left(self) -> float | None:
        if not self._reports or not self.total:
            return None
        started, first = self._reports[1] if self.done > self._reports[-1][1] else self._reports[0]
        rate = (self.done - first) / max(time.monotonic() - started, 1e-9)
        return (self.total - self.done) / rate if rate > 0 else None

    def status(self) -> dict:
        with self._lock:
            left = self.seconds_left()
            return {"state": self.state, "phase": self.phase, "done": self.done, "total": self.total,
                    "seconds_left": None if left is None else round(left, 1), "items": self.items, "page": self.page,
                    "timeline": [[phase, round(at, 3)] for phase, at in self.timeline]}

    def message(self, status: dict | None = None) -> str:
        """What a search is answered while the start is not through (``status``: one already read)."""
        status = status or self.status()
        if status["state"] == "failed":
            return f"the start failed: {status['phase']}"
        text = f"index building: {status['phase']}"
        if status["total"]:
            text += (f", {status['done']:,} of {status['total']:,} photos "
                     f"({status['done'] / status['total']:.0%})")
        if status["seconds_left"] is not None:
            text += f", about {duration(status['seconds_left'])} left"
        return text


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


class Front:
    """The ASGI app the server runs from its first second: /api/status always; the JSON routes (``api``) and the
    page (``page``) once each is handed over; before that a 503 that says how far the build has got, and at / a page
    that shows it and reloads itself."""

    def __init__(self, startup: Startup):
        self.startup = startup
        self.api = self.page = None
        self.loop = None
        self._page_stop = self._page_task = None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        path = scope.get("path", "")
        if path == "/api/status":
            return await JSONResponse(self.startup.status())(scope, receive, send)
        app = self.api if path.startswith("/api/") else self.page
        if app is not None:
            return await app(scope, receive, send)
        if scope["type"] != "http":  # a websocket before the page is up
            return await send({"type": "websocket.close", "code": 1013})
        status = self.startup.status()
        if path == "/" and status["state"] != "failed":
            response = HTMLResponse(self.progress_page(status))
        else:
            left = status["seconds_left"]
            retry = 5 if left is None else min(max(int(left), 1), MAX_RETRY_AFTER)
            response = JSONResponse({"error": self.startup.message(status), "status": status}, status_code=503,
                                    headers={"Retry-After": str(retry)})
        await response(scope, receive, send)

    def progress_page(self, status: dict) -> str:
        bar = f'<progress max="{status["total"]}" value="{status["done"]}"></progress>' if status["total"] else ""
        if status["state"] != "ready":
            message = html.escape(self.startup.message(status))
        elif status["page"] == "off":
            message = "This server answers the JSON API alone (app.py --no-page): POST /api/search and the others."
        else:
            message = "The index is ready and the JSON API answers; the page is starting."
        return ('<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">'
                "<title>Fashion similarity search: starting</title></head><body style=\"font-family:sans-serif\">"
                f"<h2>Fashion similarity search</h2><p>{message}</p>{bar}"
                "<p>This page reloads itself; GET /api/status says the same as JSON.</p></body></html>")

    async def _lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.loop = asyncio.get_running_loop()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._page_task is not None:
                    self._page_stop.set()
                    await asyncio.wait([self._page_task], timeout=10)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def serve_api(self, app, items: int):
        self.api = app
        self.startup.ready(items)

    def serve_page(self, app):
        """Start ``app`` (the page's ASGI app: its lifespan starts Gradio's queue) in the server's event loop, where
        it then runs until the server stops, and route to it."""
        asyncio.run_coroutine_threadsafe(self._start_page(app), self.loop).result(PAGE_START_TIMEOUT)
        self.page = app
        self.startup.page_ready()

    async def _start_page(self, app):
        started, self._page_stop = asyncio.Event(), asyncio.Event()

        async def run():  # one task enters and leaves the lifespan, as a server would
            async with app.router.lifespan_context(app):
                started.set()
                await self._page_stop.wait()
        self._page_task = asyncio.create_task(run())
        waiting = asyncio.create_task(started.wait())
        await asyncio.wait([self._page_task, waiting], return_when=asyncio.FIRST_COMPLETED)
        if not started.is_set():
            waiting.cancel()
            self._page_task.result()  # raises what stopped it


class Server:
    """Uvicorn serving ``app`` on host:port in a thread, listening when the constructor returns."""

    def __init__(self, app, host: str, port: int):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self._run, name="server", daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise UserError(f"cannot listen on {host}:{port}: is another server using the port?")
            time.sleep(0.01)

    def _run(self):
        try:
            self.server.run()
        except SystemExit:  # uvicorn's answer to a port it cannot bind (it has logged why)
            pass

    def close(self):
        self.server.should_exit = True
        self.thread.join(15)

    def block(self):
        try:
            while self.thread.is_alive():
                self.thread.join(0.5)
        except KeyboardInterrupt:
            self.close()
