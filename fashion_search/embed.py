"""Embedding whole splits or catalogs as batch jobs: eager for a small job, a compiled graph for a big one, an int8
graph for a very big one on a CPU with int8 units (fashion_search.accel, imported only then)."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from fashion_search.config import GRAPHS, DataConfig, RunConfig
from fashion_search.data import metadata_frame, split_rows
from fashion_search.inference import embed_images, photos_224px
from fashion_search.runs import write_embeddings


# A whole catalog is worth compiling (Inductor, weights frozen into the graph) once the compile is paid off: on a CPU
# from a few thousand 224 px images (BENCHMARKS.md, section 1). A 64 px image costs ~12x less than a 224 px one, hence
# the budget in 224 px equivalents. A GPU embeds thousands of photos a second eagerly at batches of hundreds, so the
# compile's minute would be most of a catalog's build: there only a catalog of millions is compiled.
COMPILE_FROM_224PX_IMAGES = 5_000
GPU_COMPILE_FROM_224PX_IMAGES = 2_000_000


def worth_compiling(images: int, image_size: int, device="cpu") -> bool:
    start = GPU_COMPILE_FROM_224PX_IMAGES if torch.device(device).type == "cuda" else COMPILE_FROM_224PX_IMAGES
    return photos_224px(images, image_size) >= start


@contextlib.contextmanager
def job_graph(model, image_sets: list[np.ndarray], device, dtype, batch_size, graph_choice="by-size", total=None):
    """What a batch job over ``image_sets`` (uint8 [N, 3, S, S] each) passes to embed_images as ``compiled``.
    ``graph_choice`` (config.GRAPHS): "by-size" gives None (eager) for a small job, a CompiledEmbed for a big one, and
    for a very big one on a CPU with int8 matrix units an int8 graph calibrated on its first batch, when it agrees
    with the model; "eager", "compiled" and "int8" force one (int8 falls back to compiled where it cannot be had).
    Every graph is dropped at exit. ``total``: the job's size where image_sets is only a sample of it (a build in
    chunks)."""
    from fashion_search.accel import CompiledEmbed, int8_embed_graph, worth_int8

    if graph_choice not in GRAPHS:
        raise ValueError(f"graph {graph_choice!r}: expected one of {', '.join(GRAPHS)}")
    total = sum(len(images) for images in image_sets) if total is None else total
    size = image_sets[0].shape[-1] if image_sets else 0
    by_size = graph_choice == "by-size"
    if graph_choice == "eager" or (by_size and not worth_compiling(total, size, device)):
        yield None
        return
    first = next((images for images in image_sets if len(images) >= batch_size), None)
    graph = None
    int8 = graph_choice == "int8" or (by_size and worth_int8(model, total, size, device))
    if int8 and first is not None:
        graph = int8_embed_graph(model, first[:batch_size], batch_size, device, dtype)
        if graph is not None:
            print(f"embedding {total:,} photos through an int8 graph (calibrated on the first {batch_size})")
    try:
        yield graph if graph is not None else CompiledEmbed(model)
    finally:
        torch.compiler.reset()


def embed_splits(model, splits: dict, run_dir, data: DataConfig, run: RunConfig, runtime, ray_factory=None) -> str:
    """Write embeddings/<split>.npy + .parquet for every split with ``model`` (an EmbeddingModel); returns the
    precision they were computed in (int8, bfloat16, float16 or float32), which metrics.json records. With
    ``ray_factory`` (--engine ray), a pool of Ray actors embeds instead, each with the model the factory builds."""
    model = model.for_inference()
    prepared = {split: split_rows(split_ds, data)[:2] for split, split_ds in splits.items()}
    image_sets = [rows.images for rows, _ in prepared.values()]
    if ray_factory is not None:
        from fashion_search import ray_engine

        vectors = ray_engine.embed(ray_factory, image_sets, run.ray_actors,
                                   gpus_per_actor=1 if runtime.device.type == "cuda" else 0)
        for (split, (rows, split_ds)), embeddings in zip(prepared.items(), vectors):
            write_embeddings(run_dir, split, embeddings, metadata_frame(split_ds, split, rows=rows.rows))
        return runtime.precision_name
    with job_graph(model, image_sets, runtime.device, runtime.dtype, run.eval_batch_size,
                   run.graph) as compiled:  # one graph for every split
        for split, (rows, split_ds) in prepared.items():
            embeddings = embed_images(model, rows.images, runtime.device, runtime.dtype, run.eval_batch_size,
                                      f"embed {split}", compiled=compiled)
            write_embeddings(run_dir, split, embeddings, metadata_frame(split_ds, split, rows=rows.rows))
    from fashion_search.accel import CompiledEmbed

    int8 = compiled is not None and not isinstance(compiled, CompiledEmbed)  # job_graph yields nothing else
    return "int8" if int8 else runtime.precision_name
