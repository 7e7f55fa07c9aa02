"""The server's front: listening before the index is whole, it says how far the start has got (status, a page that
reloads itself, 503 "index building" with Retry-After on every search route), then serves the JSON routes, then the
page."""
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fashion_search.cli import app
from conftest import child_env, free_port
from fashion_search.errors import UserError
from fashion_search.serving.front import MAX_RETRY_AFTER, Front, Server, Startup
from fashion_search.serving.json_api import json_app
from fashion_search.serving.page import page_app


def test_startup_reports_the_phase_the_photos_done_and_the_time_left_from_this_starts_own_rate(monkeypatch):
    """Chunks resumed from disk are not speed, and neither is the first chunk once a second is done."""
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    startup = Startup()
    assert startup.status()["state"] == "building" and startup.status()["seconds_left"] is None
    startup.begin("embedding the catalog")
    startup.advance(400, 1000)  # 400 resumed from disk: not this start's speed
    clock[0] += 10
    startup.advance(500, 1000)  # 100 photos in 10 s: 500 left, about 50 s
    status = startup.status()
    assert (status["done"], status["total"], status["seconds_left"]) == (500, 1000, 50.0)
    assert startup.message() == "index building: embedding the catalog, 500 of 1,000 photos (50%), about 50 s left"
    clock[0] += 2
    startup.advance(600, 1000)  # from the end of the first chunk (which paid for the compile): 50 photos/s
    assert startup.status()["seconds_left"] == 8.0
    startup.begin("building the index")
    assert startup.message() == "index building: building the index"
    startup.ready(1000)
    assert startup.status()["state"] == "ready" and startup.status()["items"] == 1000
    assert [phase for phase, _ in startup.status()["timeline"]] == [
        "listening", "embedding the catalog", "building the index", "ready"]


def test_the_server_answers_from_the_start_then_serves_the_json_routes_then_the_page(service):
    startup = Startup()
    front = Front(startup)
    port = free_port()
    server = Server(front, "127.0.0.1", port)
    base = f"http://127.0.0.1:{port}"
    try:
        startup.begin("embedding the catalog")
        startup.advance(0, 100)
        time.sleep(0.2)
        startup.advance(50, 100)
        status = httpx.get(f"{base}/api/status", timeout=10).json()
        assert status["state"] == "building" and (status["done"], status["total"]) == (50, 100)
        assert status["seconds_left"] > 0
        for answer in (httpx.get(f"{base}/api/search_text", params={"q": "shirt"}, timeout=10),
                       httpx.post(f"{base}/api/search_image", content=b"x", timeout=10),
                       httpx.get(f"{base}/gradio_api/info", timeout=10)):
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"].startswith("index building: embedding the catalog, 50 of 100 photos")
            assert 1 <= int(answer.headers["Retry-After"]) <= MAX_RETRY_AFTER
        page = httpx.get(base + "/", timeout=10)
        assert page.status_code == 200 and 'http-equiv="refresh"' in page.text
        assert '<progress max="100" value="50">' in page.text and "50 of 100 photos" in page.text

        front.serve_api(json_app(service, 1 << 20), len(service.catalog))
        answer = httpx.get(f"{base}/api/search_text", params={"q": "shirt"}, timeout=30)
        assert answer.status_code == 200 and len(answer.json()["results"]) == 5
        assert "the page is starting" in httpx.get(base + "/", timeout=10).text  # the JSON routes came first
        assert httpx.get(f"{base}/api/status", timeout=10).json()["state"] == "ready"

        front.serve_page(page_app(service))
        page = httpx.get(base + "/", timeout=10)
        assert page.status_code == 200 and "refresh" not in page.text and "gradio" in page.text.lower()
        assert httpx.get(f"{base}/gradio_api/info", timeout=10).status_code == 200
        assert httpx.get(f"{base}/api/status", timeout=10).json()["page"] == "serving"
    finally:
        server.close()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{base}/api/status", timeout=2)


def test_a_port_in_use_is_one_clear_error():
    port = free_port()
    first = Server(Front(Startup()), "127.0.0.1", port)
    try:
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}"):
            Server(Front(Startup()), "127.0.0.1", port)
    finally:
        first.close()


def test_a_first_start_reports_each_phase_and_the_embedding_photo_by_photo(clip_run, hub_dataset, cache_dir,
                                                                          tmp_path):
    run = tmp_path / "run"
    shutil.copytree(clip_run, run, ignore=shutil.ignore_patterns("index"))
    config = app.parse_config(["--run", str(run), "--dataset", str(hub_dataset), "--cache-dir", str(cache_dir)])
    reports = []
    startup = Startup()
    advance = startup.advance
    startup.advance = lambda done, total: (reports.append((done, total)), advance(done, total))
    service, _ = app.load_service(config, startup)
    phases = [phase for phase, _ in startup.status()["timeline"]]
    assert phases == ["listening", "loading the model", "loading the catalog", "embedding the catalog",
                      "building the index"]
    assert reports[0] == (0, 70) and reports[-1] == (70, 70)  # 70 rows, one of them undecodable
    assert len(service.catalog) == 69


def test_no_page_serves_the_json_routes_alone(clip_run, cache_dir):
    port = free_port()
    process = subprocess.Popen([sys.executable, "app.py", "--run", str(clip_run), "--cache-dir",
                                str(cache_dir), "--no-compile", "--no-page", "--port", str(port)],
                               cwd=Path(__file__).resolve().parents[1], env=child_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        status = {}
        while time.monotonic() < deadline and status.get("state") != "ready":
            assert process.poll() is None, process.stderr.read()[-2000:]
            try:
                status = httpx.get(f"{base}/api/status", timeout=5).json()
            except httpx.HTTPError:
                time.sleep(0.2)
        assert status["state"] == "ready" and status["page"] == "off"
        assert httpx.get(f"{base}/api/search_text", params={"q": "shirt"}, timeout=30).status_code == 200
        assert "JSON API alone" in httpx.get(base + "/", timeout=10).text
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.slow
def test_a_start_compiling_beside_live_queries_answers_every_query_and_its_status_throughout(clip_run, cache_dir,
                                                                                            tmp_path):
    """The query path compiles in a thread while photo queries already run eager (under autocast where the CPU has
    bf16). Twice: queries from the first second through the whole compile each get an answer (results, or 503 while
    the index is not whole), and /api/status answers all the while."""
    import io
    import threading

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buffer, "JPEG")
    photo = buffer.getvalue()
    for start in range(2):
        port, log_path = free_port(), tmp_path / f"app-{start}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen([sys.executable, "app.py", "--run", str(clip_run), "--cache-dir",
                                        str(cache_dir), "--port", str(port), "--no-page"],
                                       cwd=Path(__file__).resolve().parents[1], env=child_env(), stdout=log,
                                       stderr=subprocess.STDOUT)
        base, stop, answered, slow = f"http://127.0.0.1:{port}", threading.Event(), [], []

        def ask(route):
            while not stop.is_set():
                started = time.monotonic()
                try:
                    if route == "status":
                        status = httpx.get(f"{base}/api/status", timeout=10).status_code
                    else:
                        status = httpx.post(f"{base}/api/search_image", content=photo, timeout=10).status_code
                except httpx.ConnectError:
                    time.sleep(0.05)  # not listening yet
                    continue
                except httpx.TimeoutException:
                    status = "timeout"
                answered.append((route, status))
                if time.monotonic() - started > 5:
                    slow.append((route, time.monotonic() - started))
        clients = [threading.Thread(target=ask, args=(route,)) for route in ("status", "photo", "photo")]
        for client in clients:
            client.start()
        try:
            deadline = time.monotonic() + 240
            while "compiled the image query path" not in log_path.read_text() and time.monotonic() < deadline:
                assert process.poll() is None, f"start {start} ended ({process.returncode}): " + \
                    log_path.read_text()[-3000:]
                time.sleep(0.5)
            time.sleep(2)  # queries on the compiled graphs too
        finally:
            stop.set()
            for client in clients:
                client.join(20)
            process.terminate()
            process.wait(30)
        assert "compiled the image query path" in log_path.read_text(), f"start {start}: " + \
            log_path.read_text()[-3000:]
        assert not slow and all(status in (200, 503) for _, status in answered), (slow, answered[-5:])
        assert {status for route, status in answered if route == "photo"} >= {200}
