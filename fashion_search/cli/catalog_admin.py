"""Add products to, or remove them from, the catalog a clip.py run serves, without rebuilding its index. A running
app sees the change at its next query (the FAISS store: a new version on disk; Milvus: within the server's
staleness bound, seconds). It works on the catalog the app serves: the run's own, or the app's --dataset (given
here too, or read from the index); an index that holds another catalog is refused, and nothing is written.

Usage:
  python catalog.py add --run runs/clip [--index faiss] ITEMS     (ITEMS: a folder of photos, or a dataset folder)
  python catalog.py remove --run runs/clip [--index faiss] ID [ID ...]
  python catalog.py count --run runs/clip [--index faiss]
  python catalog.py duplicates --run runs/clip [--index faiss] [--threshold 0.99995]
"""
from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
import tempfile
from pathlib import Path

from fashion_search.data import catalog_splits
from fashion_search.errors import UserError, cli
from fashion_search.files import atomic_write
from fashion_search.runtime import add_device_arg
from fashion_search.serving.catalog import catalog_from_run, dataset_image_bytes, embed_dataset, item_records
from fashion_search.serving.duplicates import DUPLICATE_COSINE, catalog_groups
from fashion_search.serving.encoder import run_encoder
from fashion_search.errors import QueryError
from fashion_search.serving.gate import item_id
from fashion_search.stores import OtherCatalog


@dataclass(frozen=True)
class CatalogCommand:
    """One command's flags, parsed once (their defaults and meaning: parse_config)."""
    command: str
    run: str
    index: str
    dataset: str | None
    device: str
    cache_dir: str
    items: str | list[str] | None = None  # add: a folder; remove: ids
    threshold: float | None = None  # duplicates


def parse_config(argv=None) -> CatalogCommand:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{add,remove,count,duplicates}")
    # each command its own parser, so that options and items may come in any order after it
    specs = {"add": ("embed a folder of photos (ids from file names) or a dataset folder, and add or replace them",
                     dict(metavar="ITEMS", help="a folder of photos, or a dataset folder with an image column and the "
                          "catalog's metadata columns")),
             "remove": ("remove items by id", dict(nargs="+", metavar="ID", help="item ids")),
             "count": ("print how many items the catalog holds", None),
             "duplicates": ("list groups of near-duplicate items (the same product listed twice)", None)}
    for name, (description, items) in specs.items():
        command = commands.add_parser(name, help=description, description=description)
        if items:
            command.add_argument("items", **items)
        command.add_argument("--run", default="runs/clip", help="the clip.py run whose catalog is updated")
        command.add_argument("--index", default="faiss", help="the app's --index: faiss, milvus:PATH.db or "
                             "milvus://HOST:PORT/COLLECTION")
        command.add_argument("--dataset", default=None, help="the app's --dataset, where it serves one (default: the "
                             "catalog the index holds)")
        add_device_arg(command)
        command.add_argument("--cache-dir", default="data/cache")
        if name == "duplicates":
            command.add_argument("--threshold", type=float, default=DUPLICATE_COSINE,
                                 help="the cosine from which two items are near-duplicates (BENCHMARKS.md, section 8)")
    return CatalogCommand(**vars(parser.parse_args(argv)))


def list_duplicates(catalog, threshold: float):
    """Groups of near-duplicates, one line each: the ids, and each one's name where the catalog has names."""
    keys, vectors = catalog.store.items()
    groups = catalog_groups(vectors, threshold)
    for group in groups:
        names = [str(catalog.store.fetch(keys[i])[1].get("productDisplayName") or "") for i in group]
        print("  ".join(f"{keys[i]}" + (f" ({name})" if name else "") for i, name in zip(group, names)))
    print(f"{len(groups):,} groups of near-duplicates (cosine >= {threshold:g}) holding "
          f"{sum(len(g) for g in groups):,} of {len(keys):,} items")


def add(catalog, encoder, spec: str, cache_dir: str):
    """Embed every photo of ``spec`` with the run's model, keep a copy of each photo beside the index (the app shows
    it), then upsert them: an item with an id already in the catalog is replaced."""
    splits = catalog_splits(spec)
    with tempfile.TemporaryDirectory(prefix="catalog-add-") as chunks:
        vectors, meta = embed_dataset(splits, encoder, cache_dir, Path(chunks))
    photo_bytes, photos = dataset_image_bytes(splits), []
    for split, row in zip(meta["split"], meta["row"]):
        data = photo_bytes(split, row)
        name = hashlib.sha256(data).hexdigest()[:32]  # by content: a replaced photo gets a new name
        if not (catalog.photos.folder / name).exists():
            atomic_write(catalog.photos.folder / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
        photos.append(name)
    keys, records = item_records(meta.drop(columns=["split", "row"]).assign(photo=photos))
    replaced = sum(catalog.store.fetch(key) is not None for key in keys)
    catalog.store.upsert(keys, vectors, records)
    print(f"added {len(keys) - replaced:,} items and replaced {replaced:,}: the catalog holds "
          f"{catalog.store.count():,}")


def remove(catalog, ids):
    try:
        keys = [item_id(value) for value in ids]
    except QueryError as exc:
        raise UserError(str(exc)) from None
    missing = [key for key in keys if catalog.store.fetch(key) is None]
    removed = catalog.store.delete(keys)
    if missing:
        print(f"not in the catalog: {', '.join(repr(key) for key in missing)}")
    print(f"removed {removed:,} items: the catalog holds {catalog.store.count():,}")


def open_catalog(run: Path, encoder, dataset: str | None, cache_dir: str, index: str):
    """The catalog the app serves from this run's index: built first if the index is new; with no --dataset, the one
    the index holds (the run's own, or the dataset the app was given). An index of another catalog than --dataset
    is refused (stores.OtherCatalog), never rebuilt."""
    try:
        return catalog_from_run(run, encoder, dataset, cache_dir, index, rebuild=False)
    except OtherCatalog as exc:
        if dataset or not exc.source.startswith("dataset:"):
            raise
        held = exc.source.removeprefix("dataset:")
    print(f"the index holds the catalog of dataset {held}")
    return catalog_from_run(run, encoder, held, cache_dir, index, rebuild=False)


def main(argv=None):
    config = parse_config(argv)
    run = Path(config.run)
    encoder = run_encoder(run, config.device)
    catalog = open_catalog(run, encoder, config.dataset, config.cache_dir, config.index)
    if config.command == "add":
        add(catalog, encoder, config.items, config.cache_dir)
    elif config.command == "remove":
        remove(catalog, config.items)
    elif config.command == "duplicates":
        list_duplicates(catalog, config.threshold)
    else:
        print(f"the catalog holds {catalog.store.count():,} items")
    catalog.store.close()


def command():  # fashion-catalog, python catalog.py
    cli(main)


if __name__ == "__main__":
    command()
