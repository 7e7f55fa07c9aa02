"""A catalog's first build from a dataset, in chunks: a thread decodes the next chunk (through the gate) while the model
embeds this one, so that neither waits for the other; each chunk's vectors are written atomically with their
checksum. A build killed at any point resumes at the next start from the chunks already written, and a chunk damaged
on disk is embedded again rather than trusted, so a resumed build gives the index an uninterrupted one gives."""
from __future__ import annotations

import collections
import hashlib
import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from fashion_search.data import decode_cells, encoded_images, metadata_frame, report_left_out
from fashion_search.embed import job_graph
from fashion_search.files import atomic_write, atomic_write_json
from fashion_search.inference import embed_batch_size
from fashion_search.runtime import decode_threads

CHUNK = 2_048  # photos per chunk: a few seconds of work on a CPU, what a kill can lose


def chunk_path(folder: Path, index: int) -> Path:
    return folder / f"chunk-{index:06d}.npz"


def read_chunk(folder: Path, index: int, rows: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(vectors float32 [rows', D], ok bool [rows]) of a chunk written whole, or None (missing, damaged: its checksum
    or its shape does not match)."""
    path = chunk_path(folder, index)
    try:
        record = json.loads(path.with_suffix(".json").read_text())
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            return None
        with np.load(path) as arrays:
            vectors, ok = arrays["vectors"], arrays["ok"]
    except (OSError, ValueError, KeyError):
        return None
    if len(ok) != rows or len(vectors) != int(ok.sum()):
        return None
    return vectors, ok


def write_chunk(folder: Path, index: int, vectors: np.ndarray, ok: np.ndarray):
    path = chunk_path(folder, index)
    atomic_write(path, lambda tmp: np.savez(open(tmp, "wb"), vectors=vectors, ok=ok))
    atomic_write_json(path.with_suffix(".json"), {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                                  "rows": int(len(ok))})


def embed_in_chunks(splits: dict, encoder, folder: Path, chunk: int = CHUNK, on_chunk=None
                    ) -> tuple[np.ndarray, pd.DataFrame]:
    """Every decodable photo of the splits embedded with the encoder: (float32 [N, D], row metadata with split and
    row), chunk by chunk, resuming from the chunks already in ``folder``. ``on_chunk(done, total)``, in photos: once
    before the first chunk is embedded (done: the photos of the chunks resumed from disk), then after each chunk."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = {name: encoded_images(split).select_columns(["image"])
           for name, split in splits.items()}
    places = [(name, row) for name, split in splits.items() for row in range(len(split))]
    chunks = [places[start:start + chunk] for start in range(0, len(places), chunk)]
    left_out = collections.Counter()

    def decode(part):  # uint8 [n, 3, S, S] of the decodable photos (the others are left out), and which ones
        cells = []
        for name, rows in itertools.groupby(part, key=lambda place: place[0]):  # a chunk's rows are consecutive
            rows = [row for _, row in rows]
            cells += raw[name][rows[0]:rows[-1] + 1]["image"]
        pixels = decode_cells(cells, encoder.image_size, decoders, left_out)
        ok = np.array([image is not None for image in pixels], dtype=bool)
        size = encoder.image_size
        return (np.stack([p for p in pixels if p is not None]) if ok.any() else
                np.zeros((0, 3, size, size), np.uint8)), ok

    found = {i: read_chunk(folder, i, len(part)) for i, part in enumerate(chunks)}
    todo = [i for i, value in found.items() if value is None]
    if todo and len(todo) < len(chunks):
        print(f"resuming the catalog build: {len(chunks) - len(todo)} of {len(chunks)} chunks already embedded")
    # Beside a GPU, many decode threads: it embeds faster than one core decodes; beside a CPU model, one.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool, \
            ThreadPoolExecutor(decode_threads(beside=encoder.device), thread_name_prefix="decode") as decoders:
        decoded = decode(chunks[todo[0]]) if todo else None
        # The job's graph (compiled, or int8 on a CPU with int8 units) is chosen for the whole catalog and calibrated
        # on its first chunk, whatever is left to embed: a resumed build computes what an uninterrupted one does.
        sample = [] if not todo else [decoded[0] if todo[0] == 0 else decode(chunks[0])[0]]
        with job_graph(encoder, sample, encoder.device, encoder.dtype, embed_batch_size(encoder.device),
                       total=len(places)) as compiled:
            done = sum(len(chunks[i]) for i in found if found[i] is not None)
            bar = tqdm(total=len(places), initial=done, desc="embed catalog", unit="photo", disable=None)
            if on_chunk:
                on_chunk(done, len(places))
            for position, index in enumerate(todo):
                following = pool.submit(decode, chunks[todo[position + 1]]) if position + 1 < len(todo) else None
                images, ok = decoded
                vectors = encoder.embed_pixels(images, compiled=compiled) if len(images) else \
                    np.zeros((0, encoder.dim), np.float32)
                write_chunk(folder, index, vectors.astype(np.float32), ok)
                found[index] = (vectors, ok)
                done += len(ok)
                bar.update(len(ok))
                if on_chunk:
                    on_chunk(done, len(places))
                decoded = following.result() if following else None
            bar.close()
    report_left_out(left_out, "the catalog build")
    vectors = np.concatenate([found[i][0] for i in range(len(chunks))]) if chunks else np.zeros((0, encoder.dim))
    ok = np.concatenate([found[i][1] for i in range(len(chunks))]) if chunks else np.zeros(0, bool)
    metas, start = [], 0
    for name, split in splits.items():
        keep = np.flatnonzero(ok[start:start + len(split)])
        metas.append(metadata_frame(split.select(keep), name, every_column=True, rows=keep))
        start += len(split)
    return vectors.astype(np.float32), pd.concat(metas, ignore_index=True)
