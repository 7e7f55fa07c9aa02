"""Checkpoints that execute nothing when loaded: tensors and plain values (str, int, float, bool, None, lists, dicts)
only, read with ``torch.load(weights_only=True)``. A checkpoint from elsewhere can hold a pickle that runs code;
such a file is refused, never loaded.

Re-export a checkpoint written by an older version (which pickled more than that), if you trust its source:
    python -m fashion_search.checkpoint --trust PATH [PATH ...]
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np
import torch

from fashion_search.errors import UserError, cli

REEXPORT = "python -m fashion_search.checkpoint --trust"


def plain(value):
    """``value`` with every container and scalar made a plain Python value that weights_only loading accepts:
    numpy scalars, paths, dtypes and argparse Namespaces are converted; tensors are kept."""
    if isinstance(value, np.generic):  # before float: np.float64 is a float subclass that pickles as numpy
        return value.item()
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {key if isinstance(key, (str, int)) else str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(item) for item in value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    raise TypeError(f"a checkpoint holds tensors and plain values only, not {type(value).__name__}")


def load(path, map_location="cpu") -> dict:
    """A checkpoint written by save(); UserError in one line for a file that needs the unsafe loader."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is many lines; the one naming the refused object is the useful one
        lines = [line.strip() for line in str(exc).splitlines() if "Unsupported" in line] or [type(exc).__name__]
        reason = lines[0].removeprefix("WeightsUnpickler error: ").split(" was not an allowed")[0][:160]
        raise UserError(f"{path} is refused: it holds Python objects beyond tensors and plain values, and loading "
                        f"those could run code ({reason}); if you trust its source, re-export it with: "
                        f"{REEXPORT} {path}") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise UserError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {str(exc)[:160]})") from None


def save(path, state: dict):
    """Write ``state`` (tensors and plain values, after plain()) atomically."""
    from fashion_search.files import atomic_torch_save

    atomic_torch_save(path, plain(state))


def reexport(path):
    """Load a trusted old checkpoint with the unsafe loader and write it back as plain values (atomically)."""
    save(path, torch.load(path, map_location="cpu", weights_only=False))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Re-export trusted checkpoints of older versions as tensors and "
                                                 "plain values, so that they load without running code.")
    parser.add_argument("paths", nargs="+", help="checkpoint files (best.pt, last.pt)")
    parser.add_argument("--trust", action="store_true", required=True,
                        help="loading these files once with the unsafe loader can run any code they hold: say that "
                             "you trust their source")
    for path in parser.parse_args(argv).paths:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such file")
        reexport(path)
        load(path)  # proves the new file loads safely
        print(f"re-exported {path}")


if __name__ == "__main__":
    cli(main)
