"""Runtime state, kept apart from the arguments: the seed, the device, and the precision to compute in (bf16
autocast where the hardware has it), with the CPU features that decide it."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import random
from pathlib import Path

import numpy as np
import torch

from fashion_search.errors import UserError


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


def add_device_arg(parser):
    """--device, as every command takes it."""
    parser.add_argument("--device", type=device_arg, default="auto",
                        help="where the model runs: auto (cuda where a GPU is, else cpu), cpu, cuda or cuda:N")


def positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def decode_threads(beside=None) -> int:
    """Threads to decode photos in (Pillow decodes without the GIL): every core up to 16 with nothing else to run;
    beside a model on a GPU, every core but the one that feeds it; beside a model on the CPU, one (the model needs
    the cores: the thread only overlaps decoding with it)."""
    cores = min(16, os.cpu_count() or 1)
    if beside is None:
        return cores
    return max(1, cores - 1) if torch.device(beside).type == "cuda" else 1


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
    """Autocast to ``dtype`` (None: fp32, no autocast), without autocast's cache of cast weights. The cache is one
    mutex for the process: a thread leaving autocast clears it holding that mutex and waits for the GIL to free the
    cached tensors, while a thread tracing a graph (the app compiles its query path beside live queries) holds the
    GIL and waits for the mutex, and the whole server stops. Our models use each weight once per forward pass: the
    cache saved no casts."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=False)


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Where and in what precision a script computes, resolved once from --device and --precision."""
    device: torch.device
    dtype: torch.dtype | None  # the autocast dtype; None: fp32

    @classmethod
    def create(cls, device: str = "auto", precision: str = "auto") -> "Runtime":
        resolved = resolve_device(device)
        return cls(resolved, autocast_dtype(resolved, precision))

    def autocast(self):
        return autocast(self.device, self.dtype)

    @property
    def precision_name(self) -> str:
        """bfloat16, float16 or float32: what metrics.json records."""
        return str(self.dtype or torch.float32).removeprefix("torch.")
