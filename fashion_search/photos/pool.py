"""Photos from outside, decoded in worker processes under limits that the operating system enforces. This process reads
a photo's header (photos.headers: cheap, pure Python, no decoder) and hands the cleaned bytes to a worker; the worker
runs Pillow within WORKER_MEMORY of address space (RLIMIT_AS) and DECODE_SECONDS of wall time. A worker that passes
either is killed or exits, its photo is refused as too costly (TooCostly, a 4xx), and another worker takes its place;
every other decode carries on. Whatever a file holds, decoding takes at most WORKERS x WORKER_MEMORY beyond the
workers' own start, and never this process's memory.

The pool is pebble's ProcessPool (a task's timeout kills its worker), on loky's process context, which starts each
worker as a fresh interpreter that imports only what the task needs (photos.worker: Pillow, NumPy), never the main
script or torch. Before a photo goes to a worker, a limiter admits it: at most WORKERS decodes at once, and at most
DECODE_MEMORY of them by the headers' estimates (so one large photo runs alone), waiting up to DECODE_WAIT seconds
for its turn."""
from __future__ import annotations

import atexit
import contextlib
import os
import threading
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from fashion_search.errors import Busy, QueryError
from fashion_search.photos import headers, worker

WORKERS = max(2, min(16, os.cpu_count() or 2))  # one per core: a catalog build on a GPU decodes on many
WORKER_MEMORY = 1 << 30  # address space a decode may add to a worker: a 40 MP WebP takes ~0.6 GB
DECODE_SECONDS = 1.5  # wall time of one decode, within the 2 s a refused photo is answered in
DECODE_MEMORY = 256 << 20  # what admitted decodes take together, by their headers' estimates
DECODE_WAIT = 10.0  # seconds a decode waits for its turn before the request is refused as busy
BATCH = 32  # photos in one task of a bulk decode: the task's round trip (~0.35 ms here) is paid once for them all


class TooCostly(QueryError):
    """A photo whose decode passed its worker's memory or time limit."""
    status = 422


class DecodeLimiter:
    """At most ``at_once`` decodes run together, and the memory their headers say they take stays within ``memory``
    bytes; a decode that cannot start within ``wait`` seconds (None: however long it takes) is refused as busy."""

    def __init__(self, at_once=WORKERS, memory=DECODE_MEMORY):
        self.at_once, self.memory = at_once, memory
        self.running, self.held = 0, 0
        self.changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, memory: int, wait: float | None = DECODE_WAIT):
        memory = min(memory, self.memory)  # one decode larger than the budget runs alone
        with self.changed:
            if not self.changed.wait_for(lambda: self.running < self.at_once and self.held + memory <= self.memory,
                                         timeout=wait):
                raise Busy("busy decoding other photos, try again in a moment")
            self.running, self.held = self.running + 1, self.held + memory
        try:
            yield
        finally:
            with self.changed:
                self.running, self.held = self.running - 1, self.held - memory
                self.changed.notify_all()


class DecodePool:
    """``workers`` decode processes, each within ``memory`` bytes and ``seconds`` per photo, started at first use
    (and again in a process forked from this one)."""

    def __init__(self, workers=WORKERS, memory=WORKER_MEMORY, seconds=DECODE_SECONDS, budget=DECODE_MEMORY):
        self.workers, self.memory, self.seconds = workers, memory, seconds
        self.limiter = DecodeLimiter(workers, budget)
        self._processes, self._owner, self._lock = None, None, threading.Lock()

    def processes(self):
        from loky.backend.context import get_context
        from pebble import ProcessPool

        with self._lock:
            if self._processes is None or self._owner != os.getpid():
                self._processes = ProcessPool(self.workers, initializer=worker.start, initargs=(self.memory,),
                                              context=get_context("loky"))
                self._owner = os.getpid()
            return self._processes

    def start(self):
        """Start the workers now, in the background (the first decode then waits for none)."""
        self.processes().schedule(os.getpid)

    def decode(self, header: headers.Header, size: int, box, square: bool, wait: float | None = DECODE_WAIT):
        """photos.worker.decode of ``header`` in a worker, once the limiter admits it; TooCostly past a limit."""
        from pebble import ProcessExpired

        with self.limiter.hold(header.memory(0 if box else size), wait):
            future = self.processes().schedule(worker.run, (header, size, box, square), timeout=self.seconds)
            try:
                return future.result()
            except FutureTimeout:
                raise TooCostly(f"this photo costs too much to decode (more than {self.seconds:g} s)") from None
            except ProcessExpired as exc:
                raise TooCostly(f"this photo costs too much to decode (more than {self.memory >> 20} MB"
                                + ("" if exc.exitcode == worker.OUT_OF_MEMORY else ", or its decoder failed")
                                + ")") from None

    def decode_batch(self, headers: list, size: int, wait: float | None = None) -> list:
        """photos.worker.run_batch in a worker, within ``seconds`` a photo; each photo's pixels or its QueryError.
        A batch past a limit is decoded again photo by photo, so that only the photo that costs too much is
        refused."""
        from pebble import ProcessExpired

        with self.limiter.hold(sum(header.memory(size) for header in headers), wait):
            future = self.processes().schedule(worker.run_batch, (headers, size), timeout=self.seconds * len(headers))
            try:
                return future.result()
            except (FutureTimeout, ProcessExpired):
                pass
        answers = []
        for header in headers:
            try:
                answers.append(self.decode(header, size, None, True, wait))
            except QueryError as exc:
                answers.append(exc)
        return answers

    def close(self):
        with self._lock:
            if self._processes is not None and self._owner == os.getpid():
                self._processes.stop()
                self._processes.join()
            self._processes = None


POOL = DecodePool()
atexit.register(POOL.close)


def decode_square(data: bytes, size: int, box=None, wait: float | None = DECODE_WAIT) -> np.ndarray:
    """A photo from outside -> uint8 [3, size, size] (``box``: only that part of it, in the upright photo's pixels).
    QueryError (a ValueError) with a readable message for anything refused, undecodable or too costly; Busy when no
    decode slot frees within ``wait`` seconds (None: wait for one, as catalog builds do)."""
    return POOL.decode(headers.read(bytes(data)), size, box, True, wait)


def decode_many(photos: list[bytes], size: int) -> list:
    """Photos in bulk (a catalog build, the training image cache) -> each one's uint8 [3, size, size], or the
    QueryError that refused it, in order; BATCH photos a worker task. Waits for its turn however long it takes: a busy
    moment never marks a photo broken."""
    answers, readable = [], []
    for data in photos:
        try:
            answers.append(headers.read(bytes(data)))
            readable.append(len(answers) - 1)
        except QueryError as exc:
            answers.append(exc)
    for start in range(0, len(readable), BATCH):
        places = readable[start:start + BATCH]
        for place, answer in zip(places, POOL.decode_batch([answers[p] for p in places], size)):
            answers[place] = answer
    return answers


def open_rgb(data: bytes, max_side: int = 0):
    """A photo from outside as an upright RGB PIL image, through the same checks, at most about 4 x ``max_side`` on its
    long side (0: full size), for display. Only the worker's raw pixels are read here, never the file."""
    from PIL import Image

    width, height, pixels = POOL.decode(headers.read(bytes(data)), max_side, None, False)
    return Image.frombytes("RGB", (width, height), pixels)
