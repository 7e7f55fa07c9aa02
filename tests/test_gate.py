"""The gate: ids are bounded data; hostile photos through a running app's routes cost the server little and stall
nobody (peak memory, time, upload cache, a good query from another client meanwhile); upload bodies within the
bound. The photos' own checks and decode are tested in test_photos.py."""
import base64
import contextlib
import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import hostile
import httpx
import numpy as np
import pytest
from conftest import child_env, free_port
from PIL import Image

from fashion_search.errors import Busy, QueryError
from fashion_search.serving import gate

REPO = Path(__file__).resolve().parents[1]
CASES = {name: (build, file_name, expect) for name, build, file_name, expect in hostile.CASES}


def test_ids_are_bounded_data():
    assert gate.item_id(10003.0) == "10003" == gate.item_id(np.int64(10003)) == gate.item_id(" 10003 ")
    assert gate.item_id("x'] or key not in ['x") == "x'] or key not in ['x"
    with pytest.raises(QueryError, match="at most 512 bytes"):
        gate.item_id("x" * 513)
    with pytest.raises(QueryError, match="give an item id"):
        gate.item_id("  ")


# ----------------------------------------------------------------------------- through a running app

def rss_kb(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def folder_bytes(folder):
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def app_process(clip_run, cache_dir, tmp_path_factory):
    """The app in its own process (its memory measured alone), with its own temp folders and a watchdog that kills it
    past 3 GB, so that a gate that fails cannot take this machine's memory."""
    temp = tmp_path_factory.mktemp("app-temp")
    port = free_port()
    env = child_env(TMPDIR=str(temp), GRADIO_TEMP_DIR=str(temp / "gradio"), OMP_NUM_THREADS="2")
    log = open(temp / "app.log", "w")
    process = subprocess.Popen([sys.executable, "app.py", "--run", str(clip_run), "--cache-dir",
                                str(cache_dir), "--no-compile", "--port", str(port), "--allow-private-urls"],
                               cwd=REPO, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    stop = threading.Event()

    def watchdog():
        while not stop.wait(0.05) and process.poll() is None:
            if rss_kb(process.pid, "VmRSS") > 3 << 20:
                process.kill()
    threading.Thread(target=watchdog, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, (temp / "app.log").read_text()[-3000:]
        try:
            if httpx.get(url + "/api/status", timeout=2).json()["page"] == "serving":  # the JSON routes come first
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    yield process, url, temp / "gradio"
    stop.set()
    process.terminate()
    process.wait(30)
    log.close()


def good_photo():
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


def measured(process, url, send):
    """(answer, seconds, peak RSS growth in MB, seconds a good JSON query from another client took meanwhile)."""
    pid = process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    before = rss_kb(pid, "VmRSS")
    other = {}

    def good_client():
        time.sleep(0.1)
        started = time.monotonic()
        response = httpx.post(url + "/api/search_image", content=good_photo(), timeout=30)
        other["seconds"], other["status"] = time.monotonic() - started, response.status_code
    thread = threading.Thread(target=good_client)
    thread.start()
    started = time.monotonic()
    answer = send()
    seconds = time.monotonic() - started
    thread.join()
    assert other["status"] == 200
    return answer, seconds, (rss_kb(pid, "VmHWM") - before) / 1024, other["seconds"]


def children_peak_mb(pid) -> float:
    """The largest peak RSS (VmHWM) among a process's children: its decode workers."""
    peaks = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in children.read_text().split():
            try:
                peaks.append(rss_kb(child, "VmHWM") / 1024)
            except (AssertionError, OSError):  # a child that ended meanwhile
                pass
    return max(peaks, default=0.0)


@pytest.fixture(scope="module")
def photo_server():
    """A local HTTP server that serves whatever a test puts in its ``photos`` (path -> bytes), for the URL route."""
    import http.server

    photos = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            body = photos.get(self.path, b"")
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", photos
    httpd.shutdown()


def send_to(url, route, data, file_name, tmp_path, photo_server):
    """Send a photo by one route: (answer to compare with the case's expectation: "results", a message or an
    exception)."""
    if route == "url":
        base, photos = photo_server
        photos["/" + file_name] = data
        response = httpx.get(url + "/api/search_url", params={"url": f"{base}/{file_name}"}, timeout=60)
        return response.status_code, response.json()
    if route == "json":
        response = httpx.post(url + "/api/search_image", content=data, timeout=60)
        return response.status_code, response.json()
    if route == "composed":
        body = json.dumps({"parts": [{"photo": base64.b64encode(data).decode()}, {"text": "shirt", "weight": 0.2}]})
        response = httpx.post(url + "/api/search", content=body, timeout=60)
        return response.status_code, response.json()
    if route == "batch":  # the hostile photo between two good ones: only its own answer is an error
        files = [("p", ("a.jpg", good_photo())), ("p", (file_name, data)), ("p", ("c.jpg", good_photo()))]
        response = httpx.post(url + "/api/search_batch", files=files, timeout=60)
        answers = response.json()["answers"]
        assert response.status_code == 200 and "results" in answers[0] and "results" in answers[2], answers
        answer = answers[1]
        return (400, answer) if "error" in answer else (200, answer)
    from gradio_client import Client, handle_file

    path = tmp_path / file_name  # the name that made Gradio re-encode the upload
    path.write_bytes(data)
    client = Client(url + "/", verbose=False)
    try:
        return client.predict(handle_file(str(path)), "Any", "Any", "Any", "Any", api_name="/search_image")
    except Exception as exc:  # noqa: BLE001 - gradio_client raises AppError with the app's message
        return exc


@pytest.mark.parametrize("route", ["json", "url", "composed", "batch", "gradio"])
@pytest.mark.parametrize("name", list(CASES))
def test_hostile_photos_through_the_app_cost_little_and_stall_nobody(app_process, photo_server, name, route,
                                                                      tmp_path):
    """Every route that takes a photo (a URL's body too): each hostile one is answered within 2 s (results, or its
    message), the server's peak RSS grows by at most 300 MB (it never decodes), no decode worker passes its limit,
    and a good query from another client meanwhile is answered within 2 s."""
    from fashion_search.photos.pool import WORKER_MEMORY

    process, url, gradio_cache = app_process
    build, file_name, expect = CASES[name]
    data = build()
    cache_before = folder_bytes(gradio_cache) if gradio_cache.exists() else 0
    answer, seconds, grown, other = measured(process, url, lambda: send_to(url, route, data, file_name, tmp_path,
                                                                           photo_server))
    if route != "gradio":
        status, body = answer
        if expect == "results":
            assert status == 200 and len(body["results"]) == 5, body
        else:
            assert status == 400 and expect in body["error"], body
    else:
        if expect == "results":
            assert isinstance(answer, list) and len(answer) == 5, answer
        else:
            assert isinstance(answer, Exception) and expect in str(answer), answer
        # the upload itself, stored once as it came: nothing decoded, converted or re-encoded into the cache
        assert folder_bytes(gradio_cache) - cache_before <= len(data) + 4096
    assert seconds < 2, f"{name} took {seconds:.1f} s"
    assert grown <= 300, f"{name} raised peak RSS by {grown:.0f} MB"
    assert children_peak_mb(process.pid) <= (WORKER_MEMORY >> 20) + 300  # a worker's own start, plus its limit
    assert other < 2, f"a good query waited {other:.1f} s meanwhile"


# ----------------------------------------------------------------------------- upload bodies

def trickle(url, seconds, stop):
    """A raw HTTP upload that sends its headers, then a byte every 0.2 s; returns what the server answered."""
    import socket

    host, port = url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=seconds + 10)
    sock.sendall(b"POST /api/search_image HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
    sock.settimeout(0.2)
    answer, started = b"", time.monotonic()
    try:
        while time.monotonic() - started < seconds and not stop.is_set():
            try:
                answer += sock.recv(4096)
                if answer:  # the rest of the answer follows at once
                    sock.settimeout(1)
                    with contextlib.suppress(OSError):
                        while more := sock.recv(4096):
                            answer += more
                    break
            except socket.timeout:
                pass
            try:
                sock.sendall(b"\0")
            except OSError:
                break
    finally:
        sock.close()
    return answer.decode("latin-1")


def test_the_65th_trickling_upload_is_refused_before_it_has_finished_and_a_slow_one_is_cut_off(served, monkeypatch):
    """64 uploads that never finish hold every slot: the 65th gets 503 at once, while it is still sending. A body
    slower than the deadline is cut off with 408."""
    from fashion_search.serving.json_api import MAX_PENDING

    url = served.rstrip("/")
    stop = threading.Event()
    answers = [None] * MAX_PENDING
    threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, trickle(url, 40, stop)))
               for i in range(MAX_PENDING)]
    for thread in threads:
        thread.start()
    time.sleep(2)  # every trickle has its slot
    started = time.monotonic()
    last = trickle(url, 10, threading.Event())
    assert "503" in last.split("\r\n")[0] and "retry-after" in last.lower(), last
    assert time.monotonic() - started < 2
    stop.set()
    for thread in threads:
        thread.join()

    monkeypatch.setattr(gate, "UPLOAD_DEADLINE", 1.0)
    time.sleep(1)  # the stopped trickles' requests end (their bodies never arrive: cut off at their deadline)
    started = time.monotonic()
    slow = trickle(url, 10, threading.Event())
    assert "408" in slow.split("\r\n")[0] and "did not arrive within 1 s" in slow, slow
    assert time.monotonic() - started < 3


def test_unfinished_uploads_hold_at_most_the_upload_budget():
    budget = gate.UploadBudget(limit=100)
    budget.take(60)
    with pytest.raises(Busy):
        budget.take(50)
    budget.give(60)
    budget.take(100)
    assert budget.held == 100
