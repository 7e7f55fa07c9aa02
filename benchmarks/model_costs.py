"""What each trained run costs to serve, measured in one run on one machine: embedding dimension, index bytes per
product (the FAISS index the app builds over the run's whole catalog, serialized), embedding throughput (photos/s,
uint8 cache in, unit vectors out, as --embed-only runs for this catalog size), and top-5 query latency on that index
(p50 of single queries, the test embeddings as queries). The raw-pixel baseline (32 px, 3,072 values) is measured on
the same terms, its "embedding" being the resize evaluation.py does.

Usage: python benchmarks/model_costs.py runs/full/resnet runs/full/siamese ... [--photos 2048] [--queries 500]
"""
import argparse
import importlib
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from fashion_search import checkpoint
from fashion_search.data import SPLITS, image_cache, load_processed
from fashion_search.embed import job_graph
from fashion_search.inference import EMBED_BATCH, embed_images
from fashion_search.config import Config
from fashion_search.pipeline import load_trained
from fashion_search.runs import load_split
from fashion_search.runtime import Runtime
from fashion_search.stores.faiss_index import build_index


def catalog_vectors(run: Path) -> np.ndarray:
    return np.concatenate([load_split(run, split)[0] for split in SPLITS])


def index_costs(vectors: np.ndarray, queries: np.ndarray) -> tuple[float, float, str]:
    import faiss

    index = build_index(vectors)
    size = len(faiss.serialize_index(index))
    times = []
    for query in queries:
        started = time.perf_counter()
        index.search(query[None], 5)
        times.append(time.perf_counter() - started)
    return size / len(vectors), statistics.median(times) * 1e3, type(index).__name__


def model_throughput(run: Path, photos: np.ndarray, total: int, runtime: Runtime) -> float:
    """photos/s of the trained model on ``photos`` (uint8 [N, 3, S, S]), through the path --embed-only takes for a
    catalog of ``total`` photos (eager, compiled or int8: fashion_search.embed.job_graph decides)."""
    name = checkpoint.load(run / "best.pt")["script"]
    script = importlib.import_module(f"fashion_search.cli.{name}")
    model, _ = load_trained(run, name, script.build_model, runtime.device, script.Options)
    if model.channels_last:
        model.to(memory_format=torch.channels_last)
    model = model.for_inference()
    sized = [np.broadcast_to(photos[:1], (total, *photos.shape[1:]))]  # what job_graph sees: the catalog's size
    with job_graph(model, sized, runtime.device, runtime.dtype, EMBED_BATCH) as compiled:
        embed_images(model, photos[:EMBED_BATCH], runtime.device, runtime.dtype, EMBED_BATCH, progress=False,
                     compiled=compiled)  # warm-up (and the compile, if any)
        started = time.perf_counter()
        embed_images(model, photos, runtime.device, runtime.dtype, EMBED_BATCH, progress=False, compiled=compiled)
        return len(photos) / (time.perf_counter() - started)


def pixel_throughput(photos: np.ndarray) -> float:
    """photos/s of the baseline's vectors from the same decoded photos: resized to 32 px, flattened, normalised."""
    started = time.perf_counter()
    for start in range(0, len(photos), EMBED_BATCH):
        batch = torch.from_numpy(photos[start:start + EMBED_BATCH]).float()
        vectors = torch.nn.functional.interpolate(batch, size=32, mode="bilinear", antialias=True).flatten(1)
        torch.nn.functional.normalize(vectors - vectors.mean(0), dim=1)
    return len(photos) / (time.perf_counter() - started)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--photos", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=500)
    args = parser.parse_args(argv)
    runtime = Runtime.create("cpu")
    first = Path(args.runs[0])
    saved = Config.from_dict(json.loads((first / "args.json").read_text())).data
    dataset, _ = load_processed(saved.path)
    total = sum(len(dataset[s]) for s in SPLITS)
    photos64, _ = image_cache(dataset["test"], saved.image_size, saved.cache_dir)
    photos64 = np.ascontiguousarray(photos64[:args.photos])
    rows = []
    for run in map(Path, args.runs):
        vectors = catalog_vectors(run)
        queries = load_split(run, "test")[0][:args.queries]
        per_item, p50, kind = index_costs(vectors, queries)
        speed = model_throughput(run, photos64, total, runtime)
        rows.append((run.name, vectors.shape[1], per_item, kind, speed, p50))
    # the pixel baseline: 32 px flattened, centred and normalised (evaluation.py), over the whole catalog
    pixels32 = [image_cache(dataset[s], 32, saved.cache_dir)[0] for s in SPLITS]
    vectors = np.concatenate([np.asarray(p, dtype=np.float32).reshape(len(p), -1) for p in pixels32])
    vectors -= vectors.mean(0)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12
    per_item, p50, kind = index_costs(vectors, vectors[-args.queries:])
    rows.append(("pixels (baseline)", vectors.shape[1], per_item, kind, pixel_throughput(photos64), p50))
    print(f"catalog: {total:,} products; throughput on {args.photos:,} test photos at {saved['image_size']} px; "
          f"{torch.get_num_threads()} threads\n")
    print("| run | dimension | index bytes / product | index | embedding photos/s | top-5 query p50 ms |")
    print("|---|---:|---:|---|---:|---:|")
    for name, dim, per_item, kind, speed, p50 in rows:
        print(f"| {name} | {dim:,} | {per_item:,.0f} | {kind} | {speed:,.0f} | {p50:.3f} |")


if __name__ == "__main__":
    main()
