"""A catalog's first build in chunks: killed with SIGKILL at 80 %, it resumes from the chunks on disk and gives what an
uninterrupted build gives; a chunk damaged on disk is embedded again rather than trusted."""
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import child_env

REPO = Path(__file__).resolve().parents[1]
CHUNK = 16


@pytest.fixture(scope="module")
def encoder(clip_run):
    from fashion_search.serving.encoder import Encoder

    return Encoder(str(clip_run / "hf_model"), "cpu", int8=False)


def build(hub_dataset, encoder, folder):
    from fashion_search.data import catalog_splits
    from fashion_search.serving.build import embed_in_chunks

    embedded = []
    vectors, meta = embed_in_chunks(catalog_splits(str(hub_dataset)), encoder, folder, CHUNK,
                                    on_chunk=lambda done, total: embedded.append(done))
    return vectors, meta, len(embedded) - 1  # the first report is before any chunk is embedded


def test_a_build_killed_at_80_percent_resumes_and_gives_the_uninterrupted_index(hub_dataset, encoder, clip_run,
                                                                              tmp_path):
    whole, whole_meta, chunks = build(hub_dataset, encoder, tmp_path / "whole")
    assert chunks == 5 and len(whole) == len(whole_meta) == 69  # 70 rows, one undecodable
    folder = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal
        from fashion_search.data import catalog_splits
        from fashion_search.serving.build import embed_in_chunks
        from fashion_search.serving.encoder import Encoder

        def kill_at_80(done, total):
            if done == 4 * {CHUNK}:  # 4 of 5 chunks written
                os.kill(os.getpid(), signal.SIGKILL)
        encoder = Encoder({str(clip_run / "hf_model")!r}, "cpu", int8=False)
        embed_in_chunks(catalog_splits({str(hub_dataset)!r}), encoder, {str(folder)!r}, {CHUNK}, kill_at_80)
    """)
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=child_env(), capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(list(folder.glob("chunk-*.npz"))) == 4
    resumed, resumed_meta, embedded = build(hub_dataset, encoder, folder)
    assert embedded == 1  # only the chunk the kill lost
    np.testing.assert_array_equal(resumed, whole)
    assert resumed_meta.equals(whole_meta)


def test_a_damaged_chunk_is_embedded_again(hub_dataset, encoder, tmp_path):
    folder = tmp_path / "build"
    whole, _, _ = build(hub_dataset, encoder, folder)
    damaged = folder / "chunk-000002.npz"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    again, _, embedded = build(hub_dataset, encoder, folder)
    assert embedded == 1
    np.testing.assert_array_equal(again, whole)
    _, _, none = build(hub_dataset, encoder, folder)
    assert none == 0  # everything on disk is whole now


def test_a_build_decoding_on_many_threads_gives_what_one_thread_gives(hub_dataset, encoder, tmp_path, monkeypatch):
    """Beside a GPU the build decodes on many threads (runtime.decode_threads): the same photos, in the same order."""
    from fashion_search.serving import build as build_module

    serial, serial_meta, _ = build(hub_dataset, encoder, tmp_path / "serial")
    pools, original = [], build_module.decode_cells

    def decode_cells(cells, size, pool=None, left_out=None):
        pools.append(pool)
        return original(cells, size, pool, left_out)
    monkeypatch.setattr(build_module, "decode_cells", decode_cells)
    monkeypatch.setattr(build_module, "decode_threads", lambda beside: 3)  # as beside a GPU
    threaded, threaded_meta, _ = build(hub_dataset, encoder, tmp_path / "threaded")
    assert pools and all(pool is not None for pool in pools)
    np.testing.assert_array_equal(threaded, serial)
    assert threaded_meta.equals(serial_meta)
