"""A model script's configuration, parsed once from its flags into frozen dataclasses: what data, which model, how
to train, where and how to run, plus the script's own options (its loss, its head). The package takes these configs
or plain values; args.json and every checkpoint hold ``Config.to_dict()`` and a resumed or re-embedded run reads it
back through ``Config.from_dict``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# How a batch job (the embeddings of every split, a catalog build) runs the model: "by-size" picks eager for a
# small job, an Inductor graph for a big one and an int8 graph for a very big one on a CPU with int8 units
# (fashion_search.embed.job_graph says where the lines are); the others force one.
GRAPHS = ("by-size", "eager", "compiled", "int8")


def _flag(name: str, **kwargs):
    """A field whose command-line flag has another name (--data fills DataConfig.path)."""
    return field(metadata={"flag": name}, **kwargs)


@dataclass(frozen=True)
class DataConfig:
    path: str = _flag("data", default="data/processed")
    image_size: int = 224
    limit: int | None = None  # at most this many rows per split
    cache_dir: str = "data/cache"


@dataclass(frozen=True)
class ModelConfig:
    weights: str | None = _flag("model", default=None)  # local pretrained weights instead of the hub's
    from_scratch: bool = False
    tiny: bool = False
    arch: str | None = None  # the ResNet scripts' backbone (--arch); None where a script has no choice
    head: str = "linear"
    cosine_scale: float = 16.0

    @property
    def random_init(self) -> bool:
        """No pretrained weights: from scratch, or the tiny test configuration."""
        return self.from_scratch or self.tiny


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup: float = 0.05
    grad_clip: float = 1.0
    max_steps: int | None = None
    time_budget: float | None = None  # minutes
    seed: int = 0
    resume: bool = False


@dataclass(frozen=True)
class RunConfig:
    output_dir: str | None = None
    device: str = "auto"
    precision: str = "auto"
    graph: str = "by-size"
    eval_batch_size: int | None = None
    embed_only: bool = False
    checkpoint: str | None = None
    engine: str = "local"
    ray_actors: int = 2
    world_size: int = 1


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "run": RunConfig}


@dataclass(frozen=True)
class Config:
    script: str
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    run: RunConfig
    options: object = None  # the script's own frozen dataclass (None when it has none)

    @classmethod
    def from_flags(cls, script: str, flags: dict, options_type=None) -> "Config":
        """Sort parsed flags (``vars(parser.parse_args())``) into the sections; what no section names belongs to the
        script's options, and a flag nothing takes is an error (a typo in a script's parser)."""
        flags = dict(flags)
        sections = {name: _take(section, flags) for name, section in SECTIONS.items()}
        options = _take(options_type, flags) if options_type else None
        if flags:
            raise TypeError(f"{script}: flags no config takes: {', '.join(sorted(flags))}")
        return cls(script, options=options, **sections)

    @classmethod
    def from_dict(cls, record: dict, options_type=None) -> "Config":
        """Read back what to_dict wrote (args.json, a checkpoint's "config"). Fields added since default."""
        def build(kind, values):
            names = {f.name for f in dataclasses.fields(kind)}
            return kind(**{k: v for k, v in (values or {}).items() if k in names})

        return cls(record["script"], options=build(options_type, record.get("options")) if options_type else None,
                   **{name: build(kind, record.get(name)) for name, kind in SECTIONS.items()})

    def to_dict(self) -> dict:
        record = {"script": self.script}
        for name in (*SECTIONS, "options"):
            value = getattr(self, name)
            record[name] = dataclasses.asdict(value) if value is not None else None
        return record

    def replace(self, **sections) -> "Config":
        """A copy with fields of sections replaced: config.replace(run={"device": "cuda:0"})."""
        changed = {name: dataclasses.replace(getattr(self, name), **values) for name, values in sections.items()}
        return dataclasses.replace(self, **changed)


def _take(kind, flags: dict):
    values = {}
    for f in dataclasses.fields(kind):
        key = f.metadata.get("flag", f.name)
        if key in flags:
            values[f.name] = flags.pop(key)
    return kind(**values)
