"""Shared fixtures: a small hub-layout dataset of real JPEG bytes that the tests generate, the processed splits,
and tiny trained runs. No test touches the network: the hub is switched to offline mode before any import."""
import functools
import http.server
import io
import ipaddress
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-product-images-small"
# (articleType, masterCategory, rows): one class of 1 row (dropped), one of 2 (too small to stratify).
CLASSES = [("Tshirts", "Apparel", 18), ("Shirts", "Apparel", 14), ("Watches", "Accessories", 12),
           ("Casual Shoes", "Footwear", 12), ("Handbags", "Accessories", 10), ("Caps", "Accessories", 2),
           ("Ties", "Accessories", 1)]
COLOURS = {"Red": (200, 30, 30), "Blue": (30, 60, 200), "Green": (30, 160, 60), "Black": (20, 20, 20)}


def product_photo(class_index: int, colour, rng, size=64) -> bytes:
    """A white-background 'product': a class-specific shape in a colour, jittered, saved as JPEG."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    jitter = rng.integers(-4, 5, size=4)
    box = [8 + jitter[0], 8 + jitter[1], size - 8 + jitter[2], size - 8 + jitter[3]]
    shape = class_index % 4
    if shape == 0:
        draw.rectangle(box, fill=colour)
    elif shape == 1:
        draw.ellipse(box, fill=colour)
    elif shape == 2:
        draw.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=colour)
    else:
        draw.rectangle(box, outline=colour, width=6)
    stripes = class_index // 4 + 1
    for i in range(stripes):
        draw.line([(box[0], box[1] + 10 * (i + 1)), (box[2], box[1] + 10 * (i + 1))], fill=(255, 255, 255), width=2)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_hub_dataset(folder: Path, corrupt_rows: int = 1) -> Path:
    """The hub dataset's layout and columns (data/train-00000-of-00001.parquet with an Image feature)."""
    import datasets

    rng = np.random.default_rng(0)
    rows = {key: [] for key in ("id", "gender", "masterCategory", "subCategory", "articleType", "baseColour",
                                "season", "year", "usage", "productDisplayName", "image")}
    next_id = 10000
    for class_index, (article, master, count) in enumerate(CLASSES):
        for i in range(count):
            colour = list(COLOURS)[i % len(COLOURS)]
            gender = ("Men", "Women")[i % 2]
            rows["id"].append(next_id)
            rows["gender"].append(gender)
            rows["masterCategory"].append(master)
            rows["subCategory"].append(master + "Sub")
            rows["articleType"].append(article)
            rows["baseColour"].append(colour)
            rows["season"].append("Summer")
            rows["year"].append(2012.0)
            rows["usage"].append("Casual")
            rows["productDisplayName"].append(f"Brand{i % 3} {gender} {colour} {article}")
            rows["image"].append({"bytes": product_photo(class_index, COLOURS[colour], rng), "path": None})
            next_id += 1
    for i in range(corrupt_rows):  # undecodable bytes: data preparation must drop and count them
        for key in rows:
            rows[key].append(rows[key][0] if key != "id" else next_id + i)
        rows["image"][-1] = {"bytes": b"\xff\xd8\xff\xe0 truncated jpeg", "path": None}
    features = datasets.Features({
        "id": datasets.Value("int64"), **{k: datasets.Value("string") for k in (
            "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season")},
        "year": datasets.Value("float64"), "usage": datasets.Value("string"),
        "productDisplayName": datasets.Value("string"), "image": datasets.Image()})
    (folder / "data").mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


@pytest.fixture(scope="session")
def hub_dataset(tmp_path_factory) -> Path:
    return make_hub_dataset(tmp_path_factory.mktemp("hub") / "fashion-fixture")


@pytest.fixture(scope="session")
def processed(tmp_path_factory, hub_dataset) -> Path:
    from fashion_search.cli import data_preparation

    out = tmp_path_factory.mktemp("processed") / "processed"
    data_preparation.main(["--dataset", str(hub_dataset), "--output-dir", str(out), "--val-fraction", "0.2",
                           "--test-fraction", "0.2"])
    return out


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_args(processed, out, cache_dir, *extra):
    return ["--tiny", "--data", str(processed), "--output-dir", str(out), "--cache-dir", str(cache_dir),
            "--image-size", "32", "--epochs", "2", "--batch-size", "16", "--lr", "1e-3", "--device", "cpu", *extra]


@pytest.fixture(scope="session")
def clip_run(tmp_path_factory, processed, cache_dir) -> Path:
    """The tiny clip.py run: all that the app's tests need."""
    from fashion_search.cli import clip

    run = tmp_path_factory.mktemp("runs") / "clip"
    clip.main(tiny_args(processed, run, cache_dir))
    return run


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory, processed, cache_dir, clip_run) -> dict:
    """One tiny trained run per model script (the model and evaluation tests)."""
    from fashion_search.cli import resnet, siamese, vae

    root = tmp_path_factory.mktemp("runs")
    runs = {"clip": clip_run}
    for name, module, extra in (("resnet", resnet, ()), ("siamese", siamese, ("--classes-per-batch", "4")),
                                ("vae", vae, ("--head", "cosine"))):
        runs[name] = root / name
        module.main(tiny_args(processed, runs[name], cache_dir, *extra))
    return {name: runs[name] for name in ("resnet", "siamese", "clip", "vae")}


@pytest.fixture(scope="session")
def service(clip_run, cache_dir):
    """The app's search service over the tiny CLIP run (URL queries may reach 127.0.0.1 for the local test server)."""
    from fashion_search.cli import app

    config = app.parse_config(["--run", str(clip_run), "--cache-dir", str(cache_dir), "--allow-private-urls"])
    service, notice = app.load_service(config)
    assert notice == ""
    return service


@pytest.fixture
def live(clip_run, cache_dir, tmp_path):
    """A service of its own over a copy of the clip run, for tests that change its catalog."""
    from fashion_search.cli import app

    run = tmp_path / "run"
    shutil.copytree(clip_run, run, ignore=shutil.ignore_patterns("index"))
    service, _ = app.load_service(app.parse_config(["--run", str(run), "--cache-dir", str(cache_dir)]))
    return run, service


def _loopback(host) -> bool:
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """No test sends a packet beyond loopback, even when the code under test is wrong: a connection to another
    address, or a name look-up other than localhost, is recorded and refused, and the test fails."""
    attempts = []
    real_connect, real_connect_ex, real_getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def guard(address):
        if isinstance(address, tuple) and not _loopback(address[0]):
            attempts.append(address)
            raise OSError(f"test guard: connection to {address[0]} refused (loopback only)")

    def connect(sock, address):
        guard(address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        guard(address)
        return real_connect_ex(sock, address)

    def getaddrinfo(host, port=None, *args, **kwargs):
        if host is not None and host != "localhost":
            try:  # a numeric address in any form the resolver takes (2130706433 is 127.0.0.1) needs no look-up
                real_getaddrinfo(host, port, flags=socket.AI_NUMERICHOST)
            except socket.gaierror:
                attempts.append((host, "lookup"))
                raise socket.gaierror(socket.EAI_NONAME, f"test guard: no look-up of {host!r} (loopback only)") from None
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts
    assert not attempts, f"the test tried to reach beyond loopback: {attempts}"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def served(service):
    """The page + API on 127.0.0.1 (a free port), for gradio_client, the browser and the web-safety tests."""
    from fashion_search.cli import app

    port = free_port()
    server = app.serve(service, port=port)
    yield f"http://127.0.0.1:{port}/"
    server.close()


@functools.lru_cache(maxsize=1)
def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def loopback_namespace(command: list[str]) -> list[str]:
    """``command`` run in a new network namespace with only loopback up: whatever a child process does (gloo picking
    an interface, Ray finding its address), no packet can leave the machine."""
    if not _can_unshare():
        pytest.skip("needs `unshare --net` (root, or user namespaces) to keep child processes on loopback")
    return ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]


def child_env(**extra) -> dict:
    """The environment for a child Python process of a test: offline, one thread per process (2 cores), quiet."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0", **extra}


# ----------------------------------------------------------------- a local HTTP server for the URL route's cases

def jpeg_bytes(colour=(200, 30, 30), size=(40, 40)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves the cases the URL guard must handle."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send(self, status, body=b"", content_type="image/jpeg", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        port = self.server.server_address[1]
        if self.path == "/img.jpg":
            self.send(200, jpeg_bytes())
        elif self.path == "/html":
            self.send(200, b"<html></html>", "text/html")
        elif self.path.startswith("/redirect/"):
            hops = int(self.path.rsplit("/", 1)[1])
            target = "/img.jpg" if hops == 0 else f"/redirect/{hops - 1}"
            self.send(302, headers=[("Location", target)])
        elif self.path == "/to-private":
            self.send(302, headers=[("Location", f"http://127.0.0.1:{port}/img.jpg")])
        elif self.path == "/huge-declared":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(50 * 2**20))
            self.end_headers()
        elif self.path == "/endless":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            try:
                for _ in range(2000):  # 2000 x 64 KiB = 125 MiB, far past the cap; bounded all the same
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(40):  # a byte every 0.5 s: each read succeeds, the total deadline must stop it
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.5)
            except OSError:
                pass
        elif self.path == "/not-an-image":
            self.send(200, b"hello, this is text", "image/jpeg")
        else:
            self.send(404, b"", "text/plain")


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


# The vector stores' backends (tests/test_stores.py, tests/test_store_words.py)
STORE_DIM = 16
STORE_COLOURS = ("Red", "Blue", "Green")


def store_items(count, start=0, seed=0):
    """(keys, unit vectors [count, STORE_DIM], records) of a store test's items."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, STORE_DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    keys = [str(start + i) for i in range(count)]
    records = [{"id": start + i, "productDisplayName": f"item {start + i}", "baseColour": STORE_COLOURS[i % 3],
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


BACKENDS = ["faiss", "lite", pytest.param("server", marks=pytest.mark.slow)] + (
    ["env"] if os.environ.get("MILVUS_URI") else [])


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
