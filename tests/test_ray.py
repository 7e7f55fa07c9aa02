"""--engine ray: a local Ray cluster with 2 CPUs and 2 model actors, in a loopback-only network namespace, writes the
files the local loop writes."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import child_env, loopback_namespace
from fashion_search.files import REPO_DIR

pytestmark = pytest.mark.slow  # child processes that start clusters or process groups


def test_ray_actors_embed_what_the_local_loop_does(trained_runs, hub_dataset, cache_dir, tmp_path):
    pytest.importorskip("ray")
    from fashion_search.cli import resnet

    common = ["--embed-only", "--checkpoint", str(trained_runs["resnet"]), "--data", str(hub_dataset), "--limit",
              "32", "--device", "cpu", "--cache-dir", str(cache_dir)]
    resnet.main([*common, "--output-dir", str(tmp_path / "local")])
    command = [sys.executable, "resnet.py", *common, "--output-dir", str(tmp_path / "ray"), "--engine", "ray",
               "--ray-actors", "2"]
    done = subprocess.run(loopback_namespace(command), cwd=REPO_DIR, env=child_env(), capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    local, ray = (np.load(tmp_path / name / "embeddings" / "all.npy") for name in ("local", "ray"))
    assert local.shape == ray.shape == (32, local.shape[1]) and ray.dtype == np.float32
    assert np.abs(local - ray).max() < 1e-5
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "local" / "embeddings" / "all.parquet"),
                                  pd.read_parquet(tmp_path / "ray" / "embeddings" / "all.parquet"))


CATALOG_BUILD = """
import sys
from pathlib import Path
import numpy as np
from fashion_search.data import catalog_splits
from fashion_search.serving.catalog import embed_dataset
from fashion_search.serving.encoder import Encoder

encoder = Encoder(sys.argv[1], "cpu", int8=False)
splits = catalog_splits(sys.argv[2])
chunks = Path(sys.argv[3]) / "catalog-chunks"
local, local_meta = embed_dataset(splits, encoder, sys.argv[3], chunks)
ray, ray_meta = embed_dataset(splits, encoder, sys.argv[3], chunks, ray_actors=2)
assert local.shape == ray.shape and local_meta.equals(ray_meta), (local.shape, ray.shape)
print("max difference", float(np.abs(local - ray).max()))
"""


def test_the_apps_catalog_build_on_ray_equals_the_local_one(clip_run, hub_dataset, cache_dir):
    """app.py --dataset ... --engine ray: the catalog embedded by Ray actors (the dataset's undecodable row skipped
    as locally) equals the local loop's."""
    pytest.importorskip("ray")
    command = [sys.executable, "-c", CATALOG_BUILD, str(clip_run / "hf_model"), str(hub_dataset),
               str(cache_dir)]
    done = subprocess.run(loopback_namespace(command), cwd=REPO_DIR, env=child_env(), capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert float(done.stdout.split("max difference")[1]) < 1e-5
