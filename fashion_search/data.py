"""Datasets: the hub data, processed splits, users' own catalogs, row metadata, and the uint8 image cache that
lets no epoch decode a JPEG twice."""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fashion_search.config import DataConfig
from fashion_search.errors import QueryError, UserError
from fashion_search.files import atomic_save_npy
from fashion_search.runtime import decode_threads
from fashion_search.stores import RECORD_FIELDS
from fashion_search.photos.pool import BATCH, decode_many

HUB_DATASET = "ashraq/fashion-product-images-small"
SPLITS = ("train", "val", "test")
# Metadata kept row-aligned with every embeddings/<split>.npy.
META_COLUMNS = ("id", "gender", "masterCategory", "subCategory", "articleType", "baseColour",
                "season", "usage", "year", "productDisplayName")


def is_saved_dataset(path) -> bool:
    path = Path(path)
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def load_raw_dataset(spec: str):
    """A hub name, a local folder in the hub layout, or a ``save_to_disk`` folder -> datasets object.
    Offline with a hub name: UserError naming the dataset and --dataset/--data."""
    import datasets

    if Path(spec).is_dir():
        if is_saved_dataset(spec):
            return datasets.load_from_disk(spec)
        try:
            return datasets.load_dataset(spec, split="train")
        except ValueError as exc:  # datasets' words for a folder whose files hold no rows
            if "corresponds to no data" in str(exc):
                raise UserError(f"dataset {spec!r} has no rows: nothing to embed") from None
            raise UserError(f"cannot read dataset {spec!r} ({str(exc)[:200]})") from None
    if Path(spec).exists() or spec.startswith((".", "/")) or spec.count("/") != 1:
        raise UserError(f"dataset {spec!r} is neither a folder nor a hub name (owner/name)")
    try:
        return datasets.load_dataset(spec, split="train")
    except (ConnectionError, OSError) as exc:
        raise UserError(f"cannot load dataset {spec!r} from the Hugging Face hub ({type(exc).__name__}); "
                        f"offline, pass a local copy with --dataset PATH (a hub-layout or save_to_disk folder)") from None


def catalog_splits(spec: str) -> dict:
    """A dataset to embed as a catalog (a hub name, a hub-layout or processed folder, or a folder of image files) as
    {split name: dataset}; one without splits is one split named 'all'. It must have an ``image`` column and rows;
    an ``id`` column is made where there is none (photo_ids)."""
    data = load_raw_dataset(spec)
    splits = dict(data) if hasattr(data, "keys") else {"all": data}
    for name, split in splits.items():
        taken = [column for column in RECORD_FIELDS if column in split.column_names]
        if taken:
            raise UserError(f"dataset {spec!r} has a column named {taken[0]!r}, a name the catalog gives a field of "
                            f"its own records ({', '.join(RECORD_FIELDS)}): rename that column")
        if "image" not in split.column_names:
            raise UserError(f"dataset {spec!r} has no 'image' column (columns: {', '.join(split.column_names)}): "
                            f"a catalog needs its photos")
        if "id" not in split.column_names:
            splits[name] = split.add_column("id", photo_ids(split, spec))
    if not sum(len(split) for split in splits.values()):
        raise UserError(f"dataset {spec!r} has no rows: nothing to embed")
    return splits


def photo_ids(split, spec: str) -> list:
    """Ids for photos that come without an id column: their file names (numbers where every name is one), or, where
    a photo has no file name, one made from its content, so that the same photo gets the same id in every run and two
    runs of catalog.py add never take each other's ids. The same file name twice is an error, not a silent rename."""
    cells = encoded_images(split)["image"]
    stems = [Path(cell["path"]).stem if cell.get("path") else "" for cell in cells]
    named = [stem for stem in stems if stem]
    if len(set(named)) < len(named):
        twice = next(stem for stem, count in collections.Counter(named).items() if count > 1)
        raise UserError(f"dataset {spec!r} has two photos named {twice!r} (say, {twice}.jpg and {twice}.png): file "
                        f"names are the item ids, so each must be unique")
    if all(stems) and all(stem.isdigit() for stem in stems):
        return [int(stem) for stem in stems]
    return [stem or "photo-" + hashlib.sha256(cell_bytes(cell)).hexdigest()[:16] for stem, cell in zip(stems, cells)]


def dataset_name(spec: str) -> str:
    """A short name for a dataset given as a hub name or a folder: its last path part."""
    return Path(str(spec).rstrip("/")).name or "dataset"


def load_processed(data_dir):
    """The output of data_preparation.py: (DatasetDict with train/val/test, label_map dict)."""
    import datasets

    data_dir = Path(data_dir)
    if not (data_dir / "label_map.json").exists() or not is_saved_dataset(data_dir):
        raise UserError(f"{data_dir} is not a processed dataset (no label_map.json / dataset_dict.json); "
                        f"run: python data_preparation.py --output-dir {data_dir}")
    label_map = json.loads((data_dir / "label_map.json").read_text())
    return datasets.load_from_disk(str(data_dir)), label_map


def metadata_frame(split_ds, split_name: str, every_column: bool = False, rows=None):
    """Row-aligned metadata of a split (no images) as a pandas DataFrame: META_COLUMNS and the label, or with
    ``every_column`` all but the image (a user's catalog's own columns, which filter its searches). ``row`` is each
    row's place in the dataset's split as stored: ``rows`` where ``split_ds`` is a selection of it (rows whose photo
    did not decode left out), else 0, 1, 2, ..."""
    columns = [c for c in (split_ds.column_names if every_column else META_COLUMNS + ("label",))
               if c in split_ds.column_names and c != "image"]
    frame = split_ds.select_columns(columns).to_pandas()
    frame.insert(0, "row", np.arange(len(frame)) if rows is None else np.asarray(rows, dtype=np.int64))
    frame.insert(1, "split", split_name)
    return frame


def encoded_images(split):
    """A split whose image column holds each photo's cells as stored (bytes or a path), never decoded by datasets:
    photos from outside are decoded through the gate alone."""
    from datasets import Image as ImageFeature

    return split.cast_column("image", ImageFeature(decode=False))


def cell_bytes(cell) -> bytes:
    """The encoded image of a datasets Image cell read with decode=False: inline bytes, or the file they point to.
    QueryError for a row without an image."""
    if not cell or (cell.get("bytes") is None and not cell.get("path")):
        raise QueryError("the row has no image")
    return cell["bytes"] if cell.get("bytes") is not None else Path(cell["path"]).read_bytes()


def decode_cells(cells, size: int, pool=None, left_out: collections.Counter | None = None) -> list[np.ndarray | None]:
    """Image cells (read with decode=False) decoded through the gate to uint8 [3, S, S] each, None where the gate
    refuses one or it cannot be read (its reason counted in ``left_out``); a batch of photos a worker task, the
    batches in ``pool``'s threads when one is given. A decode waits for its turn however long it takes: a busy
    moment never marks a good photo broken."""
    def read(cell):
        try:
            return cell_bytes(cell)
        except QueryError as exc:
            return exc
        except OSError as exc:  # a missing file
            return QueryError(f"cannot read its file ({exc.strerror})")

    photos = [read(cell) for cell in cells]
    readable = [i for i, photo in enumerate(photos) if not isinstance(photo, QueryError)]
    batches = [readable[start:start + BATCH] for start in range(0, len(readable), BATCH)]

    def one_batch(places):
        return decode_many([photos[i] for i in places], size)
    for places, answers in zip(batches, pool.map(one_batch, batches) if pool is not None else map(one_batch, batches)):
        for place, answer in zip(places, answers):
            photos[place] = answer
    if left_out is not None:
        left_out.update(str(photo) for photo in photos if isinstance(photo, QueryError))
    return [None if isinstance(photo, QueryError) else photo for photo in photos]


def report_left_out(left_out: collections.Counter, what: str):
    """One line: how many photos ``what`` left out, and why (the commonest reasons first)."""
    if left_out:
        reasons = "; ".join(f"{count} x {reason}" for reason, count in left_out.most_common(3))
        more = f"; and {len(left_out) - 3} other reasons" if len(left_out) > 3 else ""
        print(f"{what} left out {sum(left_out.values())} photos: {reasons}{more}")


def image_cache(split_ds, size: int, cache_dir) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image of a split once, resized to size x size, into a uint8 [N, 3, S, S] .npy that is
    memory-mapped afterwards, so that no epoch decodes a JPEG twice. Returns (images, ok) where ok[i] is
    False for rows whose image could not be decoded (their pixels are zero; callers skip them)."""
    # datasets has no public content hash of a split; _fingerprint is its own cache key (a hash of the files read and
    # every transform since), so a changed split never reads a stale cache
    key = f"{split_ds._fingerprint}-{len(split_ds)}-{size}"
    cache_dir = Path(cache_dir)
    images_path, ok_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.ok.npy"
    if images_path.exists() and ok_path.exists():
        return np.load(images_path, mmap_mode="r"), np.load(ok_path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    raw = encoded_images(split_ds).select_columns(["image"])
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}.", suffix=".npy")
    os.close(fd)
    try:
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(raw), 3, size, size))
        ok, left_out = np.ones(len(raw), dtype=bool), collections.Counter()
        with ThreadPoolExecutor(decode_threads(), thread_name_prefix="decode") as pool:
            for start in tqdm(range(0, len(raw), 512), desc=f"decode {size}px", unit="batch", leave=False,
                              disable=None):
                for offset, pixels in enumerate(decode_cells(raw[start:start + 512]["image"], size, pool, left_out)):
                    if pixels is None:
                        ok[start + offset] = False
                    else:
                        images[start + offset] = pixels
        images.flush()
        del images
        report_left_out(left_out, f"the {size}px image cache")
        atomic_save_npy(ok_path, ok)
        os.replace(tmp, images_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return np.load(images_path, mmap_mode="r"), ok


class ImageRows(torch.utils.data.Dataset):
    """Rows of one split over the uint8 cache (a torch Dataset). ``__getitems__`` fetches a whole batch with one fancy index,
    so a DataLoader batch costs one memory copy, not B Python calls. Each item carries its row: its place in the
    split as stored (``rows``), which stays true when rows whose photo did not decode are left out."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, rows: np.ndarray | None = None):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.rows = np.arange(len(self.labels)) if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.__getitems__([index])

    def __getitems__(self, indices):
        indices = np.asarray(indices)
        order = np.argsort(indices, kind="stable")  # sorted reads are faster on a memmap
        batch = np.empty((len(indices),) + self.images.shape[1:], dtype=np.uint8)
        batch[order] = self.images[indices[order]]
        # images: uint8 [B, 3, S, S]; labels: int64 [B]; rows: int64 [B] (places in the split as stored)
        return torch.from_numpy(batch), torch.from_numpy(self.labels[indices]), torch.from_numpy(self.rows[indices])


def split_rows(split_ds, data: DataConfig, label_column="label"):
    """(ImageRows, metadata, ok) for a split, after --limit; rows whose image fails to decode are dropped."""
    if data.limit:
        split_ds = split_ds.select(range(min(data.limit, len(split_ds))))
    images, ok = image_cache(split_ds, data.image_size, data.cache_dir)
    labels = np.asarray(split_ds[label_column]) if label_column in split_ds.column_names else np.full(len(split_ds), -1)
    if not ok.all():
        keep = np.flatnonzero(ok)
        print(f"skipped {len(ok) - len(keep)} rows whose image could not be decoded")
        return ImageRows(images[keep], labels[keep], keep), split_ds.select(keep), ok
    return ImageRows(images, labels), split_ds, ok
