"""Shared core of every script: seeding, device and precision, data loading and the image cache,
batch transforms, the training loop, checkpoints, embedding export and the run folder.

Model scripts (resnet.py, clip.py, siamese.py, vae.py) import this module and never each other.
A model handed to this module is an ``nn.Module`` with:
  - ``embed(images) -> [B, D]``: the retrieval embedding (normalised here, not there);
  - ``mean`` / ``std``: per-channel input normalisation (tuples of 3 floats);
  - optionally ``int8_worthwhile = False``: big CPU jobs then embed in bf16 rather than int8 (job_embed);
and the script passes ``loss_fn(model, images, labels, rows) -> loss`` for training.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from PIL import Image, ImageFile, ImageOps
from tqdm.auto import tqdm

HUB_DATASET = "ashraq/fashion-product-images-small"
SPLITS = ("train", "val", "test")
# Metadata kept row-aligned with every embeddings/<split>.npy.
META_COLUMNS = ("id", "gender", "masterCategory", "subCategory", "articleType", "baseColour",
                "season", "usage", "year", "productDisplayName")
# A photo larger than this (width x height) is refused before it is decoded (decompression bombs).
MAX_IMAGE_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half a picture
# transformers imports torchao (app.py's int8 path) whenever it is installed, and torchao 0.18 under torch 2.14 then
# logs two deprecation notes about its own enums at every start: not ours to act on.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


from fashion_search import checkpoint  # noqa: E402
from fashion_search.errors import UserError, cli, fail  # noqa: E402,F401
from fashion_search.files import (atomic_save_npy, atomic_torch_save, atomic_write, atomic_write_json,  # noqa: E402,F401
                                  atomic_write_parquet, atomic_write_text, file_sha256, git_commit)

# --------------------------------------------------------------------------- seeding, device, precision

def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device_arg(value: str) -> str:
    """argparse type for --device: auto, cpu, cuda or cuda:N."""
    value = value.strip().lower()
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise argparse.ArgumentTypeError(f"unknown device {value!r} (use auto, cpu, cuda or cuda:N)")


def positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA device is available (use --device cpu)")
    return torch.device(name)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> str:
    """/proc/cpuinfo, read once per process ("" where there is none)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX); elsewhere bf16
    autocast is emulated and slower than fp32."""
    return any(flag in cpu_flags() for flag in (" avx512_bf16", " amx_bf16"))


def cpu_supports_int8() -> bool:
    """True where the CPU has int8 matrix instructions (AVX512-VNNI or AMX), which int8 graphs need to be fast."""
    return any(flag in cpu_flags() for flag in (" avx512_vnni", " amx_int8"))


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for a device: bf16 on CUDA (fp16 on GPUs without bf16) and on CPUs with native
    bf16 support; None (fp32) otherwise. ``precision`` forces bf16, fp16 or fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- images

def open_image(source) -> Image.Image:
    """Decode bytes, a path or a PIL image into an RGB image, whatever the file holds: EXIF orientation
    applied, first frame of animations, transparency composed over white, CMYK/16-bit/palette converted.
    Raises ValueError with a readable message for anything that is not a decodable raster image."""
    try:
        if isinstance(source, Image.Image):
            image = source
        else:
            stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
            image = Image.open(stream)
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ValueError(f"image is too large ({width}x{height} pixels; the limit is {MAX_IMAGE_PIXELS:,})")
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except ValueError:
        raise
    except (OSError, SyntaxError, Image.DecompressionBombError, EOFError, TypeError) as exc:
        raise ValueError(f"not a readable image ({type(exc).__name__}: {exc})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit greyscale: scale the real range to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        image = Image.fromarray(array.astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def square_uint8(image: Image.Image, size: int) -> np.ndarray:
    """Pad to a square on white (product photos have white backgrounds, so nothing is cropped away),
    resize to size x size and return uint8 [3, size, size]."""
    if image.size == (size, size):
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)  # already the input size: nothing to resample
    # ImageOps.pad's arithmetic, with each side at least 1 pixel (it fails on e.g. 20000 x 20).
    scale = size / max(image.width, image.height)
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    resized = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(resized, (round((size - width) / 2), round((size - height) / 2)))
    return np.asarray(canvas, dtype=np.uint8).transpose(2, 0, 1)


def decode_square(data: bytes, size: int) -> np.ndarray:
    """JPEG bytes -> uint8 [3, size, size]. ``draft`` lets the JPEG decoder downscale by 2/4/8 while it
    decodes, which is several times faster than decoding at full size and resizing afterwards."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.format == "JPEG" and getattr(image, "n_frames", 1) == 1:
            image.draft("RGB", (size, size))
    except (OSError, SyntaxError, Image.DecompressionBombError, EOFError, TypeError) as exc:
        raise ValueError(f"not a readable image ({type(exc).__name__}: {exc})") from None
    return square_uint8(open_image(image), size)


# --------------------------------------------------------------------------- datasets

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
    an ``id`` column is made from the file names where there is none (or from row numbers)."""
    from datasets import Image as ImageFeature

    data = load_raw_dataset(spec)
    splits = dict(data) if hasattr(data, "keys") else {"all": data}
    for name, split in splits.items():
        if "image" not in split.column_names:
            raise UserError(f"dataset {spec!r} has no 'image' column (columns: {', '.join(split.column_names)}): "
                            f"a catalog needs its photos")
        if "id" not in split.column_names:
            cells = split.cast_column("image", ImageFeature(decode=False))["image"]
            stems = [Path(cell["path"]).stem if cell.get("path") else "" for cell in cells]
            if not all(stems) or len(set(stems)) < len(stems):  # no file names, or the same name twice
                stems = [f"{name}-{row}" for row in range(len(split))]
            ids = [int(stem) for stem in stems] if all(stem.isdigit() for stem in stems) else stems
            splits[name] = split.add_column("id", ids)
    if not sum(len(split) for split in splits.values()):
        raise UserError(f"dataset {spec!r} has no rows: nothing to embed")
    return splits


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


def metadata_frame(split_ds, split_name: str):
    """Row-aligned metadata of a split (no images) as a pandas DataFrame."""
    columns = [c for c in META_COLUMNS + ("label",) if c in split_ds.column_names]
    frame = split_ds.select_columns(columns).to_pandas()
    frame.insert(0, "row", np.arange(len(frame)))
    frame.insert(1, "split", split_name)
    return frame


def cell_bytes(cell) -> bytes:
    """The encoded image of a datasets Image cell read with decode=False: inline bytes, or the file they point to."""
    return cell["bytes"] if cell.get("bytes") is not None else Path(cell["path"]).read_bytes()


def image_cache(split_ds, size: int, cache_dir) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image of a split once, resized to size x size, into a uint8 [N, 3, S, S] .npy that is
    memory-mapped afterwards, so that no epoch decodes a JPEG twice. Returns (images, ok) where ok[i] is
    False for rows whose image could not be decoded (their pixels are zero; callers skip them)."""
    from datasets import Image as ImageFeature

    key = f"{split_ds._fingerprint}-{len(split_ds)}-{size}"
    cache_dir = Path(cache_dir)
    images_path, ok_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.ok.npy"
    if images_path.exists() and ok_path.exists():
        return np.load(images_path, mmap_mode="r"), np.load(ok_path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    raw = split_ds.cast_column("image", ImageFeature(decode=False)).select_columns(["image"])
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}.", suffix=".npy")
    os.close(fd)
    try:
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(raw), 3, size, size))
        ok = np.ones(len(raw), dtype=bool)
        for start in tqdm(range(0, len(raw), 512), desc=f"decode {size}px", unit="batch", leave=False, disable=None):
            for offset, cell in enumerate(raw[start:start + 512]["image"]):
                try:
                    images[start + offset] = decode_square(cell_bytes(cell), size)
                except (ValueError, OSError, TypeError, AttributeError):
                    ok[start + offset] = False
        images.flush()
        del images
        atomic_save_npy(ok_path, ok)
        os.replace(tmp, images_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return np.load(images_path, mmap_mode="r"), ok


class ImageRows(torch.utils.data.Dataset):
    """Rows of one split over the uint8 cache. ``__getitems__`` fetches a whole batch with one fancy index,
    so a DataLoader batch costs one memory copy, not B Python calls."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.__getitems__([index])

    def __getitems__(self, indices):
        indices = np.asarray(indices)
        order = np.argsort(indices, kind="stable")  # sorted reads are faster on a memmap
        batch = np.empty((len(indices),) + self.images.shape[1:], dtype=np.uint8)
        batch[order] = self.images[indices[order]]
        # images: uint8 [B, 3, S, S]; labels: int64 [B]; rows: int64 [B]
        return torch.from_numpy(batch), torch.from_numpy(self.labels[indices]), torch.from_numpy(indices)


def _identity(batch):
    return batch


class ShuffledBatches:
    """Seeded batches of a shuffled permutation; the order depends only on (seed, epoch), so a resumed
    run sees exactly the batches an uninterrupted one would."""

    def __init__(self, num_rows: int, batch_size: int, seed: int, drop_last: bool = True):
        self.num_rows, self.batch_size, self.seed, self.drop_last, self.epoch = num_rows, batch_size, seed, drop_last, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        if self.drop_last and self.num_rows >= self.batch_size:
            return self.num_rows // self.batch_size
        return math.ceil(self.num_rows / self.batch_size)

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)
        for i in range(len(self)):
            yield order[i * self.batch_size:(i + 1) * self.batch_size].tolist()


class ClassBalancedBatches(ShuffledBatches):
    """P classes x K images per batch (metric learning): every batch holds positive pairs for every anchor.
    Classes with fewer than K rows are sampled with replacement; classes with one row are never drawn."""

    def __init__(self, labels, classes_per_batch: int, per_class: int, seed: int):
        labels = np.asarray(labels)
        self.by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        self.by_class = [rows for rows in self.by_class if len(rows) >= 2]
        if not self.by_class:
            raise UserError("class-balanced batches need at least one class with two rows")
        self.classes_per_batch = min(classes_per_batch, len(self.by_class))
        self.per_class = per_class
        super().__init__(len(labels), self.classes_per_batch * per_class, seed)

    def __len__(self):
        return max(1, self.num_rows // self.batch_size)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        for _ in range(len(self)):
            chosen = rng.choice(len(self.by_class), self.classes_per_batch, replace=False)
            batch = [rng.choice(self.by_class[c], self.per_class, replace=len(self.by_class[c]) < self.per_class)
                     for c in chosen]
            yield np.concatenate(batch).tolist()


def batches(dataset: ImageRows, batch_sampler) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=_identity, num_workers=0)


# --------------------------------------------------------------------------- batch transforms

def normalize(images_uint8: torch.Tensor, mean, std, device, channels_last=False) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> normalised float [B, 3, S, S] on ``device`` (the copy travels as uint8: 4x less)."""
    images = images_uint8.to(device, non_blocking=True).float().div_(255)
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=device).view(1, 3, 1, 1)
    images = (images - mean) / std
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random zoom-in (scale 0.8-1) with shift, on a float batch [B, 3, S, S],
    in one grid_sample so that it runs on the training device."""
    batch = images.shape[0]
    rand = torch.rand(batch, 4, generator=generator).to(images.device)
    scale = 0.8 + 0.2 * rand[:, 0]
    flip = torch.where(rand[:, 1] < 0.5, -1.0, 1.0)
    shift_x = (rand[:, 2] * 2 - 1) * (1 - scale)
    shift_y = (rand[:, 3] * 2 - 1) * (1 - scale)
    theta = torch.zeros(batch, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
    theta[:, 0, 2], theta[:, 1, 2] = shift_x, shift_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --------------------------------------------------------------------------- embedding export

# A whole catalog is worth compiling: Inductor with the weights frozen into the graph ran ResNet-50 1.43-1.69x and the
# ViT-B/32 1.31-1.45x faster than eager at batch 64 on 2 CPU cores, after a 7-25 s compile (BENCHMARKS.md section 1).
# That pays from a few thousand 224 px images; a 64 px image costs ~12x less, hence the budget in 224 px equivalents.
COMPILE_FROM_224PX_IMAGES = 5_000
# Photos per forward pass of a batch job (--eval-batch-size): 64, since int8 graphs ran ResNet-50 and the ViT-B/32
# 1.1-1.6x faster at 64 than at 256 (interleaved in one process, 2 CPU cores) and bf16 ones no slower.
EMBED_BATCH = 64
# A bigger job also repays quantising to int8 on a CPU with int8 matrix units: end to end 1.15-1.67x (ResNet-50) and
# 1.23-1.38x (ViT-B/32) the frozen bf16 graph's photos/s, after 25-77 s of setup (export, calibration, compile, check)
# against its 6-25 s: that pays from ~5k and ~11k 224 px photos (BENCHMARKS.md section 1).
INT8_FROM_224PX_IMAGES = 20_000
# The int8 graph is used only if every calibration photo's embedding keeps at least this cosine to the model's own:
# random full-size models gave 0.9998, and the trained ResNet-18, ViT and Siamese runs kept their test precision@5
# within 0.0025 (BENCHMARKS.md).
INT8_MIN_COSINE = 0.99


def worth_compiling(images: int, image_size: int) -> bool:
    return images * (image_size / 224) ** 2 >= COMPILE_FROM_224PX_IMAGES


def worth_int8(model, images: int, image_size: int, device: torch.device) -> bool:
    return (device.type == "cpu" and cpu_supports_int8() and getattr(model, "int8_worthwhile", True)
            and images * (image_size / 224) ** 2 >= INT8_FROM_224PX_IMAGES)


class CompiledEmbed:
    """model.embed compiled by Inductor at static batch shapes, with the weights frozen into the graph (constant-
    folded, and prepacked for oneDNN on CPU): for a big batch job (one shape, the last batch padded), or the app's
    queries (two shapes, kept for the server's life). A context manager: on exit every compiled graph is dropped,
    since frozen weights would go stale if the model changed afterwards. Should compiling fail (no C++ compiler,
    say), it says so once and the eager model does the job."""

    def __init__(self, model):
        from torch._inductor import config as inductor_config

        self.eager = model.embed
        # Compiling happens at the first call, inside this config switch: the switch, not torch.compile(options=
        # {"freezing": True}), is what freezes (with the option ResNet-50 ran unfrozen: 41.6 img/s; frozen 60.6).
        self.fn = inductor_config.patch(freezing=True)(torch.compile(self.eager, dynamic=False))

    def __call__(self, batch):
        if self.fn is not self.eager:
            try:
                return self.fn(batch)
            except Exception as exc:  # noqa: BLE001 - the eager model below is the fallback (and raises real errors)
                print(f"torch.compile failed ({type(exc).__name__}: {str(exc)[:160]}); embedding without it",
                      file=sys.stderr)
                self.fn = self.eager
        return self.fn(batch)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        torch.compiler.reset()


def quantize_int8(module: nn.Module, calibration: list[torch.Tensor], dtype: torch.dtype | None):
    """Static int8 post-training quantisation for the CPU's int8 matrix units: PT2E (torch.export, then torchao's
    X86InductorQuantizer default config: activations per tensor, weights per channel, ranges observed on the
    calibration batches), compiled by Inductor with frozen weights, and run once under autocast to ``dtype`` (as
    embed_images will call it) so that it compiles here. The module must own its weights as parameters (weights a
    closure merely captures stay float). The graph takes the calibration batches' shape only: exported with a
    dynamic batch dimension it ran no faster than bf16 (BENCHMARKS.md section 1). It keeps the float module alive
    (~0.6 GB for a ViT-B/32 tower; Inductor's freezing_discard_parameters freed only 45 MB of it, so it is not used).
    Raises ImportError without torchao."""
    import warnings

    from torch._inductor import config as inductor_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchao's notes on its own internals, once per quantised layer
        exported = torch.export.export(module.eval(), (calibration[0],)).module()
        # export turns each .float() / .to(dtype) into a dtype assertion, which bf16 autocast would then fail
        for node in list(exported.graph.nodes):
            if node.target is torch.ops.aten._assert_tensor_metadata.default:
                exported.graph.erase_node(node)
        exported.recompile()
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for batch in calibration:  # the observers record each activation's range
                prepared(batch)
        graph = inductor_config.patch(freezing=True)(torch.compile(convert_pt2e(prepared), dynamic=False))
        with torch.inference_mode(), autocast(calibration[0].device, dtype):
            graph(calibration[0].clone())  # an inference tensor, as embed_images passes: else it compiles twice
    return graph


class _EmbedModule(nn.Module):
    """``model.embed`` as the forward of a module that owns the model, as torch.export needs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.embed(images)


def int8_embed_graph(model, photos: np.ndarray, batch_size: int, device, dtype, channels_last=False):
    """An int8 graph of ``model.embed`` for batches of ``batch_size`` (quantize_int8 over an fp32 copy of the model,
    calibrated on ``photos``, uint8 [N, 3, S, S] with N a multiple of batch_size), or None where it cannot be had (no
    torchao, an export the quantizer refuses) or where it disagrees with the model on those photos (a cosine under
    INT8_MIN_COSINE), or on a device other than the CPU (the quantizer targets x86 CPUs). A model whose weights are
    not its own fp32 parameters (app.Encoder) provides ``float_embed_module()`` to export."""
    import copy

    if device.type != "cpu":
        return None
    photos = np.array(photos, order="C")
    pixels = normalize(torch.from_numpy(photos), model.mean, model.std, device, channels_last)
    try:
        module = model.float_embed_module() if hasattr(model, "float_embed_module") else \
            _EmbedModule(copy.deepcopy(model).float())
        graph = quantize_int8(module, list(pixels.split(batch_size)), dtype)
        quantized = embed_images(model, photos, device, dtype, batch_size, progress=False,
                                 channels_last=channels_last, compiled=graph)
    except ImportError:
        print("int8 embedding skipped: torchao is not installed (pip install torchao)")
        return None
    except Exception as exc:  # noqa: BLE001 - the bf16 model does the job instead
        print(f"int8 embedding skipped: {type(exc).__name__}: {str(exc)[:160]}")
        return None
    reference = embed_images(model, photos, device, dtype, batch_size, progress=False, channels_last=channels_last)
    agreement = float(np.sum(quantized * reference, axis=1).min())
    if agreement < INT8_MIN_COSINE:
        print(f"int8 embedding not used: its embeddings of {len(photos)} photos differ from the model's "
              f"(lowest cosine {agreement:.4f} < {INT8_MIN_COSINE})")
        return None
    return graph


@contextlib.contextmanager
def job_embed(model, image_sets: list[np.ndarray], device, dtype, batch_size, channels_last=False, int8=True):
    """What a batch job over ``image_sets`` (uint8 [N, 3, S, S] each) passes to embed_images as ``compiled``: None
    (eager) for a small job, a CompiledEmbed for a big one, and for a very big one on a CPU with int8 matrix units
    (unless ``int8`` is False) an int8 graph calibrated on its first batch, when it agrees with the model. Every graph
    is dropped at exit."""
    total = sum(len(images) for images in image_sets)
    size = image_sets[0].shape[-1] if image_sets else 0
    if not worth_compiling(total, size):
        yield None
        return
    first = next((images for images in image_sets if len(images) >= batch_size), None)
    graph = None
    if int8 and first is not None and worth_int8(model, total, size, device):
        graph = int8_embed_graph(model, first[:batch_size], batch_size, device, dtype, channels_last)
        if graph is not None:
            print(f"embedding {total:,} photos through an int8 graph (calibrated on the first {batch_size})")
    try:
        yield graph if graph is not None else CompiledEmbed(model)
    finally:
        torch.compiler.reset()


@torch.inference_mode()
def embed_images(model, images: np.ndarray, device, dtype, batch_size=EMBED_BATCH, desc="embed",
                 channels_last=False, progress=True, compiled=None) -> np.ndarray:
    """uint8 [N, 3, S, S] -> float32 [N, D], L2-normalised, in batches under inference_mode + autocast.
    With ``compiled`` (a CompiledEmbed or an int8 graph of model.embed), every batch runs through it at one shape
    (the last one padded with zeros) so that it compiles once."""
    model.eval()
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False,
                      disable=None if progress else True):
        # A C-order copy: decoded photos are channels-last views ([3, S, S] over [S, S, 3]), and a compiled graph is
        # specialised to its input's strides, so a real photo after a warm-up on a blank one would recompile.
        pixels = np.array(images[start:start + batch_size], order="C")
        rows = len(pixels)
        if compiled is not None and rows < batch_size:
            pixels = np.concatenate([pixels, np.zeros((batch_size - rows, *pixels.shape[1:]), pixels.dtype)])
        batch = normalize(torch.from_numpy(pixels), model.mean, model.std, device, channels_last)
        with autocast(device, dtype):
            features = (compiled or model.embed)(batch)[:rows]
        chunks.append(F.normalize(features.float(), dim=1).cpu())
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(chunks).numpy().astype(np.float32)


def write_embeddings(run_dir, split: str, embeddings: np.ndarray, metadata):
    """embeddings/<split>.npy (float32, L2-normalised, [rows, dim]) and the row-aligned .parquet."""
    if len(embeddings) != len(metadata):
        raise ValueError(f"{split}: {len(embeddings)} embeddings but {len(metadata)} metadata rows")
    folder = Path(run_dir) / "embeddings"
    atomic_save_npy(folder / f"{split}.npy", np.ascontiguousarray(embeddings, dtype=np.float32))
    atomic_write_parquet(folder / f"{split}.parquet", metadata.reset_index(drop=True))


# --------------------------------------------------------------------------- the command line every script shares

def add_common_args(parser: argparse.ArgumentParser, image_size: int, batch_size: int, lr: float, epochs: int):
    add = parser.add_argument
    add("--data", default="data/processed", help="processed dataset from data_preparation.py (with --embed-only: "
        "also a hub-layout folder or a hub name)")
    add("--output-dir", default=None, help="run folder for args, checkpoints, log, metrics and embeddings "
        "(default runs/<model>; with --embed-only, <checkpoint>-embed-<dataset name> beside the trained run)")
    add("--model", default=None, help="local pretrained weights (a save_pretrained folder or a state_dict file) "
        "instead of the hub download")
    add("--from-scratch", action="store_true", help="same architecture family with random weights (no download)")
    add("--tiny", action="store_true", help="a very small configuration of the same family, for tests")
    add("--image-size", type=positive_int, default=image_size, help="square input size in pixels")
    add("--epochs", type=positive_int, default=epochs)
    add("--batch-size", type=positive_int, default=batch_size)
    add("--lr", type=float, default=lr, help="peak AdamW learning rate (after warmup)")
    add("--weight-decay", type=float, default=0.05)
    add("--warmup", type=float, default=0.05, help="fraction of steps with linear warmup")
    add("--grad-clip", type=float, default=1.0, help="max gradient norm (0 disables)")
    add("--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps")
    add("--time-budget", type=float, default=None, metavar="MINUTES",
        help="wall-time budget for training + validation: the LR schedule follows whichever of steps or time runs "
             "out first, and training stops in time for a last validation (fair comparisons on a shared CPU)")
    add("--limit", type=positive_int, default=None, help="use at most this many rows per split (quick runs)")
    add("--seed", type=int, default=0)
    add("--device", type=device_arg, default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    add("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
        help="autocast dtype; auto = bf16 on CUDA and on CPUs with native bf16, else fp32, and int8 to embed a "
             "catalog of 20k+ photos on a CPU with int8 units (checked against the model first)")
    add("--cache-dir", default="data/cache", help="decoded-image cache (uint8 .npy per split and size)")
    add("--resume", action="store_true", help="continue an interrupted run from <output-dir>/last.pt")
    add("--embed-only", action="store_true", help="embed --data with the trained run --checkpoint, no training")
    add("--checkpoint", default=None, help="with --embed-only: the trained run folder")
    add("--eval-batch-size", type=positive_int, default=EMBED_BATCH)


def validate_args(args, name: str):
    if args.embed_only and not args.checkpoint:
        raise UserError("--embed-only needs --checkpoint RUN_DIR (a trained run folder)")
    if args.embed_only and args.output_dir is None:  # beside the trained run, never inside it
        args.output_dir = f"{str(args.checkpoint).rstrip('/')}-embed-{dataset_name(args.data)}"
    if args.output_dir is None:
        args.output_dir = f"runs/{name}"
    if args.embed_only and args.checkpoint and Path(args.output_dir).resolve() == Path(args.checkpoint).resolve():
        raise UserError(f"--output-dir {args.output_dir} is the trained run itself: --embed-only writes elsewhere "
                        f"(leave --output-dir out to write beside it)")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.model and not Path(args.model).exists():
        raise UserError(f"--model {args.model}: no such file or folder")
    return args


def load_pretrained(loader, name: str, what: str):
    """Call ``loader(name)``; offline or missing weights become one line naming --model and --from-scratch."""
    try:
        return loader(name)
    except (OSError, ConnectionError) as exc:  # URLError, HTTP errors and hub errors are OSErrors
        raise UserError(f"cannot load pretrained {what} {name!r} ({type(exc).__name__}); offline, pass a local "
                        f"copy with --model PATH, or train with --from-scratch") from None


# --------------------------------------------------------------------------- the run folder and training loop

class Run:
    """One output folder: args.json, log.jsonl, last.pt (resume), best.pt (selected model), metrics.json,
    embeddings/. Every file is written atomically."""

    def __init__(self, output_dir, args, resume=False):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.last, self.best, self.log_path = self.dir / "last.pt", self.dir / "best.pt", self.dir / "log.jsonl"
        record = {k: v for k, v in vars(args).items()}
        record["git_commit"] = git_commit()
        record["command"] = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
        atomic_write_json(self.dir / "args.json", record)
        if not resume:
            for stale in (self.last, self.best, self.log_path, self.dir / "metrics.json"):
                stale.unlink(missing_ok=True)

    def trim_log(self, epochs: int):
        if self.log_path.exists():
            lines = [line for line in self.log_path.read_text().splitlines() if json.loads(line)["epoch"] <= epochs]
            atomic_write_text(self.log_path, "".join(line + "\n" for line in lines))

    def log(self, record: dict):
        # Append one line; the previous lines stay intact even if this process dies mid-write.
        lines = self.log_path.read_text().splitlines() if self.log_path.exists() else []
        atomic_write_text(self.log_path, "\n".join(lines + [json.dumps(record)]) + "\n")


def training_fingerprint(args) -> dict:
    """The arguments that must match for --resume to continue the same run."""
    keys = ("data", "model", "from_scratch", "tiny", "image_size", "epochs", "batch_size", "lr", "weight_decay",
            "warmup", "max_steps", "limit", "seed", "time_budget")
    return {k: getattr(args, k, None) for k in keys}


def lr_lambda(total_steps: int, warmup_steps: int, time_progress=None):
    """Linear warmup then cosine decay over the steps; with a time budget, ``time_progress()`` (0..1, the share
    of the budget used) moves the schedule on when time runs out faster than the steps."""
    def cosine(fraction):  # 1 -> 0 as fraction goes 0 -> 1
        return 0.5 * (1 + math.cos(math.pi * min(1.0, fraction)))

    def factor(step):
        if time_progress is not None:
            progress, warm = max(step / total_steps, time_progress()), warmup_steps / total_steps
            if progress < warm:
                return max(progress, 1 / total_steps) / warm
            return cosine((progress - warm) / max(1e-9, 1 - warm))
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return cosine((step - warmup_steps) / max(1, total_steps - warmup_steps))
    return factor


def fit(model, loss_fn, train_rows: ImageRows, val_rows: ImageRows, batch_sampler, run: Run, args,
        save_extra: dict, channels_last=False):
    """AdamW + warmup/cosine, grad clipping, autocast; each epoch: a tqdm bar, validation precision@5
    (leave-one-out within val), one summary line, last.pt for --resume and best.pt when val improves."""
    from evaluation import leave_one_out_precision

    device, dtype = args.device_obj, args.autocast_dtype
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    loader = batches(train_rows, batch_sampler)
    steps_per_epoch = len(batch_sampler)
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or 10**12)
    epochs = math.ceil(total_steps / steps_per_epoch)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    # fused: one kernel for all tensors, a 2x faster optimizer step on CPU (BENCHMARKS.md, section 4)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr,
                                  fused=device.type in ("cpu", "cuda"))
    # --time-budget: seconds spent in fit (training and validation, summed over resumed sessions) against the budget
    budget = args.time_budget * 60 if args.time_budget else None
    clock = {"spent_before": 0.0, "session_start": time.perf_counter(), "last_val": 0.0}

    def spent():
        return clock["spent_before"] + time.perf_counter() - clock["session_start"]

    def time_is_up():  # leaves time for one more validation
        return budget is not None and spent() + clock["last_val"] >= budget

    # training ends when spent + one validation reaches the budget: the schedule reaches its end at that moment
    time_progress = (lambda: min(1.0, spent() / max(1e-9, budget - clock["last_val"]))) if budget else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, int(args.warmup * total_steps),
                                                                       time_progress))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start_epoch, step, best_score, best_epoch = 0, 0, -1.0, -1
    if args.resume and run.last.exists():
        state = checkpoint.load(run.last, map_location=device)
        if state["fingerprint"] != training_fingerprint(args):
            raise UserError(f"--resume: {run.last} was written with other arguments "
                            f"({state['fingerprint']}); rerun with those, or without --resume")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step, best_score, best_epoch = state["epoch"] + 1, state["step"], state["best_score"], state["best_epoch"]
        clock["spent_before"] = state.get("seconds_spent", 0.0)
        run.trim_log(start_epoch)  # lines of an epoch that was cut short are written again
        print(f"resumed from {run.last} after epoch {state['epoch'] + 1}, step {step}")
    for epoch in range(start_epoch, epochs):
        model.train()
        batch_sampler.set_epoch(epoch)
        generator = torch.Generator().manual_seed(args.seed * 100_003 + epoch)  # augmentation, per epoch
        started, data_wait, loss_sum, seen = time.perf_counter(), 0.0, 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False, disable=None)
        fetch_started = time.perf_counter()
        out_of_time = False
        for images, labels, rows in bar:
            if step >= total_steps:
                break
            if time_is_up():
                out_of_time = True
                break
            images = augment(normalize(images, model.mean, model.std, device, channels_last), generator)
            labels = labels.to(device, non_blocking=True)
            data_wait += time.perf_counter() - fetch_started
            with autocast(device, dtype):
                loss = loss_fn(model, images, labels, rows)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            loss_sum += loss.item() * len(labels)
            seen += len(labels)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            fetch_started = time.perf_counter()
        train_seconds = time.perf_counter() - started
        val_started = time.perf_counter()
        val_embeddings = embed_images(model, val_rows.images, device, dtype, args.eval_batch_size, "val",
                                      channels_last)
        score = leave_one_out_precision(val_embeddings, val_rows.labels, k=5)
        clock["last_val"] = time.perf_counter() - val_started
        improved = score > best_score
        if improved:
            best_score, best_epoch = score, epoch
            checkpoint.save(run.best, {"model": model.state_dict(), "epoch": epoch, "val_precision@5": score,
                                         **save_extra})
        record = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(1, seen),
                  "val_precision@5": score, "lr": scheduler.get_last_lr()[0], "seconds": round(train_seconds, 2),
                  "images_per_second": round(seen / max(train_seconds, 1e-9), 1),
                  "data_wait_share": round(data_wait / max(train_seconds, 1e-9), 4)}
        run.log(record)
        checkpoint.save(run.last, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                     "epoch": epoch, "step": step, "best_score": best_score,
                                     "best_epoch": best_epoch, "fingerprint": training_fingerprint(args),
                                     "seconds_spent": spent()})
        print(f"epoch {epoch + 1}/{epochs} loss {record['train_loss']:.4f} val_precision@5 {score:.4f}"
              f"{' *' if improved else ''} {record['images_per_second']:.0f} img/s "
              f"data-wait {record['data_wait_share']:.1%}", flush=True)
        if step >= total_steps:
            break
        if out_of_time or time_is_up():
            print(f"time budget of {args.time_budget:g} min reached after {step} steps (epoch {epoch + 1})")
            break
    if not run.best.exists():
        raise UserError(f"no epoch finished in {run.dir}; nothing to export")
    state = checkpoint.load(run.best, map_location=device)
    model.load_state_dict(state["model"])
    return state


# --------------------------------------------------------------------------- the story every model script tells

def prepare(args, name: str):
    """Validate arguments, seed, and resolve device and autocast dtype (stored on args)."""
    validate_args(args, name)
    set_seed(args.seed)
    args.device_obj = resolve_device(args.device)
    args.autocast_dtype = autocast_dtype(args.device_obj, args.precision)
    return args


def split_rows(split_ds, args, label_column="label"):
    """(ImageRows, metadata, ok) for a split, after --limit; rows whose image fails to decode are dropped."""
    if args.limit:
        split_ds = split_ds.select(range(min(args.limit, len(split_ds))))
    images, ok = image_cache(split_ds, args.image_size, args.cache_dir)
    labels = np.asarray(split_ds[label_column]) if label_column in split_ds.column_names else np.full(len(split_ds), -1)
    if not ok.all():
        keep = np.flatnonzero(ok)
        print(f"skipped {len(ok) - len(keep)} rows whose image could not be decoded")
        return ImageRows(images[keep], labels[keep]), split_ds.select(keep), ok
    return ImageRows(images, labels), split_ds, ok


def public_args(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("device_obj", "autocast_dtype")}


def train_and_export(args, name, build_model, loss_fn, make_sampler=None, channels_last=False, export=None):
    """The shared part of every model script: data -> model -> fit -> embeddings of every split -> metrics.

    build_model(args, num_classes, backbone_config=None) -> (model, backbone_config) builds the model
    (pretrained, from scratch or tiny); the backbone_config it returns is stored in best.pt so that
    --embed-only can rebuild the architecture without a download."""
    import evaluation

    dataset, label_map = load_processed(args.data)
    run = Run(args.output_dir, argparse.Namespace(**public_args(args)), resume=args.resume)
    num_classes = len(label_map["labels"])
    model, backbone_config = build_model(args, num_classes)
    train_rows, _, _ = split_rows(dataset["train"], args)
    val_rows, _, _ = split_rows(dataset["val"], args)
    sampler = (make_sampler or (lambda rows: ShuffledBatches(len(rows), args.batch_size, args.seed)))(train_rows)
    started = time.perf_counter()
    extra = {"script": name, "args": public_args(args), "backbone_config": backbone_config,
             "label_names": list(label_map["labels"]), "label_column": label_map["label_column"],
             "image_size": args.image_size}
    state = fit(model, loss_fn, train_rows, val_rows, sampler, run, args, extra, channels_last)
    train_seconds = time.perf_counter() - started
    precision = embed_splits(model, {s: dataset[s] for s in SPLITS}, run.dir, args, channels_last)
    if export:
        export(model, run.dir)
    metrics = evaluation.evaluate_run(run.dir)
    metrics.update({"model": name, "best_epoch": state["epoch"] + 1, "train_seconds": round(train_seconds, 1),
                    "from_scratch": bool(args.from_scratch or args.tiny), "image_size": args.image_size,
                    "embedding_precision": precision})
    atomic_write_json(run.dir / "metrics.json", metrics)
    print(f"{name}: " + " ".join(f"{k} {metrics[k]:.4f}" for k in evaluation.HEADLINE_KEYS)
          + f" ({metrics['protocol']}, {metrics['num_queries']} queries) -> {run.dir}")
    return metrics


def fold_batchnorm(model):
    """For inference: a copy of the model whose ResNet backbone has each BatchNorm folded into the convolution
    before it (torch.fx fuse; the same function in eval mode, up to float rounding). Saves the BatchNorm passes:
    1.16x for ResNet-50 at batch 64 on 2 CPU cores (BENCHMARKS.md, section 1). Models without a torchvision ResNet
    backbone are returned as they are."""
    import copy

    import torchvision
    from torch.fx.experimental.optimization import fuse

    if not isinstance(getattr(model, "backbone", None), torchvision.models.ResNet):
        return model
    folded = copy.deepcopy(model).eval()
    folded.backbone = fuse(folded.backbone)
    # torchvision calls one ReLU module up to three times per block; the int8 quantizer (int8_embed_graph) groups
    # the calls of one module together and refuses the group ("more than one output node"), so each call becomes
    # its own torch.relu node. The same function.
    graph = folded.backbone.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and isinstance(folded.backbone.get_submodule(node.target), nn.ReLU):
            with graph.inserting_after(node):
                node.replace_all_uses_with(graph.call_function(torch.relu, node.args))
            graph.erase_node(node)
    folded.backbone.delete_all_unused_submodules()
    folded.backbone.recompile()
    return folded


def embed_splits(model, splits: dict, run_dir, args, channels_last=False) -> str:
    """Write embeddings/<split>.npy + .parquet for every split; returns the precision they were computed in (int8,
    bfloat16, float16 or float32), which metrics.json records."""
    model = fold_batchnorm(model)
    prepared = {split: split_rows(split_ds, args)[:2] for split, split_ds in splits.items()}
    image_sets = [rows.images for rows, _ in prepared.values()]
    with job_embed(model, image_sets, args.device_obj, args.autocast_dtype, args.eval_batch_size, channels_last,
                   int8=args.precision == "auto") as compiled:  # one graph for every split
        for split, (rows, split_ds) in prepared.items():
            embeddings = embed_images(model, rows.images, args.device_obj, args.autocast_dtype, args.eval_batch_size,
                                      f"embed {split}", channels_last, compiled=compiled)
            write_embeddings(run_dir, split, embeddings, metadata_frame(split_ds, split))
    int8 = compiled is not None and not isinstance(compiled, CompiledEmbed)  # job_embed yields nothing else
    return "int8" if int8 else str(args.autocast_dtype or torch.float32).removeprefix("torch.")


def load_trained(run_dir, name, build_model, device):
    """Rebuild a trained model from <run_dir>/best.pt without any download: (model, checkpoint state)."""
    path = Path(run_dir) / "best.pt"
    if not path.exists():
        raise UserError(f"--checkpoint {run_dir}: no best.pt there (is it a finished training run?)")
    state = checkpoint.load(path)
    if state.get("script") != name:
        raise UserError(f"--checkpoint {run_dir} was trained by {state.get('script')}.py, not {name}.py")
    saved_args = argparse.Namespace(**state["args"])
    model, _ = build_model(saved_args, len(state["label_names"]), state["backbone_config"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise UserError(f"{path} does not match the architecture {state.get('script')} builds: {str(exc)[:300]}")
    return model.to(device), state


def embed_only(args, name, build_model, channels_last=False):
    """--embed-only: embed every split of --data (a processed folder, a hub-layout folder or a hub name; a
    dataset without splits is one split named 'all') with a trained run, writing the same files as training."""
    model, state = load_trained(args.checkpoint, name, build_model, args.device_obj)
    args.image_size = state["image_size"]  # the size the model was trained at
    if channels_last:
        model.to(memory_format=torch.channels_last)
    splits = catalog_splits(args.data)
    label_ids = {label: i for i, label in enumerate(state["label_names"])}
    label_column = state.get("label_column", "articleType")
    for split, split_ds in list(splits.items()):
        if "label" not in split_ds.column_names and label_column in split_ds.column_names:
            splits[split] = split_ds.map(lambda b: {"label": [label_ids.get(v, -1) for v in b[label_column]]},
                                         batched=True, desc="labels")
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.output_dir) / "args.json", {**public_args(args), "git_commit": git_commit()})
    print(f"--embed-only: writing to {args.output_dir}")
    precision = embed_splits(model, splits, args.output_dir, args, channels_last)
    print(f"embedded {', '.join(f'{s} ({len(d)})' for s, d in splits.items())} in {precision} -> "
          f"{args.output_dir}/embeddings")


# --------------------------------------------------------------------------- classifier heads

def add_head_args(parser: argparse.ArgumentParser):
    parser.add_argument("--head", choices=("linear", "cosine"), default="linear",
                        help="classifier on the embedding: linear, or cosine (normalised softmax: trains the cosine "
                             "geometry that retrieval ranks by, and class weights cannot grow with class frequency)")
    parser.add_argument("--cosine-scale", type=float, default=16.0,
                        help="--head cosine: logits = scale * cosine (a temperature of 1/scale)")


class CosineHead(nn.Module):
    """Normalised-softmax classifier (Zhai & Wu 2019, "Classification is a strong baseline for deep metric
    learning"): logits = scale * cos(embedding, class weight). The unit-norm class weights also remove a linear head's
    bias towards frequent classes, whose weights grow larger (Kang et al. 2020)."""

    def __init__(self, feature_dim: int, num_classes: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, feature_dim) * feature_dim ** -0.5)
        self.scale = scale

    def forward(self, features):  # [B, D] -> logits [B, classes], in float32 (small, and exact softmax)
        return self.scale * F.normalize(features.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).T


def classifier_head(args, feature_dim: int, num_classes: int, bias: bool = True) -> nn.Module:
    # runs saved before --head existed have no such argument: they were linear
    if getattr(args, "head", "linear") == "cosine":
        return CosineHead(feature_dim, num_classes, args.cosine_scale)
    return nn.Linear(feature_dim, num_classes, bias=bias)


# --------------------------------------------------------------------------- backbones shared by several scripts

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


RESNET_ARCHS = ("resnet18", "resnet34", "resnet50")


def add_resnet_args(parser: argparse.ArgumentParser):
    parser.add_argument("--arch", choices=RESNET_ARCHS, default="resnet50",
                        help="ResNet depth (the original uses resnet50; a shallower one fits a CPU budget from scratch)")


def resnet_backbone(args, backbone_config=None):
    """(backbone with fc = Identity, feature dim, backbone_config) for resnet.py and siamese.py.
    Default: torchvision ResNet-50 with ImageNet weights (IMAGENET1K_V2; other --arch: their DEFAULT weights);
    --model: a local torchvision state_dict file; --from-scratch: random weights; --tiny: ResNet with one
    BasicBlock per stage (tests)."""
    import torchvision

    arch = (backbone_config or {}).get("arch") or ("resnet-tiny" if args.tiny else args.arch)
    if arch == "resnet-tiny":
        net = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    elif backbone_config is not None or args.from_scratch:
        net = torchvision.models.get_model(arch)
    elif args.model:
        net = torchvision.models.get_model(arch)
        state = torch.load(args.model, map_location="cpu", weights_only=True)
        try:
            net.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except (RuntimeError, AttributeError) as exc:
            raise UserError(f"--model {args.model} is not a torchvision {arch} state_dict: {str(exc)[:200]}")
    else:
        weights = torchvision.models.get_model_weights(arch).DEFAULT  # resnet50: IMAGENET1K_V2
        net = load_pretrained(lambda _: torchvision.models.get_model(arch, weights=weights), f"{arch} {weights.name}",
                              "torchvision weights")
    dim = net.fc.in_features
    net.fc = torch.nn.Identity()
    return net, dim, {"arch": arch}


def clip_image_features(clip, pixel_values):
    """Projected CLIP image embeddings [B, projection_dim] (transformers 4 returns a tensor, 5 an output)."""
    size = clip.config.vision_config.image_size
    out = clip.get_image_features(pixel_values=pixel_values, interpolate_pos_encoding=pixel_values.shape[-1] != size)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_text_features(clip, input_ids, attention_mask):
    out = clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def char_tokenizer():
    """A character-level CLIPTokenizer (GPT-2 byte alphabet, no merges) for CLIP trained from scratch, where
    the hub's BPE vocabulary cannot be downloaded. Ids: 0 = start, 1 = end/pad, then one per byte (+ '</w>')."""
    from transformers import CLIPTokenizer

    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    alphabet = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in alphabet:
            vocab[char + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])
