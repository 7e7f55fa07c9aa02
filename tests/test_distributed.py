"""Data-parallel training: torchrun with 2 CPU processes (gloo) in a loopback-only network namespace trains what one
process trains with the same global batch, and rank 0 alone writes."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import child_env, loopback_namespace, tiny_args
from fashion_search.files import REPO_DIR

pytestmark = pytest.mark.slow  # child processes that start clusters or process groups

# A model without BatchNorm (CLIP: LayerNorm only), so that 2 shards of 8 compute what one batch of 16 does; fp32,
# so that the only differences are the order of float sums. The image-text term gathers across ranks.
ARGS = ("--max-steps", "2", "--epochs", "1", "--precision", "fp32", "--text-loss-weight", "0.5", "--head", "cosine")
TOLERANCE = 1e-4


def torchrun(script, args, processes=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               script, *args]
    done = subprocess.run(loopback_namespace(command), cwd=REPO_DIR, env=child_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def weights(run):
    return torch.load(run / "best.pt", weights_only=True)["model"]


def test_two_processes_train_what_one_does_and_rank_0_alone_writes(processed, cache_dir, tmp_path):
    from fashion_search.cli import clip

    single, parallel = tmp_path / "single", tmp_path / "parallel"
    clip.main(tiny_args(processed, single, cache_dir, *ARGS))
    out = torchrun("clip.py", tiny_args(processed, parallel, cache_dir, *ARGS))
    assert "data-parallel training on 2 processes (gloo), global batch 16" in out
    assert out.count("epoch 1/1") == 1  # one summary line: rank 0's
    assert json.loads((parallel / "args.json").read_text())["run"]["world_size"] == 2
    assert json.loads((single / "args.json").read_text())["run"]["world_size"] == 1
    logs = [json.loads((run / "log.jsonl").read_text().splitlines()[0]) for run in (single, parallel)]
    assert logs[0]["step"] == logs[1]["step"] == 2
    assert logs[1]["train_loss"] == pytest.approx(logs[0]["train_loss"], rel=TOLERANCE)
    one, two = weights(single), weights(parallel)
    assert one.keys() == two.keys()
    worst = max((one[k].float() - two[k].float()).abs().max().item() for k in one)
    assert worst < TOLERANCE, f"weights differ by {worst}"
    # the parallel run's files are whole and the same set as the single run's (rank 1 wrote none of its own)
    assert sorted(p.name for p in parallel.iterdir()) == sorted(p.name for p in single.iterdir())


def test_resume_under_torchrun_and_class_balanced_shards(processed, cache_dir, tmp_path):
    """Siamese (class-balanced batches of 4 classes x 4, sharded 2 classes per rank; pairs gathered over the global
    batch) trains under torchrun, and --resume continues from last.pt on both ranks."""
    run = tmp_path / "siamese"
    args = tiny_args(processed, run, cache_dir, "--classes-per-batch", "4", "--per-class", "4", "--epochs", "2",
                     "--max-steps", "4")
    torchrun("siamese.py", args)
    first = (run / "metrics.json").read_text()
    again = torchrun("siamese.py", [*args, "--resume"])
    assert "resumed from" in again and "after epoch 2" in again
    assert len((run / "log.jsonl").read_text().splitlines()) == 2
    assert json.loads((run / "metrics.json").read_text())["precision@5"] == json.loads(first)["precision@5"]


def test_weights_the_loss_never_uses_do_not_stop_data_parallel_training(processed, cache_dir, tmp_path):
    """CLIP without the text term leaves its text tower and logit scale out of the loss: DDP still trains."""
    run = tmp_path / "clip-no-text"
    out = torchrun("clip.py", tiny_args(processed, run, cache_dir, "--max-steps", "2", "--epochs", "1",
                                        "--text-loss-weight", "0"))
    assert "data-parallel training on 2 processes" in out and (run / "metrics.json").exists()


def test_the_gpu_script_says_in_one_line_that_there_is_no_gpu():
    import shutil

    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi: the script would measure")
    done = subprocess.run(["bash", str(REPO_DIR / "benchmarks" / "gpu.sh")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == ["gpu.sh: no NVIDIA GPU here (nvidia-smi finds none): nothing to measure"]
