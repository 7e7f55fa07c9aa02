"""Faults: kill -9 mid-training then --resume, kill -9 mid-write, mismatched artifacts, and the web server's file
routes (no path traversal)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_args
from fashion_search.errors import UserError
from fashion_search.files import atomic_folder, atomic_torch_save
from fashion_search.stores import faiss_index as index

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_kill_9_mid_training_then_resume_matches_an_uninterrupted_run(processed, cache_dir, tmp_path):
    argv = tiny_args(processed, tmp_path / "full", cache_dir, "--epochs", "6")
    subprocess.run([sys.executable, "resnet.py", *argv], cwd=REPO, env=ENV, check=True, capture_output=True,
                   timeout=300)
    killed = tmp_path / "killed"
    argv = tiny_args(processed, killed, cache_dir, "--epochs", "6")
    process = subprocess.Popen([sys.executable, "resnet.py", *argv], cwd=REPO, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (killed / "last.pt").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)  # somewhere after epoch 1's checkpoint, mid-epoch or mid-write
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "metrics.json").exists()
    subprocess.run([sys.executable, "resnet.py", *argv, "--resume"], cwd=REPO, env=ENV, check=True,
                   capture_output=True, timeout=300)
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    resumed = json.loads((killed / "metrics.json").read_text())
    for key in ("precision@5", "map@r", "macro_precision@5"):
        assert resumed[key] == pytest.approx(full[key], abs=1e-6)  # same seed, same batches: same result
    assert len((killed / "log.jsonl").read_text().splitlines()) == 6


WRITER = """
import torch
from fashion_search.files import atomic_torch_save
big = {{"weights": torch.arange(40_000_000, dtype=torch.float32)}}  # 160 MB: the write takes a while
print("ready", flush=True)
while True:
    atomic_torch_save({path!r}, big)
"""


def test_kill_9_during_a_write_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save(path, {"weights": torch.ones(3)})
    process = subprocess.Popen([sys.executable, "-c", WRITER.format(repo=str(REPO), path=str(path))],
                               stdout=subprocess.PIPE, env=ENV)
    assert process.stdout.readline().strip() == b"ready"
    time.sleep(0.3)  # inside the first write
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = torch.load(path, weights_only=True)  # whole, old or new, never half
    assert state["weights"].numel() in (3, 40_000_000)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "checkpoint.pt"]
    # the kill landed mid-write (the writer writes back to back): that write's temp file is all it left
    assert len(leftovers) == 1 and leftovers[0].startswith(".checkpoint.pt."), leftovers


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    """hf_model: a save that fails midway leaves the previous folder as it was, and no temp folder behind."""
    folder = tmp_path / "hf_model"
    with atomic_folder(folder) as partial:
        (partial / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(folder) as partial:
            (partial / "config.json").write_text("new")
            raise RuntimeError("the save failed midway")
    assert (folder / "config.json").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["hf_model"]
    with atomic_folder(folder) as partial:
        (partial / "config.json").write_text("new")
    assert (folder / "config.json").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["hf_model"]


def test_run_with_mismatched_embeddings_is_one_clear_message(clip_run, cache_dir, tmp_path):
    from fashion_search.cli import app

    run = tmp_path / "run"
    shutil.copytree(clip_run, run, ignore=shutil.ignore_patterns("index"))
    np.save(run / "embeddings" / "val.npy", np.zeros((3, 7), dtype=np.float32))
    with pytest.raises(UserError, match="val.npy has shape"):
        app.load_service(app.parse_config(["--run", str(run), "--cache-dir", str(cache_dir)]))
    shutil.copy(clip_run / "embeddings" / "val.npy", run / "embeddings" / "val.npy")
    (run / "embeddings" / "test.npy").unlink()
    with pytest.raises(UserError, match="test.npy"):
        app.load_service(app.parse_config(["--run", str(run), "--cache-dir", str(cache_dir)]))


def test_evaluation_of_a_run_without_embeddings_names_the_files(tmp_path, capsys):
    from fashion_search.cli import evaluation

    (tmp_path / "empty-run").mkdir()
    assert evaluation.main([str(tmp_path / "empty-run"), "--output", str(tmp_path / "t.md"),
                            "--plot", str(tmp_path / "p.png")]) == 2
    assert "embeddings/test.npy" in capsys.readouterr().err


def test_checkpoint_of_another_label_map_is_refused(trained_runs, processed, tmp_path):
    from fashion_search.cli import resnet

    run = tmp_path / "run"
    shutil.copytree(trained_runs["resnet"], run)
    state = torch.load(run / "best.pt", weights_only=True)
    state["label_names"] = state["label_names"] + ["Extra class"]
    torch.save(state, run / "best.pt")
    with pytest.raises(UserError, match="does not match"):
        resnet.main(["--embed-only", "--checkpoint", str(run), "--data", str(processed),
                     "--output-dir", str(tmp_path / "out"), "--device", "cpu"])


def test_gradio_file_routes_serve_no_file_outside_the_app(served):
    import httpx

    secret = Path("/etc/hostname") if Path("/etc/hostname").exists() else Path("/etc/passwd")
    for route in (f"gradio_api/file={secret}", f"file={secret}", f"gradio_api/file=../../../../{secret}",
                  f"gradio_api/file=%2F..%2F..%2F..{secret}", f"gradio_api/file={REPO / 'app.py'}"):
        response = httpx.get(served + route, timeout=10)
        assert response.status_code in (403, 404, 405), route
        assert secret.read_text()[:20] not in response.text or not secret.read_text().strip()


def test_the_app_started_with_no_flags_listens_on_loopback_alone(monkeypatch):
    """What `python app.py` binds: the socket's own address, read from the listening server."""
    from fashion_search.cli import app

    bound = []

    class Recorded(app.Server):
        def __init__(self, front, host, port):
            super().__init__(front, host, 0)  # any free port: the host is what is checked
            bound.extend(socket.getsockname()[0] for server in self.server.servers for socket in server.sockets)

    def stop(config, startup):
        raise UserError("stopped after binding")

    monkeypatch.setattr(app, "Server", Recorded)
    monkeypatch.setattr(app, "load_service", stop)
    with pytest.raises(UserError, match="stopped after binding"):
        app.main([])
    assert bound == ["127.0.0.1"]


def test_damaged_index_files_are_never_served(clip_run, cache_dir, tmp_path):
    """A damaged file of the only version: the catalog is rebuilt. A damaged CURRENT: the newest version that reads
    is served as it is."""
    from fashion_search.cli import app

    run = tmp_path / "run"
    shutil.copytree(clip_run, run, ignore=shutil.ignore_patterns("index"))
    config = app.parse_config(["--run", str(run), "--cache-dir", str(cache_dir)])
    service, _ = app.load_service(config)
    items = len(service.catalog)
    folder = run / "index"
    for damaged in ("index.faiss", "items.parquet", "store.json", "CURRENT"):
        version = json.loads((folder / "CURRENT").read_text())["version"]
        (folder / (damaged if damaged == "CURRENT" else f"{version}/{damaged}")).write_bytes(b"{not what it was")
        service, _ = app.load_service(config)
        assert len(service.catalog) == items and service.catalog.store.kind == "IndexFlatIP"
        if damaged != "CURRENT":
            version = json.loads((folder / "CURRENT").read_text())["version"]
            assert json.loads((folder / version / "store.json").read_text())["items"] == items  # rebuilt whole


def test_index_type_follows_catalog_size():

    small = index.build_index(np.eye(8, 16, dtype=np.float32))
    assert type(small).__name__ == "IndexFlatIP"
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((index.EXACT_UP_TO + 1, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    large = index.build_index(vectors)
    assert hasattr(large, "hnsw") and large.hnsw.efSearch == index.hnsw_ef_search(len(vectors))
    _, found = large.search(vectors[:50], 1)
    assert (found[:, 0] == np.arange(50)).mean() >= 0.98  # each vector finds itself


def test_a_files_hash_is_remembered_until_its_size_or_time_changes(tmp_path, monkeypatch):
    """A second start fingerprints its index without reading the model again; a rewritten file is hashed anew, and a
    ledger that is not JSON is started over."""
    import hashlib

    from fashion_search import files

    model, ledger = tmp_path / "model.safetensors", tmp_path / "index" / "sha256.json"
    model.write_bytes(b"weights v1")
    reads = []
    original = files.file_sha256
    monkeypatch.setattr(files, "file_sha256", lambda path: reads.append(path) or original(path))
    first = files.remembered_sha256(model, ledger)
    assert first == hashlib.sha256(b"weights v1").hexdigest() and len(reads) == 1
    assert files.remembered_sha256(model, ledger) == first and len(reads) == 1  # remembered
    model.write_bytes(b"weights v2!")
    assert files.remembered_sha256(model, ledger) == hashlib.sha256(b"weights v2!").hexdigest() and len(reads) == 2
    ledger.write_text("not json")
    assert files.remembered_sha256(model, ledger) == hashlib.sha256(b"weights v2!").hexdigest() and len(reads) == 3


def test_a_file_written_atomically_has_the_mode_a_plain_write_gives(tmp_path):
    """The temp file of an atomic write is private (mkstemp: 0600); the file it becomes is not."""
    from fashion_search.files import atomic_write_text

    (tmp_path / "plain.txt").write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    mode = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert (tmp_path / "atomic.txt").stat().st_mode & 0o777 == mode
