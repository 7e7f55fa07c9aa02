"""Concurrent queries embedded together, by one worker thread that owns the model."""
from __future__ import annotations

import collections
import threading
import time

import numpy as np

from fashion_search.errors import Busy, ModelFailure

# Requests waiting at once, beyond which one more is refused ("busy, try again") rather than queued without limit:
# enough for a burst from many clients, small enough that each waits seconds, not minutes. app.py bounds its routes
# with the same number.
MAX_PENDING = 64


class MicroBatcher:
    """Concurrent requests are embedded together: one worker thread owns the model (no thread oversubscription) and
    runs it once per batch of waiting requests. On a CPU a batch of 8 costs far less than 8 single calls.

    How long to wait for a batch to fill: under steady load from n clients the answers of one batch reach them at
    slightly different times, so their next requests arrive spread over a few milliseconds. A fixed short window split
    every round of 8 clients into a batch of 1 and a batch of 7 (BENCHMARKS.md, section 3), paying for one whole
    batch-1 forward pass per round. So the worker waits, at most ``max_wait`` seconds, until as many requests as the largest
    batch of the last ``recent_seconds`` are there; a lone client (largest recent batch: 1) never waits.

    At most ``max_pending`` requests wait: one more is refused at once (Busy). No request waits longer than
    ``timeout`` seconds for its answer, and a batch the model fails on fails only its own requests (ModelFailure)."""

    def __init__(self, fn, max_batch=16, max_wait=0.03, recent_seconds=1.0, max_pending=MAX_PENDING, timeout=60.0):
        import queue

        self.fn, self.max_batch, self.max_wait, self.timeout = fn, max_batch, max_wait, timeout
        self.recent_seconds = recent_seconds
        self.requests = queue.Queue(maxsize=max_pending)
        self.adding = threading.Lock()
        self.recent = collections.deque()  # (finished at, batch size) of the batches of the last `recent_seconds`
        threading.Thread(target=self._work, daemon=True, name="embed-batcher").start()

    def __call__(self, item):
        return self.map([item])[0]

    def map(self, items):
        """Each item's answer, in order: all are queued at once (so they share batches), or none is (Busy)."""
        import queue
        from concurrent.futures import Future, TimeoutError as FutureTimeout

        futures = [Future() for _ in items]
        with self.adding:  # a caller's items go in together, or not at all
            if self.requests.maxsize - self.requests.qsize() < len(items):
                raise Busy("busy, try again in a moment")
            for item, future in zip(items, futures):
                try:
                    self.requests.put_nowait((item, future))
                except queue.Full:  # only this caller adds under the lock; the worker only takes
                    raise Busy("busy, try again in a moment") from None
        deadline = time.monotonic() + self.timeout
        try:
            return [future.result(timeout=max(0.0, deadline - time.monotonic())) for future in futures]
        except FutureTimeout:
            for future in futures:
                future.cancel()  # the worker skips those it has not started yet
            raise Busy(f"busy: no answer within {self.timeout:g} s, try again") from None

    def expected_batch(self, now: float) -> int:
        """How many requests to wait for: the largest batch of the last `recent_seconds` (1 when idle)."""
        while self.recent and now - self.recent[0][0] > self.recent_seconds:
            self.recent.popleft()
        return min(self.max_batch, max((size for _, size in self.recent), default=1))

    def _work(self):
        import queue

        while True:
            batch = [self.requests.get()]
            started = time.monotonic()
            wanted, deadline = self.expected_batch(started), started + self.max_wait
            while len(batch) < self.max_batch:
                # Up to `wanted`, wait for stragglers until the deadline; beyond it, take only what is already queued.
                timeout = max(0.0, deadline - time.monotonic()) if len(batch) < wanted else 0.0
                try:
                    batch.append(self.requests.get(timeout=timeout))
                except queue.Empty:
                    break
            batch = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                results = self.fn(np.stack([item for item, _ in batch]))
                for (_, future), result in zip(batch, results):
                    future.set_result(result)
            except Exception as exc:  # noqa: BLE001 - handed to every request of this batch, the worker lives on
                failure = ModelFailure(f"the model failed on this query ({type(exc).__name__}: {str(exc)[:200]})")
                for _, future in batch:
                    future.set_exception(failure)
            self.recent.append((time.monotonic(), len(batch)))
