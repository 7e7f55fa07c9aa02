"""The MicroBatcher: concurrent queries embedded together, each answered with its own result; a failing batch
fails only its own requests."""
import threading
import time

import numpy as np

from fashion_search.serving.batching import MicroBatcher
from fashion_search.errors import ModelFailure, QueryError


def test_micro_batcher_answers_each_request_with_its_own_result():
    sizes = []

    def slow_double(batch):  # [B, 1] -> [B, 1]; slow enough that the other requests queue up meanwhile
        sizes.append(len(batch))
        time.sleep(0.05)
        return batch * 2

    batcher = MicroBatcher(slow_double, max_batch=16, max_wait=0.05)
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, batcher(np.array([i])))) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {i: int(r[0]) for i, r in results.items()} == {i: 2 * i for i in range(12)}
    assert sum(sizes) == 12 and max(sizes) > 1  # requests were embedded together


def test_micro_batcher_waits_for_as_many_requests_as_its_last_batch_and_no_more():
    sizes, gate = [], threading.Event()

    def record(batch):
        sizes.append(len(batch))
        gate.wait(5)  # the first batch holds until three more requests are queued: they form a batch of 3
        return batch

    batcher = MicroBatcher(record, max_batch=16, max_wait=1.0, recent_seconds=30)
    first = threading.Thread(target=batcher, args=(np.zeros(1),))
    first.start()
    while not sizes:
        time.sleep(0.005)
    queued = [threading.Thread(target=batcher, args=(np.zeros(1),)) for _ in range(3)]
    for thread in queued:
        thread.start()
    while batcher.requests.qsize() < 3:
        time.sleep(0.005)
    gate.set()
    for thread in [first, *queued]:
        thread.join()
    assert sizes == [1, 3]
    # The largest recent batch was 3: three requests 0.1 s apart still meet in one batch (max_wait is 1 s) ...
    staggered = [threading.Thread(target=batcher, args=(np.zeros(1),)) for _ in range(3)]
    for thread in staggered:
        thread.start()
        time.sleep(0.1)
    for thread in staggered:
        thread.join()
    assert sizes == [1, 3, 3]
    # ... while an idle batcher answers a lone request at once, without waiting for company.
    idle = MicroBatcher(lambda batch: batch, max_wait=1.0)
    started = time.perf_counter()
    idle(np.zeros(1))
    assert time.perf_counter() - started < 0.5


def test_micro_batcher_hands_an_error_to_every_request_of_the_batch_and_lives_on():
    calls, gate = [], threading.Event()

    def fail_first_batch(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            gate.wait(5)  # the others queue up meanwhile and form the second batch
            raise RuntimeError("out of memory")
        return batch

    batcher = MicroBatcher(fail_first_batch, max_wait=0.5)
    outcomes = {}

    def ask(i):
        try:
            outcomes[i] = batcher(np.array([i]))[0]
        except QueryError as exc:
            outcomes[i] = exc
    first = threading.Thread(target=ask, args=(0,))
    first.start()
    while not calls:
        time.sleep(0.005)
    others = [threading.Thread(target=ask, args=(i,)) for i in (1, 2, 3)]
    for thread in others:
        thread.start()
    while batcher.requests.qsize() < 3:
        time.sleep(0.005)
    gate.set()
    for thread in [first, *others]:
        thread.join()
    assert isinstance(outcomes[0], ModelFailure) and "RuntimeError: out of memory" in str(outcomes[0])
    assert [outcomes[i] for i in (1, 2, 3)] == [1, 2, 3]  # the next batch was answered
    assert batcher(np.ones(1))[0] == 1
