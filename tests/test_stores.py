"""The store contract, run against every backend: the FAISS folder, Milvus Lite, a Milvus server started here on
loopback (the `milvus` package's embedded standalone server), and the server MILVUS_URI names when it is set."""
import multiprocessing
import os
import signal
import threading

import numpy as np
import pytest

from conftest import STORE_COLOURS as COLOURS, STORE_DIM, store_items as items
from fashion_search.stores import faiss_index, faiss_store, faiss_versions, open_store

DIM = STORE_DIM


def brute_force(vectors, query, k, allowed=None):
    scores = vectors @ query
    if allowed is not None:
        scores = np.where(allowed, scores, -np.inf)
    return [i for i in np.argsort(-scores, kind="stable")[:k] if np.isfinite(scores[i])]


def built(spec, folder, count=60):
    store = open_store(spec, folder, DIM, "run#1")
    assert store.fingerprint == ""  # new: the caller fills it
    keys, vectors, records = items(count)
    store.build("run#1", keys, vectors, records)
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
    assert store.values()["baseColour"] == sorted(COLOURS)
    store.close()


def test_upsert_replaces_and_a_reopened_store_keeps_its_items(spec):
    store, keys, vectors, records = built(*spec)
    new_keys, new_vectors, new_records = items(3, start=1000, seed=1)
    store.upsert(new_keys + ["5"], np.vstack([new_vectors, vectors[6]]), new_records + [{**records[5], "id": 55}])
    store.close()
    again = open_store(spec[0], spec[1], DIM, "run#1")
    assert again.fingerprint == "run#1" and again.count() == len(keys) + 3
    assert again.search(new_vectors[1], 1)[0].key == "1001"
    vector, record = again.fetch("5")
    assert record["id"] == 55 and np.allclose(vector, vectors[6], atol=1e-6)  # replaced, not duplicated
    again.close()


def test_a_store_of_another_model_is_rebuilt_or_refused(spec):
    from fashion_search.errors import UserError

    store, *_ = built(*spec)
    store.close()
    if spec[0] == "faiss":  # derived from the run: rebuilt
        assert open_store(spec[0], spec[1], DIM, "run#2").fingerprint == ""
    else:  # a collection may be shared: never dropped here
        with pytest.raises(UserError, match="holds another catalog"):
            open_store(spec[0], spec[1], DIM, "run#2")


def test_a_store_of_another_source_is_refused_unchanged_where_no_rebuild_is_wanted(spec):
    """catalog.py (rebuild=False) never empties the catalog an app serves from another source: it is refused, names
    its source, and still holds every item afterwards."""
    from fashion_search.stores import OtherCatalog

    store, keys, *_ = built(*spec)
    store.close()
    with pytest.raises(OtherCatalog, match="holds the catalog of run, not of dataset:/data/shop") as caught:
        open_store(spec[0], spec[1], DIM, "dataset:/data/shop#1", rebuild=False)
    assert caught.value.source == "run"
    again = open_store(spec[0], spec[1], DIM, "run#1", rebuild=False)
    assert again.fingerprint == "run#1" and again.count() == len(keys)
    again.close()


# FAISS specifics: HNSW with tombstones, compaction, and a writer killed mid-update -------------------------------

def test_hnsw_tombstones_are_never_returned_and_compaction_rebuilds(tmp_path, monkeypatch):
    monkeypatch.setattr(faiss_store, "EXACT_FILTERED_UP_TO", 100)  # filtered searches take the graph path here
    count = faiss_index.EXACT_UP_TO + 200
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
    store = open_store("faiss", folder, DIM, "run#1")
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
    after = open_store("faiss", tmp_path, DIM, "run#1")
    assert after.count() == len(keys)  # the old catalog: CURRENT never named the half-written version
    assert after.fingerprint == "run#1"
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the killed writer's half version
    writer = context.Process(target=_slow_upsert, args=(tmp_path, False))  # the next write lands whole
    writer.start()
    writer.join()
    assert writer.exitcode == 0 and open_store("faiss", tmp_path, DIM, "run#1").count() == len(keys) + 10
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # and clears the leftovers


def _many_upserts(folder, start, barrier):
    """A writer of its own (another process, as two catalog.py runs are): 15 upserts of one item each."""
    store = open_store("faiss", folder, DIM, "run#1")
    barrier.wait()
    for i in range(15):
        keys, vectors, records = items(1, start=start + i, seed=start + i)
        store.upsert(keys, vectors, records)


def test_two_writers_at_once_lose_nothing(tmp_path):
    """Two processes each adding items one at a time to the same FAISS folder, at the same moment: every item of
    both is there afterwards, because each write takes the folder's lock and starts from the latest version."""
    _, keys, *_ = built("faiss", tmp_path)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    writers = [context.Process(target=_many_upserts, args=(tmp_path, start, barrier)) for start in (7000, 8000)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
    assert [writer.exitcode for writer in writers] == [0, 0]
    after = open_store("faiss", tmp_path, DIM, "run#1")
    held = set(after.items()[0])
    assert after.count() == len(keys) + 30
    assert {str(k) for k in [*range(7000, 7015), *range(8000, 8015)]} <= held


HOSTILE_IDS = ["levi's", 'say "hi"', "back\\slash", "a]b", "two\nlines", "x'] or key not in ['x",
               'x"] or key not in ["x', "naïve 😀"]


def test_ids_stay_data_found_by_their_own_id_and_removed_one_at_a_time(spec):
    """Ids with quotes, backslashes, brackets, a newline and an injection string: each is found by its own id and
    by no other, removing one removes exactly one, and an unknown id is simply absent."""
    store, keys, vectors, records = built(*spec, count=20)
    rng = np.random.default_rng(1)
    extra = rng.standard_normal((len(HOSTILE_IDS), DIM)).astype(np.float32)
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    store.upsert(HOSTILE_IDS, extra, [{"id": key, "productDisplayName": key, "baseColour": key} for key in
                                      HOSTILE_IDS])
    assert store.count() == 20 + len(HOSTILE_IDS)
    for key, vector in zip(HOSTILE_IDS, extra):
        found = store.fetch(key)
        assert found is not None and found[1]["id"] == key
        np.testing.assert_allclose(found[0], vector, atol=1e-6)
        hits = store.search(vector, 1, {"baseColour": key})  # a hostile filter value is data too
        assert [hit.key for hit in hits] == [key]
    assert store.fetch("x") is None and store.fetch("x' or 'a'=='a") is None
    assert store.delete(["x'] or key not in ['x"]) == 1
    assert store.count() == 20 + len(HOSTILE_IDS) - 1
    assert store.delete(["no such item", 'x"] or key not in ["x']) == 1
    assert store.count() == 20 + len(HOSTILE_IDS) - 2
    assert all(store.fetch(key) is not None for key in keys)  # the base catalog is untouched


def test_an_empty_store_answers_no_results(spec):
    store = open_store(spec[0], spec[1], DIM, "run#1")
    assert store.count() == 0 and store.search(np.ones(DIM, np.float32) / 4, 5) == []


# ------------------------------------------------------------------ the FAISS store never loses an update

def versions_on_disk(folder):
    return sorted(p.name for p in folder.glob("v*") if p.is_dir())


@pytest.mark.parametrize("fault", ["damaged", "gone during open"])
def test_a_current_version_that_cannot_be_read_falls_back_to_the_newest_intact_one(tmp_path, fault, monkeypatch,
                                                                                  capsys):
    folder = tmp_path / "index"
    store, keys, vectors, records = built("faiss", folder, count=10)
    store.upsert(*items(3, start=100, seed=1))  # v2: an update to keep
    store.upsert(*items(3, start=200, seed=2))  # v3: CURRENT
    assert versions_on_disk(folder) == ["v000001", "v000002", "v000003"]
    if fault == "damaged":
        (folder / "v000003" / "index.faiss").write_bytes(b"damaged")
    else:  # removed between reading CURRENT and loading it
        real = faiss_versions.load_version

        def vanishing(path, dim):
            if path.name == "v000003":
                import shutil
                shutil.rmtree(path, ignore_errors=True)
            return real(path, dim)
        monkeypatch.setattr(faiss_versions, "load_version", vanishing)
    reopened = open_store("faiss", folder, DIM, "run#1")
    assert reopened.fingerprint == "run#1"  # not empty: the app does not rebuild the base catalog over it
    assert reopened.count() == 13 and reopened.fetch("101") is not None
    assert "serving v000002, the newest version that reads" in capsys.readouterr().out
    reopened.upsert(*items(1, start=300, seed=3))
    assert faiss_versions.read_json(folder / "CURRENT")["version"] == "v000004"  # numbering goes on, never restarts
    assert {"v000001", "v000002", "v000004"} <= set(versions_on_disk(folder))  # no intact version deleted
    assert faiss_versions.load_version(folder / "v000002", DIM) is not None


def test_32_threads_searching_across_one_write_cause_one_load(tmp_path, monkeypatch):
    import time

    folder = tmp_path / "index"
    reader, keys, vectors, _ = built("faiss", folder, count=10)
    writer = open_store("faiss", folder, DIM, "run#1")
    loads, real = [], faiss_versions.load_version

    def slow_load(path, dim):
        loads.append(path.name)
        time.sleep(0.3)  # a slow load: every thread arrives while it runs
        return real(path, dim)
    writer.upsert(*items(2, start=500, seed=5))
    monkeypatch.setattr(faiss_versions, "load_version", slow_load)
    found = []
    threads = [threading.Thread(target=lambda: (reader.refresh(), found.append(reader.fetch("500") is not None)))
               for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loads == ["v000002"] and all(found) and len(found) == 32


def test_a_version_that_fails_to_load_is_tried_once_until_current_changes(tmp_path, monkeypatch):
    """A damaged current version costs one failed load, not one per query; the next write is loaded."""
    folder = tmp_path / "index"
    reader, *_ = built("faiss", folder, count=10)
    writer = open_store("faiss", folder, DIM, "run#1")
    writer.upsert(*items(2, start=500, seed=5))
    real, loads = faiss_versions.load_version, []

    def damaged(path, dim):
        loads.append(path.name)
        return None if path.name == "v000002" else real(path, dim)
    monkeypatch.setattr(faiss_versions, "load_version", damaged)
    threads = [threading.Thread(target=reader.refresh) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for _ in range(100):
        assert reader.refresh() is False and reader.fetch("500") is None  # queries keep the version they have
    assert loads == ["v000002"]
    writer.upsert(*items(2, start=600, seed=6))  # CURRENT changes: the new version is loaded
    assert reader.refresh() is True and reader.fetch("600") is not None


def test_filters_take_several_values_exclusions_and_any_column(spec):
    from fashion_search.stores import Match

    store = open_store(*spec, DIM, "run#1")
    keys, vectors, records = items(60)
    for i, record in enumerate(records):
        record["season"] = ("Summer", "Winter", "Fall")[i % 3]
        record["year"] = 2010.0 + i % 2
    store.build("run#1", keys, vectors, records)
    query = vectors[0]
    for filters, allowed in (
            ({"baseColour": Match(("Red", "Blue"))}, lambda r: r["baseColour"] in ("Red", "Blue")),
            ({"baseColour": Match(("Red",), exclude=True)}, lambda r: r["baseColour"] != "Red"),
            ({"season": Match(("Winter",)), "year": Match(("2011",))}, lambda r: r["season"] == "Winter" and
             r["year"] == 2011.0),
            ({"season": Match(("Summer", "Fall"), exclude=True), "articleType": "Shirts"},
             lambda r: r["season"] == "Winter" and r["articleType"] == "Shirts")):
        mask = np.array([allowed(r) for r in records])
        expected = [keys[i] for i in brute_force(vectors, query, 10, mask)]
        assert [hit.key for hit in store.search(query, 10, filters)] == expected, filters
    values = store.values()
    assert values["season"] == ["Fall", "Summer", "Winter"] and values["year"] == ["2010", "2011"]
    assert "productDisplayName" not in values and "id" not in values


def test_pages_of_25_concatenated_equal_one_query_of_100(spec, request):
    """Through HNSW too (6,000 items on FAISS; an HNSW index on the server), pages never overlap or skip."""
    name, folder = spec
    if "index=FLAT" in name and "catalog.db" not in name:  # the server: its HNSW index
        name = name.replace("index=FLAT", "index=HNSW")
    store = open_store(name, folder, DIM, "run#1")
    count = 6000 if name == "faiss" else 400
    keys, vectors, records = items(count)
    store.build("run#1", keys, vectors, records)
    if name == "faiss":
        assert store.kind == "IndexHNSWFlat"
    for query in vectors[:3] + 0.05:
        whole = [hit.key for hit in store.search(query, 100)]
        pages = [hit.key for offset in range(0, 100, 25) for hit in store.search(query, 25, offset=offset)]
        assert pages == whole and len(set(whole)) == 100
        filtered = [hit.key for hit in store.search(query, 40, {"baseColour": "Red"})]
        paged = [hit.key for offset in (0, 20) for hit in store.search(query, 20, {"baseColour": "Red"}, offset)]
        assert paged == filtered
