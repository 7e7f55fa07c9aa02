"""The story every model script tells, written once: its shared flags, then either train -> export embeddings ->
metrics, or --embed-only with a trained run."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fashion_search import checkpoint, distributed
from fashion_search.data import SPLITS, catalog_splits, dataset_name, load_processed, split_rows
from fashion_search.embed import embed_splits
from fashion_search.errors import UserError
from fashion_search.files import atomic_write_json, git_commit
from fashion_search.inference import EMBED_BATCH, GPU_EMBED_BATCH, embed_batch_size
from fashion_search.metrics import HEADLINE_KEYS
from fashion_search.runs import Run, calibrate_run, evaluate_run
from fashion_search.runtime import Runtime, add_device_arg, positive_int, set_seed
from fashion_search.samplers import ShuffledBatches
from fashion_search.training import fit


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
    add("--batch-size", type=positive_int, default=batch_size, help="global batch: under torchrun each of N processes "
        "takes 1/N of it, so the same --batch-size and --lr train the same recipe on any number of GPUs")
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
    add_device_arg(parser)
    add("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
        help="autocast dtype; auto = bf16 on CUDA and on CPUs with native bf16, else fp32, and int8 to embed a "
             "catalog of 20k+ photos on a CPU with int8 units (checked against the model first)")
    add("--cache-dir", default="data/cache", help="decoded-image cache (uint8 .npy per split and size)")
    add("--resume", action="store_true", help="continue an interrupted run from <output-dir>/last.pt")
    add("--embed-only", action="store_true", help="embed --data with the trained run --checkpoint, no training")
    add("--checkpoint", default=None, help="with --embed-only: the trained run folder")
    add("--eval-batch-size", type=positive_int, default=None, help=f"photos per forward pass when embedding "
        f"(default: {EMBED_BATCH} on a CPU, {GPU_EMBED_BATCH} on a GPU)")
    add("--engine", choices=("local", "ray"), default="local", help="with --embed-only: embed in this process "
        "(local), or on a Ray cluster (RAY_ADDRESS, else a local one) with a pool of model actors")
    add("--ray-actors", type=positive_int, default=2, help="--engine ray: model actors (one GPU each on GPUs)")


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


def prepare(args, name: str) -> Runtime:
    """Validate the arguments (filling in the defaults that depend on others), join the torchrun world if there is
    one, seed, and resolve where and in what precision to compute."""
    validate_args(args, name)
    world = distributed.start(args.device) if not args.embed_only else distributed.world()
    args.world_size = world.size
    if world.size > 1:
        if args.device != "cpu" and torch.cuda.is_available():
            args.device = f"cuda:{world.local_rank}"
        if world.main:
            print(f"{name}: data-parallel training on {world.size} processes "
                  f"({torch.distributed.get_backend()}), global batch {args.batch_size}")
    set_seed(args.seed)  # the same on every rank: identical initial weights
    runtime = Runtime.create(args.device, args.precision)
    args.eval_batch_size = args.eval_batch_size or embed_batch_size(runtime.device)
    return runtime


def train_and_export(args, runtime: Runtime, name, build_model, loss_fn, make_sampler=None, export=None):
    """The shared part of every model script: data -> model -> fit -> embeddings of every split -> metrics.

    build_model(args, num_classes, backbone_config=None) -> (model, backbone_config) builds the model
    (pretrained, from scratch or tiny); the backbone_config it returns is stored in best.pt so that
    --embed-only can rebuild the architecture without a download."""
    dataset, label_map = load_processed(args.data)
    main = distributed.world().main
    run = Run(args.output_dir, args, resume=args.resume, write=main)
    num_classes = len(label_map["labels"])
    model, backbone_config = build_model(args, num_classes)
    train_rows, _, _ = split_rows(dataset["train"], args)
    val_rows, _, _ = split_rows(dataset["val"], args)
    sampler = (make_sampler or (lambda rows: ShuffledBatches(len(rows), args.batch_size, args.seed)))(train_rows)
    started = time.perf_counter()
    extra = {"script": name, "args": vars(args), "backbone_config": backbone_config,
             "label_names": list(label_map["labels"]), "label_column": label_map["label_column"],
             "image_size": args.image_size}
    state = fit(model, loss_fn, train_rows, val_rows, sampler, run, args, runtime, extra)
    train_seconds = time.perf_counter() - started
    distributed.finish()
    if not main:  # rank 0 embeds, evaluates and writes the rest
        return None
    precision = embed_splits(model, {s: dataset[s] for s in SPLITS}, run.dir, args, runtime)
    if export:
        export(model, run.dir)
    metrics = evaluate_run(run.dir)
    metrics["calibration_test"] = calibrate_run(run.dir)  # writes calibration.json (fitted on val)
    metrics.update({"model": name, "best_epoch": state["epoch"] + 1, "train_seconds": round(train_seconds, 1),
                    "from_scratch": bool(args.from_scratch or args.tiny), "image_size": args.image_size,
                    "embedding_precision": precision})
    atomic_write_json(run.dir / "metrics.json", metrics)
    print(f"{name}: " + " ".join(f"{k} {metrics[k]:.4f}" for k in HEADLINE_KEYS)
          + f" ({metrics['protocol']}, {metrics['num_queries']} queries) -> {run.dir}")
    return metrics


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


class TrainedEmbedder:
    """A picklable recipe for a trained run's embedding function, built where it runs (a Ray actor): it loads
    best.pt there rather than shipping the model."""

    def __init__(self, run_dir, name, build_model, device, precision, batch_size):
        self.run_dir, self.name, self.build_model = str(run_dir), name, build_model
        self.device, self.precision, self.batch_size = device, precision, batch_size

    def __call__(self):
        from fashion_search.inference import embed_images

        runtime = Runtime.create(self.device, self.precision)
        model, _ = load_trained(self.run_dir, self.name, self.build_model, runtime.device)
        if model.channels_last:  # as embed_only prepares it for the local loop
            model.to(memory_format=torch.channels_last)
        model = model.for_inference()
        return lambda images: embed_images(model, images, runtime.device, runtime.dtype, self.batch_size,
                                           progress=False)


def embed_only(args, runtime: Runtime, name, build_model):
    """--embed-only: embed every split of --data (a processed folder, a hub-layout folder, a folder of photos or a
    hub name; a dataset without splits is one split named 'all') with a trained run, writing the same files as
    training, at the size the model was trained at."""
    model, state = load_trained(args.checkpoint, name, build_model, runtime.device)
    args = argparse.Namespace(**{**vars(args), "image_size": state["image_size"]})
    if model.channels_last:
        model.to(memory_format=torch.channels_last)
    splits = catalog_splits(args.data)
    label_ids = {label: i for i, label in enumerate(state["label_names"])}
    label_column = state.get("label_column", "articleType")
    for split, split_ds in list(splits.items()):
        if "label" not in split_ds.column_names and label_column in split_ds.column_names:
            splits[split] = split_ds.map(lambda b: {"label": [label_ids.get(v, -1) for v in b[label_column]]},
                                         batched=True, desc="labels")
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.output_dir) / "args.json", {**vars(args), "git_commit": git_commit()})
    print(f"--embed-only: writing to {args.output_dir}")
    factory = TrainedEmbedder(args.checkpoint, name, build_model, args.device, args.precision,
                              args.eval_batch_size) if args.engine == "ray" else None
    precision = embed_splits(model, splits, args.output_dir, args, runtime, ray_factory=factory)
    print(f"embedded {', '.join(f'{s} ({len(d)})' for s, d in splits.items())} in {precision} -> "
          f"{args.output_dir}/embeddings")
