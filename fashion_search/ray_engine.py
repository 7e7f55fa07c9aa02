"""Embedding a catalog on a Ray cluster (``--engine ray``): Ray Data's map_batches over the catalog's rows with a pool
of model actors, one per GPU, or ``--ray-actors`` of them on CPUs. ``RAY_ADDRESS`` points it at an existing cluster;
without it Ray starts a local one. Only this engine imports Ray.

The photos reach the actors as the decoded uint8 cache (fashion_search.data.image_cache) that the local loop reads:
by its path when it is a file (so every node of a cluster must see that path: a shared filesystem), else through Ray's
object store. Each actor embeds with the same function as the local loop, and the driver puts the vectors back in row
order, so the files written are the local loop's.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np

from fashion_search.errors import UserError
from fashion_search.files import REPO_DIR

ROWS_PER_TASK = 256


def start(cpus: int | None = None):
    try:
        import ray
    except ImportError:
        raise UserError("--engine ray needs Ray: pip install -r requirements-scale.txt") from None
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        local = {} if address else {"num_cpus": cpus, "_node_ip_address": "127.0.0.1", "include_dashboard": False}
        # Actors import the project's modules (a model script's build_model travels by reference).
        ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_DIR)}}, log_to_driver=False,
                 configure_logging=False, **local)
    return ray


class EmbedActor:
    """One model per actor, built once by ``factory()``; called with a batch of global row indices."""

    def __init__(self, factory, sources, offsets, threads):
        if threads:  # CPU actors share the node's cores rather than each taking all of them
            import torch

            torch.set_num_threads(threads)
        import ray

        self.embed = factory()  # uint8 [B, 3, S, S] -> float32 [B, D]
        self.images = [np.load(s, mmap_mode="r") if isinstance(s, str) else ray.get(s) for s in sources]
        self.offsets = offsets

    def __call__(self, batch: dict) -> dict:
        index = batch["id"]
        part = np.searchsorted(self.offsets, index, side="right") - 1  # which image set each row is in
        vectors = []
        for set_id in np.unique(part):  # rows arrive in order, so a batch holds one or two sets
            rows = index[part == set_id] - self.offsets[set_id]
            vectors.append(self.embed(np.asarray(self.images[set_id][rows])))
        return {"id": index, "embedding": np.concatenate(vectors)}


def embed(factory: Callable, image_sets: list[np.ndarray], actors: int, gpus_per_actor: float = 0,
          batch_size: int = ROWS_PER_TASK) -> list[np.ndarray]:
    """Every image set (uint8 [N_i, 3, S, S]) embedded by a pool of ``actors`` actors, each holding the model that
    ``factory()`` (picklable) returns; float32 [N_i, D] per set, in row order."""
    # A local cluster gets one CPU slot per actor plus one for Ray Data's own tasks (slots are logical; the actors'
    # torch threads share the real cores).
    ray = start(None if os.environ.get("RAY_ADDRESS") else actors + 1)
    threads = 0 if gpus_per_actor else max(1, (os.cpu_count() or 1) // actors)
    sources = [str(s.filename) if isinstance(s, np.memmap) and s.filename else ray.put(np.ascontiguousarray(s))
               for s in image_sets]
    sizes = [len(s) for s in image_sets]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    data = ray.data.range(int(offsets[-1]))
    data = data.map_batches(EmbedActor, fn_constructor_args=(factory, sources, offsets[:-1], threads), batch_size=batch_size,
                            batch_format="numpy", concurrency=actors, num_gpus=gpus_per_actor,
                            num_cpus=0 if gpus_per_actor else 1)
    ids, vectors = [], []
    for batch in data.iter_batches(batch_format="numpy", batch_size=None):
        ids.append(batch["id"])
        vectors.append(batch["embedding"])
    order = np.argsort(np.concatenate(ids), kind="stable")
    everything = np.concatenate(vectors)[order].astype(np.float32)
    return [everything[offsets[i]:offsets[i + 1]] for i in range(len(image_sets))]
