"""The store contract, run against every backend: the FAISS folder, Milvus Lite, a Milvus server started here on
loopback (the `milvus` package's embedded standalone server), and the server MILVUS_URI names when it is set."""
import multiprocessing
import os
import signal
import subprocess

import numpy as np
import pytest

from conftest import free_port
from fashion_search.stores import faiss_store, open_store

DIM = 16
COLOURS = ("Red", "Blue", "Green")


def items(count, start=0, seed=0):
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    keys = [str(start + i) for i in range(count)]
    records = [{"id": start + i, "productDisplayName": f"item {start + i}", "baseColour": COLOURS[i % 3],
                "articleType": "Shirts" if i % 2 else "Watches", "gender": "Men"} for i in range(count)]
    return keys, vectors, records


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """A Milvus standalone server on a free loopback port for this session, stopped at the end with nothing left
    running."""
    milvus = pytest.importorskip("milvus")
    server = milvus.default_server
    server.set_base_dir(str(tmp_path_factory.mktemp("milvus-server")))
    server.listen_port = free_port()
    server.start()
    yield f"milvus://127.0.0.1:{server.listen_port}"
    server.stop()
    left = subprocess.run(["pgrep", "-f", "milvus run standalone"], capture_output=True, text=True).stdout.split()
    assert not left, f"milvus processes left running: {left}"


BACKENDS = ["faiss", "lite", "server"] + (["env"] if os.environ.get("MILVUS_URI") else [])


@pytest.fixture(params=BACKENDS)
def spec(request, tmp_path):
    """(spec, folder) of an exact (FLAT) configuration of each backend, fresh for each test."""
    if request.param == "faiss":
        return "faiss", tmp_path / "index"
    pytest.importorskip("pymilvus")
    collection = f"contract_{request.node.name.split('[')[0][-20:]}_{os.getpid()}"
    if request.param == "lite":
        return f"milvus:{tmp_path / 'catalog.db'}?index=FLAT&consistency=Strong", tmp_path
    if request.param == "server":
        base = request.getfixturevalue("milvus_server")
    else:
        base = os.environ["MILVUS_URI"].rstrip("/").replace("http://", "milvus://")
    return f"{base}/{collection}?index=FLAT&consistency=Strong", tmp_path


def brute_force(vectors, query, k, allowed=None):
    scores = vectors @ query
    if allowed is not None:
        scores = np.where(allowed, scores, -np.inf)
    return [i for i in np.argsort(-scores, kind="stable")[:k] if np.isfinite(scores[i])]


def built(spec, folder, count=60):
    store = open_store(spec, folder, DIM, "fp-1")
    assert store.fingerprint == ""  # new: the caller fills it
    keys, vectors, records = items(count)
    store.build("fp-1", keys, vectors, records)
    return store, keys, vectors, records


def test_top_5_equals_brute_force(spec):
    store, keys, vectors, _ = built(*spec)
    assert store.count() == len(keys)
    for query in vectors[:5] + 0.1:
        hits = store.search(query / np.linalg.norm(query), 5)
        assert [h.key for h in hits] == [keys[i] for i in brute_force(vectors, query / np.linalg.norm(query), 5)]
    hit = store.search(vectors[7], 1)[0]
    assert hit.key == "7" and hit.record["id"] == 7 and hit.score == pytest.approx(1.0, abs=1e-4)  # types kept
    store.close()


def test_a_deleted_item_never_comes_back(spec):
    store, keys, vectors, _ = built(*spec)
    assert store.delete(["7", "8", "no-such-item"]) == 2
    assert store.count() == len(keys) - 2
    found = {h.key for query in vectors[5:10] for h in store.search(query, 10)}
    assert not found & {"7", "8"} and store.fetch("7") is None
    store.close()


def test_filters_restrict_inside_the_search(spec):
    store, keys, vectors, records = built(*spec)
    allowed = np.array([r["baseColour"] == "Blue" and r["articleType"] == "Shirts" for r in records])
    for query in vectors[:4]:
        hits = store.search(query, 5, {"baseColour": "Blue", "articleType": "Shirts"})
        assert [h.key for h in hits] == [keys[i] for i in brute_force(vectors, query, 5, allowed)]
        assert len(hits) == 5  # as many as asked, since enough items match
    assert store.values("baseColour") == sorted(COLOURS)
    store.close()


def test_upsert_replaces_and_a_reopened_store_keeps_its_items(spec):
    store, keys, vectors, records = built(*spec)
    new_keys, new_vectors, new_records = items(3, start=1000, seed=1)
    store.upsert(new_keys + ["5"], np.vstack([new_vectors, vectors[6]]), new_records + [{**records[5], "id": 55}])
    store.close()
    again = open_store(spec[0], spec[1], DIM, "fp-1")
    assert again.fingerprint == "fp-1" and again.count() == len(keys) + 3
    assert again.search(new_vectors[1], 1)[0].key == "1001"
    vector, record = again.fetch("5")
    assert record["id"] == 55 and np.allclose(vector, vectors[6], atol=1e-6)  # replaced, not duplicated
    again.close()


def test_a_store_of_another_model_is_rebuilt_or_refused(spec):
    from fashion_search.errors import UserError

    store, *_ = built(*spec)
    store.close()
    if spec[0] == "faiss":  # derived from the run: rebuilt
        assert open_store(spec[0], spec[1], DIM, "fp-2").fingerprint == ""
    else:  # a collection may be shared: never dropped here
        with pytest.raises(UserError, match="holds another catalog"):
            open_store(spec[0], spec[1], DIM, "fp-2")


# FAISS specifics: HNSW with tombstones, compaction, and a writer killed mid-update -------------------------------

def test_hnsw_tombstones_are_never_returned_and_compaction_rebuilds(tmp_path, monkeypatch):
    monkeypatch.setattr(faiss_store, "EXACT_FILTERED_UP_TO", 100)  # filtered searches take the graph path here
    count = faiss_store.EXACT_UP_TO + 200
    store = open_store("faiss", tmp_path, DIM, "fp")
    keys, vectors, records = items(count)
    store.build("fp", keys, vectors, records)
    assert store.kind == "IndexHNSWFlat"
    gone = keys[:100]
    store.delete(gone)
    found = {h.key for query in vectors[:100] for h in store.search(query, 5)}
    assert not found & set(gone)
    filtered = [h for query in vectors[:100] for h in store.search(query, 5, {"baseColour": "Red"})]
    assert all(h.record["baseColour"] == "Red" and h.key not in gone for h in filtered) and len(filtered) == 500
    store.delete(keys[100:count // 4 + 200])  # past a quarter: the next write compacts
    reopened = open_store("faiss", tmp_path, DIM, "fp")
    assert reopened.count() == count - (count // 4 + 200)
    assert reopened._state.dead == 0  # compacted: no tombstones left in the saved index
    assert reopened.kind == "IndexFlatIP"  # and the catalog is now small enough to be exact


def _slow_upsert(folder, pause):
    """A writer that pauses inside the write (after the index file, before CURRENT is swapped)."""
    import faiss

    write_index = faiss.write_index

    def slow(index, path):
        write_index(index, path)
        os.kill(os.getpid(), signal.SIGSTOP) if pause else None

    faiss.write_index = slow
    store = open_store("faiss", folder, DIM, "fp-1")
    keys, vectors, records = items(10, start=5000, seed=2)
    store.upsert(keys, vectors, records)


def test_a_writer_killed_mid_update_leaves_the_old_or_the_new_catalog(tmp_path):
    store, keys, *_ = built("faiss", tmp_path)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no OpenMP or Arrow threads forked
    child = context.Process(target=_slow_upsert, args=(tmp_path, True))
    child.start()
    for _ in range(200):  # stopped inside the write
        state = open(f"/proc/{child.pid}/stat").read().split()[2]
        if state == "T":
            break
        child.join(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    after = open_store("faiss", tmp_path, DIM, "fp-1")
    assert after.count() == len(keys)  # the old catalog: CURRENT never named the half-written version
    assert after.fingerprint == "fp-1"
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the killed writer's half version
    writer = context.Process(target=_slow_upsert, args=(tmp_path, False))  # the next write lands whole
    writer.start()
    writer.join()
    assert writer.exitcode == 0 and open_store("faiss", tmp_path, DIM, "fp-1").count() == len(keys) + 10
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # and clears the leftovers
