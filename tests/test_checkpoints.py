"""Checkpoints execute nothing: tensors and plain values only, a crafted pickle refused in one line, old files
re-exported only on request."""
import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fashion_search import checkpoint
from fashion_search.errors import UserError


class CreatesAFile:
    """Unpickling this object opens (creates) ``marker``: the smallest proof that a pickle ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_trained_checkpoints_hold_only_tensors_and_plain_values(trained_runs):
    for name, run in trained_runs.items():
        for file in ("best.pt", "last.pt"):
            state = torch.load(run / file, weights_only=True)  # raises on anything else
            assert isinstance(state["model"], dict) and state["epoch"] >= 0, (name, file)


def test_a_crafted_checkpoint_is_refused_in_one_line_and_runs_nothing(trained_runs, processed, tmp_path):
    from fashion_search.cli import resnet

    run = tmp_path / "someone-elses-run"
    shutil.copytree(trained_runs["resnet"], run)
    marker = tmp_path / "pwned"
    state = torch.load(run / "best.pt", weights_only=True)
    state["payload"] = CreatesAFile(marker)
    torch.save(state, run / "best.pt")
    with pytest.raises(UserError) as refused:
        resnet.main(["--embed-only", "--checkpoint", str(run), "--data", str(processed), "--device", "cpu",
                     "--output-dir", str(tmp_path / "out")])
    message = str(refused.value)
    assert str(run / "best.pt") in message and "\n" not in message and checkpoint.REEXPORT in message
    assert not marker.exists()
    # --resume reads last.pt through the same loader
    state["payload"] = CreatesAFile(marker)
    torch.save(state, run / "last.pt")
    with pytest.raises(UserError, match="last.pt is refused"):
        checkpoint.load(run / "last.pt")
    assert not marker.exists()


def test_an_old_checkpoint_is_re_exported_on_request_and_then_loads_safely(tmp_path):

    path = tmp_path / "best.pt"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1, data=Path("data/x")),
                "val_precision@5": np.float64(0.5)}, path)  # what older versions pickled
    with pytest.raises(UserError, match="re-export"):
        checkpoint.load(path)
    with pytest.raises(SystemExit):  # --trust is required: loading with the unsafe loader is the user's call
        checkpoint.main([str(path)])
    checkpoint.main(["--trust", str(path)])
    state = checkpoint.load(path)
    assert state["args"] == {"lr": 0.1, "data": "data/x"} and type(state["val_precision@5"]) is float
    assert torch.equal(state["model"]["w"], torch.ones(2))
