"""What an attacker or a new user tries: slow servers, URLs in file routes, text search on an untrained text
tower, users' own catalogs, unknown filters, overload (crafted checkpoints: test_checkpoints.py). Every address
outside loopback is refused by the conftest guard, so a wrong guard in the code under test fails the test instead
of reaching the network."""
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashion_search.cli import app
from conftest import free_port, tiny_args
from fashion_search.errors import UserError
from fashion_search.serving import fetch, json_api
from fashion_search.serving.batching import MicroBatcher
from fashion_search.errors import Busy, QueryError
from fashion_search.serving.page import CACHE_CLEANING, build_page, page_app

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- 2. one deadline for a whole fetch

class Drip(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    requests = []

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        Drip.requests.append(self.path)
        if self.path == "/drip-headers":  # a valid response whose headers arrive a byte every 0.1 s, for 20 s
            try:
                for byte in b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nX-Padding: " + b"a" * 200:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
        else:
            body = jpeg()
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


def jpeg(colour=(200, 30, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def drip_server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_headers_dripping_a_byte_at_a_time_are_cut_off_at_the_deadline(drip_server, monkeypatch):
    monkeypatch.setattr(fetch, "TOTAL_TIMEOUT", 2.0)
    started = time.monotonic()
    with pytest.raises(QueryError, match="longer than 2 s"):
        fetch.fetch_url(f"{drip_server}/drip-headers", allow_private=True)
    assert time.monotonic() - started < 3.0  # deadline + 1 s


def test_a_stalled_tls_handshake_is_cut_off_at_the_deadline(monkeypatch):
    """A server that accepts the connection and never answers the TLS hello."""
    monkeypatch.setattr(fetch, "TOTAL_TIMEOUT", 2.0)
    monkeypatch.setattr(fetch, "READ_TIMEOUT", 60.0)  # the deadline, not a per-read timeout, must end it
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        started = time.monotonic()
        with pytest.raises(QueryError, match="longer than 2 s"):
            fetch.fetch_url(f"https://127.0.0.1:{listener.getsockname()[1]}/x.jpg", allow_private=True)
        assert time.monotonic() - started < 3.0
    finally:
        listener.close()


def test_a_slow_name_lookup_counts_against_the_deadline(monkeypatch):
    monkeypatch.setattr(fetch, "TOTAL_TIMEOUT", 1.0)
    monkeypatch.setattr(fetch.socket, "getaddrinfo", lambda *args, **kwargs: time.sleep(5))
    started = time.monotonic()
    with pytest.raises(QueryError, match="longer than 1 s"):
        fetch.fetch_url("http://slow-dns.test/x.jpg")
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("address", [
    "64:ff9b::a00:1",       # NAT64 of 10.0.0.1
    "64:ff9b:1::a00:1",     # local-use NAT64
    "2002:a00:1::1",        # 6to4 of 10.0.0.1
    "2001:0:4136:e378::1",  # Teredo
    "::a00:1",              # IPv4-compatible ::10.0.0.1
    "fec0::1",              # site-local
    "::ffff:0:7f00:1",      # IPv4-translated (SIIT) 127.0.0.1
    "::ffff:0:a00:1",       # IPv4-translated 10.0.0.1
    "192.88.99.1",          # the retired 6to4 relay anycast range
    "100.64.0.1", "100.100.100.200", "100.127.255.254"])  # shared address space (cloud metadata at .200)
def test_ranges_that_is_global_lets_through_are_refused(address, monkeypatch):
    with pytest.raises(QueryError, match="non-public address"):
        fetch.check_address(address, allow_private=False)
    # ... also when a public-looking name resolves to one of them
    monkeypatch.setattr(fetch.socket, "getaddrinfo",
                        lambda *args, **kwargs: [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, 80))])
    with pytest.raises(QueryError, match="non-public address"):
        fetch.fetch_url("http://images.example/x.jpg")


def test_public_addresses_still_pass():
    for address in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "8.8.8.8"):
        assert fetch.check_address(address, allow_private=False)


# --------------------------------------------------------------------------- 3. no URL through a file route

@pytest.mark.parametrize("where", ["loopback", "shared"])
def test_a_url_in_place_of_an_uploaded_file_is_refused_and_never_fetched(served, drip_server, where, loopback_only):
    from gradio_client import Client, handle_file

    url = f"{drip_server}/x.jpg" if where == "loopback" else "http://100.64.0.1/x.jpg"  # Gradio's own check allows both
    Drip.requests.clear()
    client = Client(served, verbose=False)
    with pytest.raises(Exception, match="file inputs take uploaded files only"):
        client.predict(handle_file(url), "Any", "Any", "Any", "Any", api_name="/search_image")
    assert Drip.requests == [] and loopback_only == []  # nothing was fetched, from either address


# --------------------------------------------------------------------------- 4. text search needs a trained text tower

@pytest.fixture(scope="module")
def imageonly_clip(tmp_path_factory, processed, cache_dir):
    from fashion_search.cli import clip

    run = tmp_path_factory.mktemp("imageonly") / "clip"
    clip.main(tiny_args(processed, run, cache_dir, "--text-loss-weight", "0", "--max-steps", "2"))
    return run


def test_a_text_tower_trained_without_the_text_term_is_recorded_and_words_search_the_catalogs_text(
        imageonly_clip, clip_run, cache_dir):
    """Its text tower is never used: words search the catalog's own text (lexically) on every route, and asking for
    the vector ranking says why it cannot be had."""
    import httpx
    from gradio_client import Client

    record = json.loads((imageonly_clip / "hf_model" / "text_tower.json").read_text())
    assert record["usable"] is False and "--text-loss-weight" in record["why"]
    assert json.loads((clip_run / "hf_model" / "text_tower.json").read_text())["usable"] is True
    service, _ = app.load_service(app.parse_config(["--run", str(imageonly_clip), "--cache-dir", str(cache_dir)]))
    found = service.search_text("red shirt")
    assert found and all("Red" in r["productDisplayName"] or r["articleType"] == "Shirts" for r in found)
    with pytest.raises(QueryError, match="--text-loss-weight"):
        service.search_text("red shirt", "Any", "Any", "Any", "Any", "vector")
    page = build_page(service)
    modes = [block for block in page.blocks.values() if getattr(block, "label", None) == "rank by"]
    assert [choice[0] for choice in modes[0].choices] == ["lexical"] and "--text-loss-weight" in modes[0].info
    port = free_port()
    server = app.serve(service, port=port)
    try:
        base = f"http://127.0.0.1:{port}"
        answer = httpx.get(f"{base}/api/search_text", params={"q": "red shirt"}, timeout=30)
        assert answer.status_code == 200 and [r["id"] for r in answer.json()["results"]] == [r["id"] for r in found]
        answer = httpx.get(f"{base}/api/search_text", params={"q": "red shirt", "mode": "vector"}, timeout=30)
        assert answer.status_code == 400 and "--text-loss-weight" in answer.json()["error"]
        api = Client(base + "/", verbose=False).predict("red shirt", "Any", "Any", "Any", "Any",
                                                        api_name="/search_text")
        assert [r["id"] for r in api] == [r["id"] for r in found]
    finally:
        server.close()


# --------------------------------------------------------------------------- 5. users' own catalogs

def test_a_folder_of_photos_is_a_catalog_with_ids_from_file_names(clip_run, cache_dir, tmp_path):
    photos = tmp_path / "my-photos"
    photos.mkdir()
    colours = {"red-dress": (200, 30, 30), "blue-shirt": (30, 60, 200), "green-cap": (30, 160, 60),
               "black-shoe": (20, 20, 20), "white-tee": (240, 240, 240), "grey-bag": (128, 128, 128)}
    for name, colour in colours.items():
        (photos / f"{name}.jpg").write_bytes(jpeg(colour))
    run = tmp_path / "run"
    shutil.copytree(clip_run, run, ignore=shutil.ignore_patterns("index"))
    service, _ = app.load_service(app.parse_config(["--run", str(run), "--dataset", str(photos),
                                                  "--cache-dir", str(cache_dir)]))
    assert sorted(service.catalog.store.items()[0]) == sorted(colours) and service.filter_columns == []
    results = service.search_image_bytes(jpeg(colours["green-cap"]))
    assert results[0]["id"] == "green-cap" and results[0]["articleType"] == "" and len(results) == 5
    assert service.search_item("green-cap")[0]["id"] == "green-cap"
    with pytest.raises(QueryError, match="cannot be filtered by gender"):
        service.catalog.search(service.catalog.vector("red-dress"), {"gender": "Men"})


def write_dataset(folder, columns):
    import datasets

    folder.mkdir(parents=True)
    features = {name: datasets.Image() if name == "image" else datasets.Value("int64" if name == "id" else "string")
                for name in columns}
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(str(folder / "data.parquet"))
    return folder


def test_a_dataset_with_only_ids_and_images_serves_with_no_filters(clip_run, cache_dir, tmp_path):
    folder = write_dataset(tmp_path / "ids-and-images", {"id": [7, 8, 9, 10, 11, 12], "image": [
        {"bytes": jpeg((40 * i, 30, 200 - 30 * i)), "path": None} for i in range(6)]})
    run = tmp_path / "run"
    shutil.copytree(clip_run, run, ignore=shutil.ignore_patterns("index"))
    service, _ = app.load_service(app.parse_config(["--run", str(run), "--dataset", str(folder),
                                                  "--cache-dir", str(cache_dir)]))
    assert service.filter_columns == [] and len(service.catalog) == 6
    results = service.search_item(9)
    assert results[0]["id"] == 9 and results[0]["gender"] == ""
    assert [caption for _, caption in service.gallery(results)]  # the page draws results without the columns


@pytest.mark.parametrize("columns, message", [
    ({"id": [1, 2], "name": ["a", "b"]}, "has no 'image' column"),
    ({"id": [], "image": []}, "has no rows")])
def test_a_dataset_without_images_is_one_clear_line_and_exit_code_2(clip_run, cache_dir, tmp_path, columns,
                                                                     message):
    folder = write_dataset(tmp_path / "bad", columns)
    result = subprocess.run([sys.executable, "app.py", "--run", str(clip_run), "--dataset", str(folder),
                             "--cache-dir", str(cache_dir), "--port", str(free_port())], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # beside datasets' bars
    assert len(errors) == 1 and message in errors[0] and errors[0] == result.stderr.strip().splitlines()[-1]


def test_embed_only_writes_beside_the_trained_run_never_into_it(trained_runs, hub_dataset, tmp_path, capsys):
    from fashion_search.cli import resnet

    run = tmp_path / "resnet"
    shutil.copytree(trained_runs["resnet"], run)
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*")}
    resnet.main(["--embed-only", "--checkpoint", str(run), "--data", str(hub_dataset), "--device", "cpu",
                 "--cache-dir", str(tmp_path / "cache")])
    beside = tmp_path / f"resnet-embed-{hub_dataset.name}"
    assert (beside / "embeddings" / "all.npy").exists() and str(beside) in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # the run is untouched
    with pytest.raises(UserError, match="is the trained run itself"):
        resnet.main(["--embed-only", "--checkpoint", str(run), "--data", str(hub_dataset), "--device", "cpu",
                     "--output-dir", str(run) + "/"])


# --------------------------------------------------------------------------- 6. filters

def test_base_colour_filters_and_unknown_values_name_the_valid_ones(service, served):
    import httpx

    assert service.page_columns == ["gender", "masterCategory", "articleType", "baseColour"]
    data = service.catalog.image_bytes(service.catalog.store.items()[0][0])
    reds = service.search_image_bytes(data, None, None, None, "Red")
    assert reds and all(r["baseColour"] == "Red" for r in reds)
    with pytest.raises(QueryError, match=r"unknown baseColour 'Mauve'; valid values: Black, Blue, Green, Red"):
        service.search_image_bytes(data, None, None, None, "Mauve")
    answer = httpx.get(served + "api/search_text", params={"q": "shirt", "baseColour": "Mauve"}, timeout=30)
    assert answer.status_code == 400 and "valid values: Black, Blue, Green, Red" in answer.json()["error"]
    answer = httpx.get(served + "api/search_text", params={"q": "shirt", "colour": "Red"}, timeout=30)
    assert answer.status_code == 400 and "unknown parameter 'colour'" in answer.json()["error"]
    ok = httpx.get(served + "api/search_text", params={"q": "shirt", "baseColour": "Blue"}, timeout=30)
    assert ok.status_code == 200 and all(r["baseColour"] == "Blue" for r in ok.json()["results"])
    from gradio_client import Client

    client = Client(served, verbose=False)
    with pytest.raises(Exception, match="unknown baseColour 'Mauve'; valid values"):
        client.predict("shirt", "Any", "Any", "Any", "Mauve", api_name="/search_text")
    assert all(r["baseColour"] == "Red" for r in client.predict("shirt", "Any", "Any", "Any", "Red",
                                                                api_name="/search_text"))


# --------------------------------------------------------------------------- 7. overload and long life

def test_a_full_batcher_refuses_at_once_and_no_request_waits_forever():
    gate, outcomes = threading.Event(), []
    batcher = MicroBatcher(lambda batch: (gate.wait(10), batch)[1], max_pending=2, timeout=0.5)

    def ask():
        try:
            outcomes.append(batcher(np.zeros(1)))
        except Busy as exc:
            outcomes.append(str(exc))
    waiting = [threading.Thread(target=ask) for _ in range(3)]
    for thread in waiting:  # one runs (blocked on the gate), two wait in the queue
        thread.start()
        time.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(Busy, match="busy, try again"):
        batcher(np.zeros(1))
    assert time.monotonic() - started < 0.1  # refused at once
    for thread in waiting:
        thread.join(5)
    assert outcomes == ["busy: no answer within 0.5 s, try again"] * 3  # each gave up after its timeout
    gate.set()


def test_the_json_routes_answer_503_with_retry_after_when_full(served, monkeypatch):
    import httpx

    monkeypatch.setattr(json_api, "MAX_PENDING", 0)
    answer = httpx.get(served + "api/search_text", params={"q": "shirt"}, timeout=30)
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
    assert "busy, try again" in answer.json()["error"]


def test_the_gradio_queue_is_bounded_and_its_cache_cleaned(service):
    mounted = page_app(service).routes[-1].app  # the Gradio app at the page's root
    page = mounted.get_blocks()
    assert page.delete_cache == CACHE_CLEANING and page._queue.max_size == json_api.MAX_PENDING


def test_the_json_item_route_goes_through_the_gate(served, service):
    import httpx

    first = service.catalog.store.items()[0][0]
    answer = httpx.get(served + "api/search_item", params={"id": first}, timeout=30)
    assert answer.status_code == 200 and str(answer.json()["results"][0]["id"]) == first
    for bad, message in (("x'] or key not in ['x", "not in the catalog"), ("", "give an item id"),
                         ("9" * 600, "at most 512 bytes")):
        answer = httpx.get(served + "api/search_item", params={"id": bad}, timeout=30)
        assert answer.status_code == 400 and message in answer.json()["error"], answer.text
