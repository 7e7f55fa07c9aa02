"""Add products to, or remove them from, the catalog a clip.py run serves, without rebuilding its index. A running
app sees the change at its next query (the FAISS store: a new version on disk; Milvus: within the server's
staleness bound, seconds).

Usage:
  python catalog.py add --run runs/clip [--index faiss] ITEMS     (ITEMS: a folder of photos, or a dataset folder)
  python catalog.py remove --run runs/clip [--index faiss] ID [ID ...]
  python catalog.py count --run runs/clip [--index faiss]
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from fashion_search.data import catalog_splits
from fashion_search.errors import UserError, cli
from fashion_search.files import atomic_write
from fashion_search.runtime import device_arg
from fashion_search.serving.catalog import (catalog_from_run, dataset_image_bytes, embed_dataset, id_key,
                                            item_records)
from fashion_search.serving.encoder import Encoder


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("add", "remove", "count"))
    parser.add_argument("items", nargs="*", help="add: a folder of photos (ids from file names) or a dataset folder "
                        "with an image column and the catalog's metadata columns; remove: item ids")
    parser.add_argument("--run", default="runs/clip", help="the clip.py run whose catalog is updated")
    parser.add_argument("--index", default="faiss", help="the app's --index: faiss, milvus:PATH.db or "
                        "milvus://HOST:PORT/COLLECTION")
    parser.add_argument("--device", type=device_arg, default="cpu")
    parser.add_argument("--cache-dir", default="data/cache")
    args = parser.parse_args(argv)
    if args.command == "add" and len(args.items) != 1:
        parser.error("add takes one ITEMS folder")
    if args.command == "remove" and not args.items:
        parser.error("remove takes the ids of the items to remove")
    return args


def add(catalog, encoder, spec: str, cache_dir: str):
    """Embed every photo of ``spec`` with the run's model, keep a copy of each photo beside the index (the app shows
    it), then upsert them: an item with an id already in the catalog is replaced."""
    splits = catalog_splits(spec)
    vectors, meta = embed_dataset(splits, encoder, cache_dir)
    photo_bytes, photos = dataset_image_bytes(splits), []
    for split, row, item_id in zip(meta["split"], meta["row"], meta["id"]):
        data = photo_bytes(split, row)
        name = hashlib.sha256(id_key(item_id).encode()).hexdigest()[:24]
        atomic_write(catalog.photos.folder / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
        photos.append(name)
    keys, records = item_records(meta.drop(columns=["split", "row"]).assign(photo=photos))
    replaced = sum(catalog.store.fetch(key) is not None for key in keys)
    catalog.store.upsert(keys, vectors, records)
    print(f"added {len(keys) - replaced:,} items and replaced {replaced:,}: the catalog holds "
          f"{catalog.store.count():,}")


def remove(catalog, ids):
    keys = [id_key(item_id) for item_id in ids]
    missing = [key for key in keys if catalog.store.fetch(key) is None]
    removed = catalog.store.delete(keys)
    if missing:
        print(f"not in the catalog: {', '.join(missing)}")
    print(f"removed {removed:,} items: the catalog holds {catalog.store.count():,}")


def main(argv=None):
    args = parse_args(argv)
    run = Path(args.run)
    if not (run / "hf_model" / "config.json").exists():
        raise UserError(f"{run} is not a clip.py run (no hf_model/config.json)")
    encoder = Encoder(str(run / "hf_model"), args.device, int8=False)
    catalog = catalog_from_run(run, encoder, None, args.cache_dir, args.index)  # builds the base catalog if needed
    if args.command == "add":
        add(catalog, encoder, args.items[0], args.cache_dir)
    elif args.command == "remove":
        remove(catalog, args.items)
    else:
        print(f"the catalog holds {catalog.store.count():,} items")
    catalog.store.close()


if __name__ == "__main__":
    cli(main)
