"""Find the five catalog items that look most like a photo: a Gradio page and a program API over a FAISS index
of CLIP embeddings. Queries: an uploaded photo, an image URL, a text description (CLIP's text tower), or a click
on a result. Optional filters (gender, masterCategory, articleType, baseColour) are applied inside the search.

Usage: python app.py [--run runs/clip] [--dataset PATH] [--host 127.0.0.1] [--port 7860]
"""
from __future__ import annotations

import argparse
import collections
import http.client
import ipaddress
import json
import os
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import numpy as np
import pandas as pd
import torch

import common
import evaluation

HUB_MODEL = "openai/clip-vit-base-patch32"
TOP_K = 5
ANY = "Any"
FILTER_COLUMNS = ("gender", "masterCategory", "articleType", "baseColour")
RESULT_FIELDS = ("id", "productDisplayName", "articleType", "baseColour", "gender")
MAX_DOWNLOAD_BYTES = 10 * 1024 * 1024
MAX_REDIRECTS = 3
CONNECT_TIMEOUT, READ_TIMEOUT, TOTAL_TIMEOUT = 3.0, 5.0, 15.0
# Requests waiting at once, per route family, beyond which a request is refused ("busy, try again") rather than
# queued without limit: enough for a burst from many clients, small enough that each waits seconds, not minutes.
MAX_PENDING = 64
RETRY_AFTER_SECONDS = 1
# Gradio's cache of uploads and of files it served: every 10 minutes, files older than an hour are removed.
CACHE_CLEANING = (600, 3600)


class QueryError(ValueError):
    """Bad or refused input: its message is shown on the page and raised to API clients as gr.Error."""
    status = 400


class Busy(QueryError):
    """Too many requests are waiting: refused at once rather than queued without limit."""
    status = 503


class ModelFailure(QueryError):
    """The model failed on the batch this request was in (the other batches are unaffected)."""
    status = 500


# --------------------------------------------------------------------------- safe URL fetching

# Ranges that Python 3.11's ipaddress.is_global lets through but that lead into private networks: NAT64 and 6to4 /
# Teredo / IPv4-compatible addresses embed an IPv4 address a gateway may forward to; site-local is the old private
# IPv6 range; 100.64.0.0/10 is carrier-grade NAT space, where clouds put metadata services (100.100.100.200).
REFUSED_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32", "::/96", "fec0::/10", "100.64.0.0/10"))


def check_address(address: str, allow_private: bool):
    """Refuse every address that is not public unicast (loopback, private, link-local, multicast, reserved,
    unspecified, shared, documentation, and the tunnelling ranges of REFUSED_NETWORKS), IPv4-mapped IPv6 included."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    tunnelled = any(ip.version == net.version and ip in net for net in REFUSED_NETWORKS)
    if not allow_private and (not ip.is_global or tunnelled) or ip.is_multicast or ip.is_unspecified:
        raise QueryError(f"refused: the URL points to a non-public address ({ip})")
    return str(ip)


class Deadline:
    """One wall-clock limit for a whole fetch: DNS, connect, TLS, headers, every redirect and the body."""

    def __init__(self, seconds: float):
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left; QueryError once none are."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise self.error()
        return left

    def error(self) -> QueryError:
        return QueryError(f"refused: fetching the URL took longer than {self.seconds:g} s")

    def watch(self, sock):
        """Shut ``sock`` down when the deadline passes, which ends any read or handshake blocked on it however
        slowly its peer drips bytes (a per-read timeout never fires while bytes keep coming)."""
        timer = threading.Timer(self.left(), _shutdown, (sock,))
        timer.daemon = True
        timer.start()
        return timer


def _shutdown(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


def resolve_public(host: str, port: int, allow_private: bool, deadline: Deadline | None = None) -> str:
    """Resolve once and check every address; the connection then goes to the checked address (no DNS rebinding).
    The lookup runs in a helper thread so that a slow resolver cannot outlast the deadline."""
    from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout

    pool = ThreadPoolExecutor(max_workers=1)
    lookup = pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    pool.shutdown(wait=False)
    try:
        infos = lookup.result(timeout=deadline.left() if deadline else None)
    except FutureTimeout:
        raise deadline.error() from None
    except (socket.gaierror, UnicodeError) as exc:
        raise QueryError(f"cannot resolve host {host!r} ({exc})") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        check_address(address, allow_private)
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the checked address, within the deadline, with a watchdog on the socket."""

    def __init__(self, host, port, address, deadline: Deadline):
        super().__init__(host, port, timeout=min(READ_TIMEOUT, deadline.left()))
        self._address, self._deadline, self.watchdog = address, deadline, None

    def _open(self):
        sock = socket.create_connection((self._address, self.port), timeout=min(CONNECT_TIMEOUT, self._deadline.left()))
        self.watchdog = self._deadline.watch(sock)
        sock.settimeout(min(READ_TIMEOUT, self._deadline.left()))
        return sock

    def connect(self):
        self.sock = self._open()

    def close(self):
        super().close()
        if self.watchdog is not None:
            self.watchdog.cancel()


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    default_port = 443

    def connect(self):
        # the certificate is checked for the host name; the handshake runs under the same watchdog
        self.sock = ssl.create_default_context().wrap_socket(self._open(), server_hostname=self.host)


def fetch_url(url: str, allow_private: bool = False, max_bytes: int = MAX_DOWNLOAD_BYTES) -> bytes:
    """GET an image over http(s) with every guard a public server needs: scheme check, public-address check on
    every hop (at most MAX_REDIRECTS redirects), connect and read timeouts, one TOTAL_TIMEOUT deadline over the
    whole fetch, a streamed size cap."""
    url = (url or "").strip()
    deadline = Deadline(TOTAL_TIMEOUT)
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise QueryError(f"refused: only http and https URLs are fetched, not {parts.scheme or 'no scheme'!r}")
        if not parts.hostname:
            raise QueryError("refused: the URL has no host")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise QueryError("refused: the URL has an invalid port") from None
        address = resolve_public(parts.hostname, port, allow_private, deadline)
        connection_class = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        connection = connection_class(parts.hostname, port, address, deadline)
        try:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("GET", path, headers={"User-Agent": "fashion-search/1.0", "Accept": "image/*"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise QueryError(f"the server answered {response.status} without a Location")
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise QueryError(f"the server answered HTTP {response.status} for this URL")
            content_type = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if content_type and not content_type.startswith("image/") and content_type != "application/octet-stream":
                raise QueryError(f"refused: the URL serves {content_type!r}, not an image")
            declared = response.getheader("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise QueryError(f"refused: the image is larger than {max_bytes // 2**20} MB")
            body = bytearray()
            while chunk := response.read1(65536):  # read1: whatever arrived, so a trickling body hits the deadline
                body += chunk
                if len(body) > max_bytes:
                    raise QueryError(f"refused: the image is larger than {max_bytes // 2**20} MB")
                deadline.left()
            deadline.left()  # a body the watchdog cut short ends like a whole one: only the clock tells them apart
            return bytes(body)
        except (TimeoutError, socket.timeout):
            deadline.left()
            raise QueryError("the server did not answer in time") from None
        except (OSError, http.client.HTTPException) as exc:
            deadline.left()  # the watchdog's shutdown surfaces as a closed connection
            raise QueryError(f"could not fetch the URL ({type(exc).__name__}: {exc})") from None
        finally:
            connection.close()
    raise QueryError(f"refused: more than {MAX_REDIRECTS} redirects")


# --------------------------------------------------------------------------- the model, the catalog, the index

class MicroBatcher:
    """Concurrent requests are embedded together: one worker thread owns the model (no thread oversubscription) and
    runs it once per batch of waiting requests. On a CPU a batch of 8 costs far less than 8 single calls.

    How long to wait for a batch to fill: under steady load from n clients the answers of one batch reach them at
    slightly different times, so their next requests arrive spread over a few milliseconds. A fixed 3 ms window split
    every round of 8 clients into a batch of 1 and a batch of 7 (measured: 21 of each), paying for one whole batch-1
    forward pass per round. So the worker waits, at most ``max_wait`` seconds, until as many requests as the largest
    batch of the last ``memory`` seconds are there; a lone client (largest recent batch: 1) never waits.

    At most ``max_pending`` requests wait: one more is refused at once (Busy). No request waits longer than
    ``timeout`` seconds for its answer, and a batch the model fails on fails only its own requests (ModelFailure)."""

    def __init__(self, fn, max_batch=16, max_wait=0.03, memory=1.0, max_pending=64, timeout=60.0):
        import queue

        self.fn, self.max_batch, self.max_wait, self.memory, self.timeout = fn, max_batch, max_wait, memory, timeout
        self.requests = queue.Queue(maxsize=max_pending)
        self.recent = collections.deque()  # (finished at, batch size) of the batches of the last `memory` seconds
        threading.Thread(target=self._work, daemon=True, name="embed-batcher").start()

    def __call__(self, item):
        import queue
        from concurrent.futures import Future, TimeoutError as FutureTimeout

        future = Future()
        try:
            self.requests.put_nowait((item, future))
        except queue.Full:
            raise Busy("busy, try again in a moment") from None
        try:
            return future.result(timeout=self.timeout)
        except FutureTimeout:
            future.cancel()  # the worker skips it if it has not started it yet
            raise Busy(f"busy: no answer within {self.timeout:g} s, try again") from None

    def expected_batch(self, now: float) -> int:
        """How many requests to wait for: the largest batch of the last `memory` seconds (1 when idle)."""
        while self.recent and now - self.recent[0][0] > self.memory:
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


TEXT_TOWER_FILE = "text_tower.json"  # written by clip.py beside the exported model
QUERY_BATCH = 8  # the bigger of the two compiled query batch sizes (the other is 1)
INT8_CALIBRATION_PHOTOS = 64


class VisionTower(torch.nn.Module):
    """CLIP's image embedding (vision transformer, then projection: what get_image_features computes) as a module
    that owns its weights, so that torch.export and the int8 quantizer see them."""

    def __init__(self, vision_model, projection):
        super().__init__()
        self.vision_model, self.projection = vision_model, projection

    def forward(self, pixel_values):  # [B, 3, S, S] -> [B, projection_dim]
        return self.projection(self.vision_model(pixel_values=pixel_values).pooler_output)


class QueryGraphs:
    """The compiled query path, called like a model's embed: batches of 8 through one graph, of 1 through another."""

    def __init__(self, single, batch):
        self.single, self.batch = single, batch

    def __call__(self, pixels):
        return (self.batch if len(pixels) == QUERY_BATCH else self.single)(pixels)


def text_tower_usable(model_path: str) -> tuple[bool, str]:
    """(usable, why not) for the text tower of a CLIP folder, as clip.py recorded it in text_tower.json; a folder
    without that file (a pretrained model) is taken as usable."""
    record = read_json(Path(model_path) / TEXT_TOWER_FILE)
    if record.get("usable", True):
        return True, ""
    return False, record.get("why") or "this model's text tower was not trained (train clip.py with --text-loss-weight > 0)"


class Encoder:
    """CLIP image and text towers, with the same preprocessing as training (pad to a white square, resize)."""

    def __init__(self, model_path: str, device="cpu", int8=True):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a local model loads in a moment: no bar in the server's log

        self.model = common.load_pretrained(CLIPModel.from_pretrained, model_path, "CLIP model").eval()
        self.tokenizer = common.load_pretrained(CLIPTokenizer.from_pretrained, model_path, "CLIP tokenizer")
        processor = common.load_pretrained(CLIPImageProcessor.from_pretrained, model_path, "CLIP image processor")
        size = processor.crop_size if processor.do_center_crop else processor.size
        self.image_size = int(size.get("height") or size.get("shortest_edge"))
        self.mean, self.std = tuple(processor.image_mean), tuple(processor.image_std)
        self.device = common.resolve_device(device)
        self.dtype = common.autocast_dtype(self.device)
        # Inference only: bf16 weights run the ViT 1.5x faster on a bf16 CPU than autocast over fp32 weights,
        # which re-casts every weight on every call (benchmarks/embed_throughput.py).
        self.model.to(self.device, dtype=self.dtype or torch.float32)
        self.dim = self.model.config.projection_dim
        self.text_search, self.text_search_why = text_tower_usable(model_path)
        self.int8_worthwhile = int8  # False: a very big catalog embeds in bf16 too (common.job_embed)
        self.query_model = None  # QueryGraphs once compile_queries() ran; None = eager
        self.batcher = MicroBatcher(self.embed_queries)

    def embed_pixels(self, images_uint8: np.ndarray, progress=False, compiled=None) -> np.ndarray:
        """uint8 [B, 3, S, S] -> float32 [B, D], unit length (``compiled``: a common.CompiledEmbed of self)."""
        return common.embed_images(self, images_uint8, self.device, self.dtype, desc="embed catalog",
                                   progress=progress, compiled=compiled)

    def embed_queries(self, images_uint8: np.ndarray, compiled=None) -> np.ndarray:
        """The MicroBatcher's batch of 1-16 query images. Eager: one forward pass at the batch's own size. Once
        compile_queries() ran (or with ``compiled``): passes at the two compiled sizes, 8 (the last padded) while 4
        or more images are left, since one pass of 8 costs about four of 1, then passes of 1."""
        compiled = compiled or self.query_model
        parts, start = [], 0
        while start < len(images_uint8):
            left = len(images_uint8) - start
            size = left if compiled is None else QUERY_BATCH if left >= QUERY_BATCH // 2 else 1
            parts.append(common.embed_images(self, images_uint8[start:start + size], self.device, self.dtype,
                                             batch_size=size, progress=False, compiled=compiled))
            start += size
        return np.concatenate(parts)

    def compile_queries(self, calibration: np.ndarray | None = None):
        """Compile the query path at its two batch sizes, 1 (one user at a time) and 8 (concurrent users), now rather
        than on users' first queries: with the weights frozen in, the ViT-B/32 ran batch 1 in 19-30 ms against 31-45
        eager, and batch 8 in 77-134 ms against 97-168 (2 CPU cores, BENCHMARKS.md section 3). A graph with a
        symbolic batch size, for any size, gained only 1.0-1.2x. With ``calibration`` photos (uint8 [N, 3, S, S],
        N >= 8) the batch-8 graph is int8 instead (quantize_int8_batches). Queries run eager until both graphs are
        ready, so it may run in a thread beside a serving app. Call it after the catalog is built: the catalog job
        drops every compiled graph when it ends."""
        started = time.monotonic()
        single = common.CompiledEmbed(self)
        blank = np.full((QUERY_BATCH, 3, self.image_size, self.image_size), 255, dtype=np.uint8)
        self.embed_queries(blank[:1], single)
        batch = self.quantize_int8_batches(calibration) if calibration is not None else None
        if batch is None:
            batch = single
            self.embed_queries(blank, single)  # compiles the bf16 batch-8 graph
        self.query_model = QueryGraphs(single, batch)
        print(f"compiled the image query path in {time.monotonic() - started:.0f} s "
              f"(batch 8: {'int8' if batch is not single else 'bf16'})")

    def quantize_int8_batches(self, calibration: np.ndarray):
        """An int8 graph for batches of 8 (common.int8_embed_graph, calibrated on ``calibration``), or None where it
        cannot be had (no torchao, not a CPU) or disagrees with the bf16 model on the calibration photos. On 2 CPU
        cores with int8 matrix units (AMX) it ran batches of 8 1.1-1.7x faster than the frozen bf16 graph, and 8
        clients got 1.15-1.45x the requests/s; batch 1 gained nothing clear (0.5-1.5x), so it stays bf16. The graph
        keeps an fp32 copy of the vision tower alive: ~0.6 GB more RSS."""
        photos = calibration[:len(calibration) // QUERY_BATCH * QUERY_BATCH]
        return common.int8_embed_graph(self, photos, QUERY_BATCH, self.device, self.dtype)

    def float_embed_module(self):
        """The image embedding as an fp32 module that owns its weights, for common.int8_embed_graph to export."""
        import copy

        return VisionTower(copy.deepcopy(self.model.vision_model).float(),
                           copy.deepcopy(self.model.visual_projection).float())

    # embed_images() calls these two: the Encoder quacks like a model script's module.
    def eval(self):
        return self

    def embed(self, pixel_values):
        return common.clip_image_features(self.model, pixel_values)

    def embed_image(self, data: bytes) -> np.ndarray:
        try:
            pixels = common.decode_square(data, self.image_size)
        except ValueError as exc:
            raise QueryError(str(exc)) from None
        return self.batcher(pixels)

    def embed_text(self, text: str) -> np.ndarray:
        text = (text or "").strip()
        if not text:
            raise QueryError("type a description to search by text")
        tokens = self.tokenizer([text[:1000]], padding=True, truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
        with torch.inference_mode():
            features = common.clip_text_features(self.model, tokens["input_ids"].to(self.device),
                                                 tokens["attention_mask"].to(self.device)).float()
        return torch.nn.functional.normalize(features, dim=1)[0].cpu().numpy()


# Index type by catalog size, from benchmarks/search.py on 2 cores (BENCHMARKS.md): exact search costs ~1.8 ms per
# query at 10k vectors of dim 512, ~11 ms at 44k and ~300 ms at 1M; HNSW (M=32) answers in 0.1-0.4 ms, with
# recall@5 >= 0.997 up to 100k at efSearch 64, and 0.955 at 1M with efSearch 128. Small catalogs stay exact.
EXACT_UP_TO = 5_000
HNSW_M, HNSW_EF_CONSTRUCTION = 32, 64


def hnsw_ef_search(rows: int) -> int:
    return 64 if rows <= 200_000 else 128


def index_kind(rows: int) -> str:
    return "Flat" if rows <= EXACT_UP_TO else f"HNSW{HNSW_M},ef{hnsw_ef_search(rows)}"


def build_index(embeddings: np.ndarray):
    import faiss

    rows, dim = embeddings.shape
    if index_kind(rows) == "Flat":
        index = faiss.IndexFlatIP(dim)
    else:
        print(f"building an HNSW index over {rows:,} items")
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return tune(index)


def tune(index):
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = hnsw_ef_search(index.ntotal)  # a search-time setting: set again after every load
    return index


class Catalog:
    """Metadata, embeddings and FAISS index of every catalog item, with the image of each row on demand."""

    def __init__(self, embeddings: np.ndarray, meta: pd.DataFrame, image_bytes, index):
        """image_bytes(split, row) -> the encoded photo of a catalog row."""
        self.embeddings, self.meta, self.index = embeddings, meta.reset_index(drop=True), index
        self._image_bytes = image_bytes
        self.row_of_id = {id_key(i): r for r, i in enumerate(self.meta["id"])}
        # String views of the filter columns the catalog has, made once rather than on every filtered query.
        self.filter_values = {c: self.meta[c].astype(str).to_numpy() for c in FILTER_COLUMNS if c in self.meta}
        self.valid_values = {c: set(values) for c, values in self.filter_values.items()}
        # The result columns as arrays: a query's 5 records cost ~1 ms of pandas cell look-ups (DataFrame.at) and a
        # few microseconds from these. A column the catalog lacks (a user's own photos) shows as empty.
        self.result_values = {field: self.meta[field].to_numpy() if field in self.meta else np.full(len(meta), "")
                              for field in RESULT_FIELDS}

    def __len__(self):
        return len(self.meta)

    def image_bytes(self, row: int) -> bytes:
        return self._image_bytes(self.meta.at[row, "split"], self.meta.at[row, "row"])

    def choices(self, column):
        return [ANY] + sorted(self.meta[column].dropna().astype(str).unique().tolist())

    def check_filters(self, filters: dict) -> dict:
        """The filters that restrict (value given and not Any); QueryError for a column the catalog lacks or a value
        it never holds, naming the valid ones, rather than an empty result."""
        active = {column: str(value) for column, value in filters.items() if value not in (None, "", ANY)}
        for column, value in active.items():
            if column not in self.filter_values:
                offered = ", ".join(self.filter_values) or "none"
                raise QueryError(f"this catalog cannot be filtered by {column} (filters: {offered})")
            if value not in self.valid_values[column]:
                raise QueryError(f"unknown {column} {value!r}; valid values: "
                                 f"{', '.join(self.choices(column)[1:])}")
        return active

    def search(self, vector: np.ndarray, filters: dict | None = None, k: int = TOP_K) -> list[dict]:
        """Top k rows by cosine similarity, best first. Filters restrict the candidates before ranking, so k
        matching items come back whenever k exist."""
        vector = np.ascontiguousarray(vector, dtype=np.float32)[None]
        mask = np.ones(len(self.meta), dtype=bool)
        for column, value in self.check_filters(filters or {}).items():
            mask &= self.filter_values[column] == value
        if mask.all():
            scores, rows = self.index.search(vector, min(k, len(self.meta)))
            scores, rows = scores[0], rows[0]
        else:
            candidates = np.flatnonzero(mask)
            similarity = self.embeddings[candidates] @ vector[0]  # exact over the filtered subset
            top = np.argsort(-similarity, kind="stable")[:k]
            scores, rows = similarity[top], candidates[top]
        return [{**{field: _plain(values[row]) for field, values in self.result_values.items()},
                 "score": round(float(s), 4)} for s, row in zip(scores, rows) if row >= 0]


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def id_key(value) -> str:
    """The look-up key of an item id: ids may be numbers (the hub dataset) or file names (a folder of photos), and a
    number may arrive as 10003, 10003.0 or "10003"."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    return str(_plain(value)).strip()


def catalog_fingerprint(parts: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def read_json(path: Path) -> dict:
    """The file's JSON object, or {} when it is missing or damaged (the index is then rebuilt, not served)."""
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def load_or_build_index(index_dir: Path, embeddings: np.ndarray, catalog: str):
    """Reuse the saved index when its fingerprint, dimension and row count match; rebuild it otherwise. A stale
    or mismatched index is never served."""
    import faiss

    fingerprint = catalog_fingerprint({"catalog": catalog, "index": index_kind(len(embeddings))})
    index_path, info_path = index_dir / "catalog.faiss", index_dir / "index.json"
    if index_path.exists() and info_path.exists():
        if read_json(info_path).get("fingerprint") == fingerprint:
            try:
                index = faiss.read_index(str(index_path))
            except RuntimeError:  # unreadable file: rebuilt below
                index = None
            if index is not None and index.d == embeddings.shape[1] and index.ntotal == len(embeddings):
                return tune(index)
        print(f"index in {index_dir} is stale (model or catalog changed): rebuilding")
    index = build_index(embeddings)
    common.atomic_write(index_path, lambda tmp: faiss.write_index(index, tmp))
    common.atomic_write_json(info_path, {"fingerprint": fingerprint, "catalog": catalog,
                                         "dim": int(index.d), "rows": int(index.ntotal),
                                         "type": type(index).__name__})
    return index


def dataset_image_bytes(splits: dict):
    """(split, row) -> the row's encoded image bytes, as stored in the dataset (decoded only for display)."""
    from datasets import Image as ImageFeature

    raw = {name: split.cast_column("image", ImageFeature(decode=False)) for name, split in splits.items()}

    def get(split, row):
        return common.cell_bytes(raw[split][int(row)]["image"])
    return get


def catalog_from_run(run: Path, encoder: Encoder, dataset: str | None, cache_dir: str) -> Catalog:
    """The fine-tuned run's own embeddings of every split (the whole catalog), or, with --dataset, that dataset
    embedded with the run's model."""
    if dataset:
        return catalog_from_dataset(dataset, encoder, run / "index", cache_dir, model_id=str(run / "hf_model"))
    args = json.loads((run / "args.json").read_text())
    data, _ = common.load_processed(args["data"])
    parts, embeddings, metas = {}, [], []
    for split in common.SPLITS:
        path = run / "embeddings" / f"{split}.npy"
        if not path.exists():
            raise common.UserError(f"{path} is missing: rerun clip.py or pass --dataset")
        vectors, meta = evaluation.load_split(run, split)
        embeddings.append(vectors)
        metas.append(meta)
        parts[split] = common.file_sha256(path)
    embeddings = np.concatenate(embeddings)
    if embeddings.shape[1] != encoder.dim:
        raise common.UserError(f"{run}/embeddings have dimension {embeddings.shape[1]} but {run}/hf_model "
                               f"embeds to {encoder.dim}: the run's files do not belong together")
    meta = pd.concat(metas, ignore_index=True)
    parts["model"] = common.file_sha256(next((run / "hf_model").glob("*.safetensors")))
    fingerprint = catalog_fingerprint(parts)
    index = load_or_build_index(run / "index", embeddings, fingerprint)
    return Catalog(embeddings, meta, dataset_image_bytes(data), index)


def catalog_from_dataset(spec: str, encoder: Encoder, index_dir: Path, cache_dir: str, model_id: str):
    """Embed a whole dataset (hub name, hub-layout or processed folder, or a folder of image files) and index it;
    cached in index_dir."""
    splits = common.catalog_splits(spec)
    weights = sorted(Path(model_id).glob("*.safetensors")) if Path(model_id).is_dir() else []
    parts = {"model": common.file_sha256(weights[0]) if weights else model_id, "image_size": encoder.image_size,
             **{f"data:{name}": split._fingerprint for name, split in splits.items()}}
    fingerprint = catalog_fingerprint(parts)
    cached_vectors, cached_meta = index_dir / "catalog.npy", index_dir / "catalog.parquet"
    info_path = index_dir / "index.json"
    fresh = read_json(info_path).get("catalog") == fingerprint
    if fresh and cached_vectors.exists() and cached_meta.exists():
        embeddings, meta = np.load(cached_vectors), pd.read_parquet(cached_meta)
    else:
        embeddings, metas = [], []
        cached = {name: common.image_cache(split, encoder.image_size, cache_dir) for name, split in splits.items()}
        with common.job_embed(encoder, [images for images, _ in cached.values()], encoder.device, encoder.dtype,
                              common.EMBED_BATCH) as compiled:  # one graph for every split
            for name, split in splits.items():
                images, ok = cached[name]
                keep = np.flatnonzero(ok)
                embeddings.append(encoder.embed_pixels(images if ok.all() else images[keep], progress=True,
                                                       compiled=compiled))
                metas.append(common.metadata_frame(split.select(keep), name).assign(row=keep))
        embeddings, meta = np.concatenate(embeddings), pd.concat(metas, ignore_index=True)
        common.atomic_save_npy(cached_vectors, embeddings)
        common.atomic_write_parquet(cached_meta, meta)
    index = load_or_build_index(index_dir, embeddings, fingerprint)
    return Catalog(embeddings, meta, dataset_image_bytes(splits), index)


# --------------------------------------------------------------------------- the service: queries -> results

class SearchService:
    """Everything the page and the API do, without Gradio: each query returns the top results as records."""

    def __init__(self, encoder: Encoder, catalog: Catalog, model_name: str, allow_private_urls=False):
        self.encoder, self.catalog, self.model_name = encoder, catalog, model_name
        self.allow_private_urls = allow_private_urls
        self._photos = tempfile.TemporaryDirectory(prefix="fashion-search-photos-")  # removed with the service

    @property
    def filter_columns(self) -> list[str]:
        """The filters this catalog offers, in the order the page and the Gradio API take their values."""
        return [column for column in FILTER_COLUMNS if column in self.catalog.filter_values]

    def filters(self, *values):
        return dict(zip(self.filter_columns, values))

    def search_image_bytes(self, data: bytes, *filters):
        return self.catalog.search(self.encoder.embed_image(data), self.filters(*filters))

    def search_image_file(self, path, *filters):
        if not path:
            raise QueryError("upload a photo first")
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise QueryError(f"cannot read the upload ({exc.strerror})") from None
        return self.search_image_bytes(data, *filters)

    def search_url(self, url, *filters):
        return self.search_image_bytes(fetch_url(url, self.allow_private_urls), *filters)

    def search_text(self, text, *filters):
        if not self.encoder.text_search:
            raise QueryError(self.encoder.text_search_why)
        return self.catalog.search(self.encoder.embed_text(text), self.filters(*filters))

    def search_item(self, item_id, *filters):
        row = self.catalog.row_of_id.get(id_key(item_id))
        if row is None:
            raise QueryError(f"no catalog item with id {item_id}")
        return self.catalog.search(self.catalog.embeddings[row], self.filters(*filters))

    def gallery(self, results):
        return [(self.photo_file(self.catalog.row_of_id[id_key(r["id"])]),
                 f"score {r['score']:.3f} · {r['articleType']} · {r['baseColour']} · {r['gender']} · "
                 f"{r['productDisplayName']}") for r in results]

    def photo_file(self, row: int) -> str:
        """A catalog photo as a JPEG file for the page's gallery, written the first time the item is shown. Gradio
        serves a file as it is, where it re-encoded a PIL image on every query (as WebP: 26-35 ms for a gallery of
        five, BENCHMARKS.md section 3). Decoded and re-encoded once, so any format the catalog holds reaches the
        browser as an upright RGB JPEG. At most one file of a few KB per catalog item, in a folder removed with the
        service."""
        path = Path(self._photos.name) / f"{row}.jpg"
        if not path.exists():
            partial = path.with_name(f".{row}.{threading.get_ident()}.jpg")
            common.open_image(self.catalog.image_bytes(row)).save(partial, "JPEG", quality=90)
            os.replace(partial, path)  # whole files only, also when two queries show the same item at once
        return str(path)


def build_page(service: SearchService, notice: str = ""):
    import gradio as gr

    def guarded(fn):
        def call(*args):
            try:
                return fn(*args)
            except QueryError as exc:
                raise gr.Error(str(exc), print_exception=False) from None
        call.__name__ = fn.__name__
        return call

    def safe_preprocess(preprocess):
        """An upload Pillow cannot open becomes the same clear message as any other bad image. (Wrapping the
        instance's method rather than subclassing gr.Image: Gradio writes a .pyi stub beside every subclass.)"""
        def call(payload):
            try:
                return preprocess(payload)
            except Exception as exc:  # noqa: BLE001 - any decoder failure is the user's file, not the server
                raise gr.Error(f"not a readable image ({type(exc).__name__})", print_exception=False) from None
        return call

    catalog = service.catalog
    with gr.Blocks(title="Fashion similarity search", delete_cache=CACHE_CLEANING) as page:
        gr.Markdown(f"## Fashion similarity search\nModel: **{service.model_name}** — searching "
                    f"**{len(catalog):,}** catalog items. {notice}")
        with gr.Row():  # only the columns this catalog has
            # allow_custom_value: an unknown value reaches Catalog.check_filters, which names the valid ones on every
            # route alike (Gradio's own check would log a traceback per request)
            filters = [gr.Dropdown(catalog.choices(column), value=ANY, label=column, allow_custom_value=True)
                       for column in service.filter_columns]
        with gr.Tabs():
            with gr.Tab("Photo"):
                image = gr.Image(type="filepath", sources=["upload", "clipboard"], label="photo (drop, paste or click)")
                image.preprocess = safe_preprocess(image.preprocess)
                image_button = gr.Button("Search by photo", variant="primary")
            with gr.Tab("Image URL"):
                url = gr.Textbox(label="image URL", placeholder="https://...")
                url_button = gr.Button("Search by URL", variant="primary")
            with gr.Tab("Text"):
                if service.encoder.text_search:
                    text = gr.Textbox(label="description", placeholder="navy blue men's shirt")
                    text_button = gr.Button("Search by text", variant="primary")
                else:
                    gr.Markdown(f"Text search is off: {service.encoder.text_search_why}")
        gallery = gr.Gallery(label="top 5, best first (click one to search by it)", columns=5, height="auto",
                             allow_preview=False, elem_id="results-gallery")
        results = gr.JSON(label="results")
        item_id = gr.Textbox(visible=False)  # ids are numbers or, for a folder of photos, file names

        routes = [(image_button.click, service.search_image_file, image, "search_image"),
                  (image.upload, service.search_image_file, image, None),
                  (url_button.click, service.search_url, url, "search_url"),
                  (url.submit, service.search_url, url, None)]
        if service.encoder.text_search:
            routes += [(text_button.click, service.search_text, text, "search_text"),
                       (text.submit, service.search_text, text, None)]
        else:  # the API answers why, rather than not knowing the route
            text = gr.Textbox(visible=False)
            routes.append((text.submit, service.search_text, text, "search_text"))
        for trigger, fn, source, name in routes:
            trigger(guarded(fn), [source, *filters], results, api_name=name,
                    api_visibility="public" if name else "private")
        # The gallery is drawn on the page's own 'change' of the results, so API calls (which return only the
        # records) never pay for decoding and re-encoding five photos.
        results.change(guarded(service.gallery), results, gallery, api_visibility="private")

        def clicked(current, selection):
            return current[selection.index]["id"]
        # gr.SelectData is injected by type; the annotation must be the class, not the string the
        # __future__ import would make of it.
        clicked.__annotations__ = {"selection": gr.SelectData}

        gallery.select(clicked, results, item_id, api_visibility="private").success(
            guarded(service.search_item), [item_id, *filters], results, api_name="search_item")
    for block in page.blocks.values():
        refuse_urls_as_files(block)
    return page


def refuse_urls_as_files(block):
    """Gradio takes an http(s) URL wherever a file goes and downloads it itself, outside fetch_url's guards (address
    checks, size cap, content type, deadline). Every component here refuses that, so a file route reads only files
    the user uploaded; URLs go through the URL route."""
    import gradio as gr
    from gradio_client import utils as client_utils

    if not hasattr(block, "async_move_resource_to_block_cache"):
        return

    def refuse_url(url_or_file_path):
        if url_or_file_path is not None and client_utils.is_http_url_like(str(url_or_file_path)):
            raise gr.Error("refused: file inputs take uploaded files only; search by URL through the URL route "
                           "(/search_url)", print_exception=False)

    move, move_async = block.move_resource_to_block_cache, block.async_move_resource_to_block_cache

    def move_local_only(url_or_file_path):
        refuse_url(url_or_file_path)
        return move(url_or_file_path)

    async def move_local_only_async(url_or_file_path):
        refuse_url(url_or_file_path)
        return await move_async(url_or_file_path)
    block.move_resource_to_block_cache = move_local_only
    block.async_move_resource_to_block_cache = move_local_only_async


# --------------------------------------------------------------------------- start-up

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/clip", help="a clip.py run folder (fine-tuned model + embeddings)")
    parser.add_argument("--dataset", default=None, help="catalog to index instead of the run's own splits "
                        f"(hub name or folder); without a run it defaults to {common.HUB_DATASET}")
    parser.add_argument("--model", default=HUB_MODEL, help="CLIP model for the zero-shot fallback when there is no run")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public share link (off by default)")
    parser.add_argument("--device", type=common.device_arg, default="cpu")
    parser.add_argument("--cache-dir", default="data/cache")
    parser.add_argument("--max-upload-mb", type=int, default=10)
    parser.add_argument("--allow-private-urls", action="store_true",
                        help="let URL queries reach private/loopback addresses: for local testing only")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="compile the photo query path in the background at start (~45-65 s on 2 CPU cores; "
                        "until then queries run eager): a lone photo query then runs 1.35-1.9x faster, 8 concurrent "
                        "ones ~1.1x")
    parser.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                        help="with --compile, run batches of 8 concurrent photo queries through an int8 graph "
                        f"calibrated on {INT8_CALIBRATION_PHOTOS} catalog photos (needs torchao): 8 clients got 1.15-1.45x "
                        "the requests/s on a CPU with int8 matrix units; not used if it disagrees with the bf16 model. "
                        "Also embeds a catalog of 20k+ photos in int8 (--no-int8: bf16)")
    return parser.parse_args(argv)


def calibration_photos(catalog: Catalog, size: int, count=INT8_CALIBRATION_PHOTOS) -> np.ndarray | None:
    """uint8 [N, 3, S, S]: catalog photos spread over the whole catalog, decoded as queries are, to calibrate the
    int8 graph on (None when fewer than a batch of them decode)."""
    photos = []
    for row in np.linspace(0, len(catalog) - 1, min(count, len(catalog))).astype(int):
        try:
            photos.append(common.decode_square(catalog.image_bytes(row), size))
        except (ValueError, OSError, TypeError, KeyError):  # a missing or broken photo: calibrate on the others
            continue
    return np.stack(photos) if len(photos) >= QUERY_BATCH else None


def load_service(args) -> tuple[SearchService, str]:
    run = Path(args.run)
    if (run / "hf_model" / "config.json").exists():
        encoder = Encoder(str(run / "hf_model"), args.device, args.int8)
        catalog = catalog_from_run(run, encoder, args.dataset, args.cache_dir)
        return SearchService(encoder, catalog, f"fine-tuned CLIP ({run})", args.allow_private_urls), ""
    notice = (f"No fine-tuned run at {run} (train one with `python clip.py`): using pretrained {args.model} "
              f"zero-shot.")
    print(notice)
    dataset = args.dataset or common.HUB_DATASET
    try:
        encoder = Encoder(args.model, args.device, args.int8)
        index_dir = Path("runs") / "zero-shot-clip" / "index"
        catalog = catalog_from_dataset(dataset, encoder, index_dir, args.cache_dir, args.model)
    except common.UserError as exc:
        cause = str(exc).split(";")[0]  # what failed, without the model scripts' advice
        raise common.UserError(f"no run at --run {run}, and the zero-shot fallback failed: {cause}; pass --run RUN_DIR "
                               f"(a clip.py run), or local copies with --dataset PATH and --model PATH") from None
    return SearchService(encoder, catalog, f"pretrained {args.model} (zero-shot)", args.allow_private_urls), notice


def add_json_api(fastapi_app, service: SearchService, max_upload_bytes: int):
    """Plain HTTP + JSON routes beside the page, for programs that need speed: one request, no upload step, no
    queue, no event stream. Through gradio_client a query costs ~90-150 ms of client and Gradio overhead on 2 cores
    even when no model runs (BENCHMARKS.md, section 3); here it costs the model and little else.

        POST /api/search_image?gender=..&masterCategory=..&articleType=..   body: the image file's bytes
        GET  /api/search_text?q=navy+shirt&gender=..                        (also /api/search_url?url=..)
    Answer: {"results": [records, best first]}, or {"error": message} with status 400 (413 for too large, 503 with
    Retry-After when MAX_PENDING requests are already waiting, 500 when the model failed)."""
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    pending = [0]  # requests in progress on these routes (one event loop: no lock needed)

    def error(exc: QueryError):
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if exc.status == 503 else None
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)

    async def answer(search, query, *first):
        filters = [query.get(column) for column in service.filter_columns]
        unknown = sorted(set(query) - {"q", "url", *service.filter_columns})
        if unknown:
            return error(QueryError(f"unknown parameter {unknown[0]!r} (filters: {', '.join(service.filter_columns)})"))
        if pending[0] >= MAX_PENDING:
            return error(Busy("busy, try again in a moment"))
        pending[0] += 1
        try:  # the search runs in a worker thread: concurrent requests meet in the MicroBatcher
            return JSONResponse({"results": await run_in_threadpool(search, *first, *filters)})
        except QueryError as exc:
            return error(exc)
        finally:
            pending[0] -= 1

    too_large = {"error": f"the image is over {max_upload_bytes // 2**20} MB"}

    async def search_image(request):  # Starlette routes: the request comes as is
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_upload_bytes:
            return JSONResponse(too_large, status_code=413)
        data = bytearray()
        async for chunk in request.stream():  # counted as it arrives: a missing or false length cannot get past
            data += chunk
            if len(data) > max_upload_bytes:
                return JSONResponse(too_large, status_code=413)
        if not data:
            return JSONResponse({"error": "send the image file as the request body"}, status_code=400)
        return await answer(service.search_image_bytes, request.query_params, bytes(data))

    async def search_text(request):
        return await answer(service.search_text, request.query_params, request.query_params.get("q", ""))

    async def search_url(request):
        return await answer(service.search_url, request.query_params, request.query_params.get("url", ""))

    fastapi_app.add_route("/api/search_image", search_image, methods=["POST"])
    fastapi_app.add_route("/api/search_text", search_text, methods=["GET"])
    fastapi_app.add_route("/api/search_url", search_url, methods=["GET"])


def serve(service: SearchService, notice="", host="127.0.0.1", port=7860, share=False, max_upload_mb=10,
          block=True, **launch_kwargs):
    """The page, its Gradio API and the plain JSON API on one server (main() and the tests start it the same way)."""
    page = build_page(service, notice)
    page.queue(default_concurrency_limit=16, max_size=MAX_PENDING)  # concurrent requests meet in the MicroBatcher
    page.launch(server_name=host, server_port=port, share=share, max_file_size=f"{max_upload_mb}mb",
                footer_links=["api"], show_error=False, prevent_thread_lock=True, **launch_kwargs)
    add_json_api(page.app, service, max_upload_mb * 2**20)
    if block:
        page.block_thread()
    return page


def main(argv=None):
    args = parse_args(argv)
    service, notice = load_service(args)
    if args.compile:  # serve at once, eager, and switch to the compiled graphs when they are ready (~45-65 s)
        def compile_queries():
            calibration = calibration_photos(service.catalog, service.encoder.image_size) if args.int8 else None
            service.encoder.compile_queries(calibration)
        threading.Thread(target=compile_queries, daemon=True, name="compile-queries").start()
    print(f"serving {len(service.catalog):,} items with {service.model_name} on http://{args.host}:{args.port} "
          f"(JSON API: POST /api/search_image, GET /api/search_text?q=)")
    serve(service, notice, args.host, args.port, args.share, args.max_upload_mb)


if __name__ == "__main__":
    common.cli(main)
