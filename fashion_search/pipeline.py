"""The story every model script tells, written once: its shared flags, then either train -> export embeddings ->
metrics, or --embed-only with a trained run."""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from fashion_search import checkpoint, distributed
from fashion_search.config import GRAPHS, SECTIONS, Config, DataConfig, RunConfig, TrainConfig
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
    add("--data", default=DataConfig.path, help="processed dataset from data_preparation.py (with --embed-only: "
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
    add("--weight-decay", type=float, default=TrainConfig.weight_decay)
    add("--warmup", type=float, default=TrainConfig.warmup, help="fraction of steps with linear warmup")
    add("--grad-clip", type=float, default=TrainConfig.grad_clip, help="max gradient norm (0 disables)")
    add("--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps")
    add("--time-budget", type=float, default=None, metavar="MINUTES",
        help="wall-time budget for training + validation: the LR schedule follows whichever of steps or time runs "
             "out first, and training stops in time for a last validation (fair comparisons on a shared CPU)")
    add("--limit", type=positive_int, default=None, help="use at most this many rows per split (quick runs)")
    add("--seed", type=int, default=TrainConfig.seed)
    add_device_arg(parser)
    add("--precision", choices=("auto", "bf16", "fp16", "fp32"), default=RunConfig.precision,
        help="autocast dtype; auto = bf16 on CUDA and on CPUs with native bf16, else fp32")
    add("--graph", choices=GRAPHS, default=RunConfig.graph, help="how the embeddings job runs the model: by-size = eager "
        "for a small job, an Inductor graph for a big one, an int8 graph for a very big one on a CPU with int8 units "
        "(checked against the model first); eager, compiled or int8 force one")
    add("--cache-dir", default=DataConfig.cache_dir, help="decoded-image cache (uint8 .npy per split and size)")
    add("--resume", action="store_true", help="continue an interrupted run from <output-dir>/last.pt")
    add("--embed-only", action="store_true", help="embed --data with the trained run --checkpoint, no training")
    add("--checkpoint", default=None, help="with --embed-only: the trained run folder")
    add("--eval-batch-size", type=positive_int, default=None, help=f"photos per forward pass when embedding "
        f"(default: {EMBED_BATCH} on a CPU, {GPU_EMBED_BATCH} on a GPU)")
    add("--engine", choices=("local", "ray"), default=RunConfig.engine, help="with --embed-only: embed in this process "
        "(local), or on a Ray cluster (RAY_ADDRESS, else a local one) with a pool of model actors")
    add("--ray-actors", type=positive_int, default=2, help="--engine ray: model actors (one GPU each on GPUs)")


def parse(parser: argparse.ArgumentParser, argv, script: str, options_type=None) -> Config:
    """The script's flags, parsed once into its Config (options_type: the script's own frozen dataclass)."""
    return Config.from_flags(script, vars(parser.parse_args(argv)), options_type)


def validate(config: Config) -> Config:
    """Check the flags against each other; the config with the output folder filled in."""
    run, data = config.run, config.data
    if run.embed_only and not run.checkpoint:
        raise UserError("--embed-only needs --checkpoint RUN_DIR (a trained run folder)")
    output_dir = run.output_dir
    if run.embed_only and output_dir is None:  # beside the trained run, never inside it
        output_dir = f"{str(run.checkpoint).rstrip('/')}-embed-{dataset_name(data.path)}"
    output_dir = output_dir or f"runs/{config.script}"
    if run.embed_only and Path(output_dir).resolve() == Path(run.checkpoint).resolve():
        raise UserError(f"--output-dir {output_dir} is the trained run itself: --embed-only writes elsewhere "
                        f"(leave --output-dir out to write beside it)")
    if config.train.lr <= 0:
        raise UserError(f"--lr must be positive, got {config.train.lr}")
    if config.model.weights and not Path(config.model.weights).exists():
        raise UserError(f"--model {config.model.weights}: no such file or folder")
    return config.replace(run={"output_dir": output_dir})


def prepare(config: Config) -> tuple[Config, Runtime]:
    """Validate the config, join the torchrun world if there is one, seed, and resolve where and in what precision
    to compute: (the config with the defaults that depend on others filled in, the runtime)."""
    config = validate(config)
    run = config.run
    world = distributed.start(run.device) if not run.embed_only else distributed.world()
    device = run.device
    if world.size > 1:
        if device != "cpu" and torch.cuda.is_available():
            device = f"cuda:{world.local_rank}"
        if world.main:
            print(f"{config.script}: data-parallel training on {world.size} processes "
                  f"({torch.distributed.get_backend()}), global batch {config.train.batch_size}")
    set_seed(config.train.seed)  # the same on every rank: identical initial weights
    runtime = Runtime.create(device, run.precision)
    config = config.replace(run={"world_size": world.size, "device": device,
                                 "eval_batch_size": run.eval_batch_size or embed_batch_size(runtime.device)})
    return config, runtime


def train_and_export(config: Config, runtime: Runtime, build_model, loss_fn, make_sampler=None, export=None):
    """The shared part of every model script: data -> model -> fit -> embeddings of every split -> metrics.

    build_model(config, num_classes, backbone_config=None) -> (model, backbone_config) builds the model
    (pretrained, from scratch or tiny); the backbone_config it returns is stored in best.pt so that
    --embed-only can rebuild the architecture without a download."""
    name, data, train = config.script, config.data, config.train
    dataset, label_map = load_processed(data.path)
    main = distributed.world().main
    run = Run(config.run.output_dir, config.to_dict(), resume=train.resume, write=main)
    num_classes = len(label_map["labels"])
    model, backbone_config = build_model(config, num_classes)
    train_rows, _, _ = split_rows(dataset["train"], data)
    val_rows, _, _ = split_rows(dataset["val"], data)
    sampler = (make_sampler or (lambda rows: ShuffledBatches(len(rows), train.batch_size, train.seed)))(train_rows)
    started = time.perf_counter()
    extra = {"script": name, "config": config.to_dict(), "backbone_config": backbone_config,
             "label_names": list(label_map["labels"]), "label_column": label_map["label_column"],
             "image_size": data.image_size}
    state = fit(model, loss_fn, train_rows, val_rows, sampler, run, train, config.run.eval_batch_size, runtime,
                extra, fingerprint=training_fingerprint(config))
    train_seconds = time.perf_counter() - started
    distributed.finish()
    if not main:  # rank 0 embeds, evaluates and writes the rest
        return None
    precision = embed_splits(model, {s: dataset[s] for s in SPLITS}, run.dir, data, config.run, runtime)
    if export:
        export(model, run.dir)
    metrics = evaluate_run(run.dir)
    metrics["calibration_test"] = calibrate_run(run.dir)  # writes calibration.json (fitted on val)
    metrics.update({"model": name, "best_epoch": state["epoch"] + 1, "train_seconds": round(train_seconds, 1),
                    "from_scratch": config.model.random_init, "image_size": data.image_size,
                    "embedding_precision": precision})
    atomic_write_json(run.dir / "metrics.json", metrics)
    print(f"{name}: " + " ".join(f"{k} {metrics[k]:.4f}" for k in HEADLINE_KEYS)
          + f" ({metrics['protocol']}, {metrics['num_queries']} queries) -> {run.dir}")
    return metrics


def training_fingerprint(config: Config) -> dict:
    """What must match for --resume to continue the same run: everything but where and how it runs, and resume."""
    record = config.to_dict()
    record.pop("run")
    record["train"] = {k: v for k, v in record["train"].items() if k != "resume"}
    return record


def saved_config(state: dict, options_type=None) -> Config:
    """The Config a checkpoint was trained with. Checkpoints from before configs hold the flat flags ("args")."""
    if "config" in state:
        return Config.from_dict(state["config"], options_type)
    flags = dict(state["args"])
    known = {f.metadata.get("flag", f.name) for kind in SECTIONS.values() for f in dataclasses.fields(kind)}
    if options_type:
        known |= {f.name for f in dataclasses.fields(options_type)}
    return Config.from_flags(state["script"], {k: v for k, v in flags.items() if k in known}, options_type)


def load_trained(run_dir, name, build_model, device, options_type=None):
    """Rebuild a trained model from <run_dir>/best.pt without any download: (model, checkpoint state)."""
    path = Path(run_dir) / "best.pt"
    if not path.exists():
        raise UserError(f"--checkpoint {run_dir}: no best.pt there (is it a finished training run?)")
    state = checkpoint.load(path)
    if state.get("script") != name:
        raise UserError(f"--checkpoint {run_dir} was trained by {state.get('script')}.py, not {name}.py")
    model, _ = build_model(saved_config(state, options_type), len(state["label_names"]), state["backbone_config"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise UserError(f"{path} does not match the architecture {state.get('script')} builds: {str(exc)[:300]}")
    return model.to(device), state


class TrainedEmbedder:
    """A picklable recipe for a trained run's embedding function, built where it runs (a Ray actor): it loads
    best.pt there rather than shipping the model."""

    def __init__(self, config: Config, build_model):
        self.config, self.build_model = config, build_model

    def __call__(self):
        from fashion_search.inference import embed_images

        run = self.config.run
        runtime = Runtime.create(run.device, run.precision)
        model, _ = load_trained(run.checkpoint, self.config.script, self.build_model, runtime.device,
                                options_type(self.config))
        if model.channels_last:  # as embed_only prepares it for the local loop
            model.to(memory_format=torch.channels_last)
        model = model.for_inference()
        return lambda images: embed_images(model, images, runtime.device, runtime.dtype, run.eval_batch_size,
                                           progress=False)


def options_type(config: Config):
    return type(config.options) if config.options is not None else None


def embed_only(config: Config, runtime: Runtime, build_model):
    """--embed-only: embed every split of --data (a processed folder, a hub-layout folder, a folder of photos or a
    hub name; a dataset without splits is one split named 'all') with a trained run, writing the same files as
    training, at the size the model was trained at."""
    run = config.run
    model, state = load_trained(run.checkpoint, config.script, build_model, runtime.device, options_type(config))
    config = config.replace(data={"image_size": state["image_size"]})
    if model.channels_last:
        model.to(memory_format=torch.channels_last)
    splits = catalog_splits(config.data.path)
    label_ids = {label: i for i, label in enumerate(state["label_names"])}
    label_column = state.get("label_column", "articleType")
    for split, split_ds in list(splits.items()):
        if "label" not in split_ds.column_names and label_column in split_ds.column_names:
            splits[split] = split_ds.map(lambda b: {"label": [label_ids.get(v, -1) for v in b[label_column]]},
                                         batched=True, desc="labels")
    output_dir = Path(run.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output_dir / "args.json", {**config.to_dict(), "git_commit": git_commit()})
    print(f"--embed-only: writing to {output_dir}")
    factory = TrainedEmbedder(config, build_model) if run.engine == "ray" else None
    precision = embed_splits(model, splits, output_dir, config.data, run, runtime, ray_factory=factory)
    print(f"embedded {', '.join(f'{s} ({len(d)})' for s, d in splits.items())} in {precision} -> "
          f"{output_dir}/embeddings")
