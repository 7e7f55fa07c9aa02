"""Each model script end to end on the fixture with a tiny configuration; the pretrained-loading paths through a
tiny model saved to a folder; --embed-only; --resume; offline errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_args
from fashion_search import accel, backbones, embed, heads, pipeline, runtime
from fashion_search.cli import clip, resnet, siamese, vae
from fashion_search.config import Config, ModelConfig
from fashion_search.errors import UserError
from fashion_search.inference import embed_images
from fashion_search.runs import Run

REPO = Path(__file__).resolve().parents[1]
MODULES = {"resnet": resnet, "siamese": siamese, "clip": clip, "vae": vae}


@pytest.mark.parametrize("name", list(MODULES))
def test_run_folder_is_complete(trained_runs, name):
    run = trained_runs[name]
    for file in ("args.json", "best.pt", "last.pt", "log.jsonl", "metrics.json"):
        assert (run / file).exists(), file
    record = json.loads((run / "args.json").read_text())
    assert "git_commit" in record and record["model"]["tiny"] is True and record["script"] == name
    # args.json is the run's config: read back through the same dataclasses, it is the config that trained it
    config = Config.from_dict(record, MODULES[name].Options)
    assert config.to_dict() == {k: v for k, v in record.items() if k not in ("git_commit", "command")}
    assert config.run.output_dir == str(run) and config.data.path == record["data"]["path"]
    assert len((run / "log.jsonl").read_text().splitlines()) == 2  # one line per epoch
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("precision@5", "recall@5", "accuracy@5", "precision@1", "map@r", "macro_precision@5"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["num_queries"] > 0 and metrics["protocol"].startswith("query/gallery")
    expected = str(runtime.autocast_dtype(torch.device("cpu")) or torch.float32).removeprefix("torch.")
    assert metrics["embedding_precision"] == expected  # a tiny job: eager, in the autocast dtype (not int8)
    for split in ("train", "val", "test"):
        embeddings = np.load(run / "embeddings" / f"{split}.npy")
        meta = pd.read_parquet(run / "embeddings" / f"{split}.parquet")
        assert embeddings.dtype == np.float32 and embeddings.ndim == 2 and len(embeddings) == len(meta)
        np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-4)
        for column in ("id", "label", "articleType", "gender", "masterCategory", "baseColour", "productDisplayName"):
            assert column in meta.columns
    if name == "clip":
        assert (run / "hf_model" / "config.json").exists() and (run / "hf_model" / "tokenizer_config.json").exists()


@pytest.mark.parametrize("name", ["resnet", "siamese", "clip", "vae"])
def test_training_learns_something(trained_runs, name):
    """Each model, not only the best, beats chance by a clear margin. Chance precision@5 of the query/gallery
    protocol is the probability that a gallery item shares a query's class: sum over classes of the two shares
    (about 0.2 on the fixture); the class-coded shapes are easy to learn."""
    run = trained_runs[name]
    queries, gallery = (pd.read_parquet(run / "embeddings" / f"{split}.parquet")["label"] for split in ("test", "train"))
    shares = gallery.value_counts(normalize=True)
    chance = float(sum(share * shares.get(label, 0.0) for label, share in queries.value_counts(normalize=True).items()))
    assert json.loads((run / "metrics.json").read_text())["precision@5"] > chance + 0.15


@pytest.mark.parametrize("name", list(MODULES))
def test_embed_only_reproduces_training_embeddings(trained_runs, processed, cache_dir, tmp_path, name):
    out = tmp_path / "embedded"
    MODULES[name].main(["--embed-only", "--checkpoint", str(trained_runs[name]), "--data", str(processed),
                        "--output-dir", str(out), "--cache-dir", str(cache_dir), "--device", "cpu"])
    for split in ("train", "test"):
        np.testing.assert_allclose(np.load(out / "embeddings" / f"{split}.npy"),
                                   np.load(trained_runs[name] / "embeddings" / f"{split}.npy"), atol=2e-2)
        assert (pd.read_parquet(out / "embeddings" / f"{split}.parquet")["id"]
                == pd.read_parquet(trained_runs[name] / "embeddings" / f"{split}.parquet")["id"]).all()


def test_cosine_head_is_scaled_cosine_and_survives_the_checkpoint(trained_runs):
    head = heads.CosineHead(4, 3, scale=16.0)
    features = torch.randn(5, 4)
    expected = np.array([[16.0 * f @ w / (np.linalg.norm(f) * np.linalg.norm(w)) for w in head.weight.detach().numpy()]
                         for f in features.numpy()])
    np.testing.assert_allclose(head(features).detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head(3 * features), head(features))  # the embedding's norm does not matter
    # the tiny vae run was trained with --head cosine: its checkpoint rebuilds that head
    model, _ = pipeline.load_trained(trained_runs["vae"], "vae", vae.build_model, torch.device("cpu"), vae.Options)
    assert isinstance(model.head, heads.CosineHead)
    assert isinstance(heads.classifier_head(ModelConfig(), 4, 3), torch.nn.Linear)  # the default head


def test_embed_only_on_a_hub_layout_folder_is_one_split_all(trained_runs, hub_dataset, cache_dir, tmp_path):
    out = tmp_path / "catalog"
    resnet.main(["--embed-only", "--checkpoint", str(trained_runs["resnet"]), "--data", str(hub_dataset),
                 "--output-dir", str(out), "--cache-dir", str(cache_dir), "--device", "cpu"])
    meta = pd.read_parquet(out / "embeddings" / "all.parquet")
    embeddings = np.load(out / "embeddings" / "all.npy")
    assert len(meta) == len(embeddings) == 69  # 70 rows, the undecodable one skipped
    assert (meta.loc[meta.articleType == "Ties", "label"] == -1).all()  # a class the run never saw


def test_embed_only_refuses_another_scripts_run(trained_runs, processed, tmp_path):
    with pytest.raises(UserError, match="trained by resnet.py"):
        clip.main(["--embed-only", "--checkpoint", str(trained_runs["resnet"]), "--data", str(processed),
                   "--output-dir", str(tmp_path / "x"), "--device", "cpu"])


def test_pretrained_paths_load_local_folders(processed, cache_dir, tmp_path):
    """The code path the hub name takes (from_pretrained / a torchvision state_dict), fed a local folder."""
    import torchvision
    from diffusers import AutoencoderKL
    from transformers import CLIPConfig, CLIPModel

    clip_dir = tmp_path / "clip-local"
    CLIPModel(CLIPConfig.from_dict(clip.scratch_config(32, True, 77))).save_pretrained(clip_dir)
    backbones.char_tokenizer().save_pretrained(clip_dir)
    clip.main(["--model", str(clip_dir), "--data", str(processed), "--output-dir", str(tmp_path / "clip"),
               "--cache-dir", str(cache_dir), "--image-size", "32", "--max-steps", "2", "--device", "cpu"])
    assert (tmp_path / "clip" / "metrics.json").exists()

    vae_dir = tmp_path / "vae-local"
    AutoencoderKL.from_config(vae.scratch_config(tiny=True, width_divisor=4)).save_pretrained(vae_dir)
    vae.main(["--model", str(vae_dir), "--data", str(processed), "--output-dir", str(tmp_path / "vae"),
              "--cache-dir", str(cache_dir), "--image-size", "32", "--max-steps", "2", "--device", "cpu"])
    assert (tmp_path / "vae" / "metrics.json").exists()

    state_file = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), state_file)
    backbone, dim, config = backbones.resnet_backbone(resnet.parse_config(["--model", str(state_file)]).model)
    assert dim == 2048 and config == {"arch": "resnet50"}
    with pytest.raises(UserError, match="not a torchvision resnet50 state_dict"):
        torch.save({"bogus": torch.zeros(1)}, tmp_path / "bad.pth")
        backbones.resnet_backbone(resnet.parse_config(["--model", str(tmp_path / "bad.pth")]).model)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    backbone, dim, config = backbones.resnet_backbone(
        siamese.parse_config(["--arch", "resnet18", "--model", str(tmp_path / "resnet18.pth")]).model)
    assert dim == 512 and config == {"arch": "resnet18"}
    with pytest.raises(UserError, match="not a torchvision resnet50"):  # the wrong depth for --arch
        backbones.resnet_backbone(resnet.parse_config(["--model", str(tmp_path / "resnet18.pth")]).model)


@pytest.mark.parametrize("script", ["resnet.py", "clip.py", "vae.py", "siamese.py"])
def test_offline_without_local_weights_is_one_clear_line(processed, tmp_path, script):
    result = subprocess.run([sys.executable, script, "--data", str(processed), "--output-dir", str(tmp_path / "r"),
                             "--cache-dir", str(tmp_path / "c"), "--device", "cpu"], cwd=REPO, capture_output=True,
                            text=True, timeout=300,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "--model" in last and "--from-scratch" in last


def test_bad_arguments_are_argparse_errors(processed, tmp_path):
    for argv in (["--device", "tpu"], ["--batch-size", "-3"], ["--image-size", "0"]):
        with pytest.raises(SystemExit) as exc:
            resnet.parse_config(argv)
        assert exc.value.code == 2
    with pytest.raises(UserError, match="not a processed dataset"):
        resnet.main(["--tiny", "--data", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "r")])


def test_resume_finishes_like_an_uninterrupted_run(processed, cache_dir, tmp_path, monkeypatch):
    full = tmp_path / "full"
    resnet.main(tiny_args(processed, full, cache_dir, "--epochs", "3"))
    interrupted = tmp_path / "interrupted"
    original_log = Run.log
    calls = {"n": 0}

    def crash_after_first_epoch(self, record):
        original_log(self, record)
        calls["n"] += 1
        if calls["n"] == 2:  # epoch 2 logged, its last.pt not yet written: the state of a kill mid-epoch 2
            raise KeyboardInterrupt

    monkeypatch.setattr(Run, "log", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        resnet.main(tiny_args(processed, interrupted, cache_dir, "--epochs", "3"))
    monkeypatch.setattr(Run, "log", original_log)
    assert torch.load(interrupted / "last.pt", weights_only=True)["epoch"] == 0
    resnet.main(tiny_args(processed, interrupted, cache_dir, "--epochs", "3", "--resume"))
    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((interrupted / "metrics.json").read_text())
    for key in ("precision@5", "map@r"):
        assert b[key] == pytest.approx(a[key], abs=1e-6)
    np.testing.assert_allclose(np.load(interrupted / "embeddings" / "test.npy"),
                               np.load(full / "embeddings" / "test.npy"), atol=1e-5)
    with pytest.raises(UserError, match="other arguments"):
        resnet.main(tiny_args(processed, interrupted, cache_dir, "--epochs", "4", "--resume"))


def test_device_and_autocast_selection(monkeypatch):
    assert runtime.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert runtime.autocast_dtype(torch.device("cpu"), "fp32") is None
    assert runtime.autocast_dtype(torch.device("cpu"), "bf16") is torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: False)
    assert runtime.autocast_dtype(torch.device("cpu")) is None  # no native bf16: fp32 is faster
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)
    assert runtime.autocast_dtype(torch.device("cpu")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert runtime.autocast_dtype(torch.device("cuda")) is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert runtime.autocast_dtype(torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA device"):
        runtime.resolve_device("cuda:0")


def test_contrastive_loss_matches_a_pairwise_loop():
    """Positives: mean d^2 over all positive pairs; negatives: mean (margin - d)^2 over the negatives inside the
    margin only. Checked against a plain loop over pairs, with some negatives outside the margin."""
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(12, 8, generator=generator), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    margin = 1.3
    positives, negatives = [], []
    for i in range(12):
        for j in range(i + 1, 12):
            d = float((embeddings[i] - embeddings[j]).norm())
            if labels[i] == labels[j]:
                positives.append(d ** 2)
            elif d < margin:
                negatives.append((margin - d) ** 2)
    assert 0 < len(negatives) < 12 * 11 / 2 - len(positives)  # the margin splits the negatives
    expected = np.mean(positives) + np.mean(negatives)
    assert float(siamese.contrastive_loss(embeddings, labels, margin)) == pytest.approx(expected, rel=1e-5)


def test_folding_batchnorm_keeps_the_embeddings():
    """fold_batchnorm (used for every export) must compute the same function as the eval-mode model."""
    import torchvision

    torch.manual_seed(0)
    backbone = torchvision.models.resnet18()
    backbone.fc = torch.nn.Identity()
    for module in backbone.modules():  # non-trivial statistics, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    model = resnet.ResNetClassifier(backbone, 512, torch.nn.Linear(512, 3, bias=False)).eval()
    folded = accel.fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.backbone.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())  # the original is untouched
    images = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(folded.embed(images), model.embed(images), atol=1e-4, rtol=1e-4)


def tiny_resnet_classifier():
    import torchvision

    torch.manual_seed(0)
    backbone = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    backbone.fc = torch.nn.Identity()
    return accel.fold_batchnorm(resnet.ResNetClassifier(backbone, 512, torch.nn.Linear(512, 3, bias=False)).eval())


@pytest.mark.slow
def test_compiled_embedding_matches_eager_and_compiles_once():
    """A big export runs through CompiledEmbed: the same embeddings as eager, one graph for every batch and split
    (the last batch is padded), and nothing compiled left behind."""
    model = tiny_resnet_classifier()
    images = np.random.default_rng(0).integers(0, 255, (70, 3, 32, 32), dtype=np.uint8)
    cpu = torch.device("cpu")
    eager = embed_images(model, images, cpu, None, batch_size=32, progress=False)
    # A second graph would fall back to eager. (Not monkeypatch: undoing it deletes the setting from torch's config.)
    with torch._dynamo.config.patch(error_on_recompile=True), accel.CompiledEmbed(model) as compiled:
        first = embed_images(model, images, cpu, None, batch_size=32, progress=False, compiled=compiled)
        second = embed_images(model, images[:5], cpu, None, batch_size=32, progress=False, compiled=compiled)
        assert compiled.fn is not compiled.eager, "compiling failed (is there a C++ compiler?) or compiled twice"
    np.testing.assert_allclose(first, eager, atol=1e-4)
    np.testing.assert_allclose(second, eager[:5], atol=1e-4)
    assert first.shape == (70, 512)
    assert embed.worth_compiling(5_000, 224) and not embed.worth_compiling(8_121, 64)
    assert not embed.worth_compiling(100_000, 224, "cuda")  # eager at batches of hundreds: the compile would not pay


def test_gpu_jobs_take_batches_of_hundreds_and_decode_on_every_core_but_one(monkeypatch):
    from fashion_search import inference, runtime

    assert inference.embed_batch_size("cpu") == inference.EMBED_BATCH < inference.embed_batch_size("cuda")
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 16)
    assert (runtime.decode_threads(), runtime.decode_threads(beside="cuda"), runtime.decode_threads(beside="cpu")) \
        == (16, 15, 1)


def test_a_very_big_cpu_job_embeds_through_an_int8_graph_else_through_bf16(monkeypatch, capsys):
    """job_graph picks eager, a frozen bf16 graph or an int8 one by job size; the int8 graph covers a ResNet (whose
    shared ReLU modules fold_batchnorm splits for the quantizer) and stays close to the model; where quantising
    fails, the bf16 graph does the job. (Refusal by cosine: tests/test_app.py.)"""
    model = tiny_resnet_classifier()
    images = np.random.default_rng(2).integers(0, 255, (40, 3, 32, 32), dtype=np.uint8)
    cpu = torch.device("cpu")
    eager = embed_images(model, images, cpu, None, batch_size=16, progress=False)
    with embed.job_graph(model, [images], cpu, None, 16) as compiled:
        assert compiled is None  # 40 photos of 32 px: not worth compiling
    with embed.job_graph(model, [images], cpu, None, 16, "compiled") as compiled:  # --graph compiled: whatever the size
        assert isinstance(compiled, accel.CompiledEmbed)
    monkeypatch.setattr(embed, "COMPILE_FROM_224PX_IMAGES", 0)
    monkeypatch.setattr(accel, "INT8_FROM_224PX_IMAGES", 0)
    monkeypatch.setattr(accel, "cpu_supports_int8", lambda: True)
    assert accel.worth_int8(model, 40, 32, cpu) and not accel.worth_int8(model, 40, 32, torch.device("cuda"))
    assert not accel.worth_int8(vae.VAEClassifier, 40, 32, cpu)  # its int8 encoder was no faster: it stays bf16
    with embed.job_graph(model, [images[:30], images[30:]], cpu, None, 16) as compiled:
        assert not isinstance(compiled, accel.CompiledEmbed), "no int8 graph"
        quantized = np.concatenate([embed_images(model, part, cpu, None, 16, progress=False, compiled=compiled)
                                    for part in (images[:30], images[30:])])
    cosines = np.sum(quantized * eager, axis=1)
    assert np.all(cosines > accel.INT8_MIN_COSINE) and np.any(cosines < 0.99999), cosines  # int8: close, not equal
    assert "through an int8 graph" in capsys.readouterr().out
    with embed.job_graph(model, [images], cpu, None, 16, "compiled") as compiled:  # --graph compiled: never int8
        assert isinstance(compiled, accel.CompiledEmbed)
    with embed.job_graph(model, [images], cpu, None, 16, "eager") as compiled:  # --graph eager: whatever the size
        assert compiled is None
    with pytest.raises(ValueError, match="graph 'fast'"):
        with embed.job_graph(model, [images], cpu, None, 16, "fast"):
            pass

    def refused(*args):  # as torchao refused ResNets before fold_batchnorm split their ReLUs
        raise ValueError("Input partition has more than one output node")
    monkeypatch.setattr(accel, "quantize_int8", refused)
    with embed.job_graph(model, [images], cpu, None, 16) as compiled:
        assert isinstance(compiled, accel.CompiledEmbed)
    assert "int8 embedding skipped: ValueError" in capsys.readouterr().out


def test_compile_failure_falls_back_to_the_eager_model(monkeypatch, capsys):
    def broken(*args, **kwargs):
        def fail(batch):
            raise RuntimeError("no C++ compiler")
        return fail

    model = tiny_resnet_classifier()
    images = np.random.default_rng(1).integers(0, 255, (6, 3, 32, 32), dtype=np.uint8)
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch, "compile", broken)
    with accel.CompiledEmbed(model) as compiled:
        out = embed_images(model, images, cpu, None, batch_size=4, progress=False, compiled=compiled)
    np.testing.assert_allclose(out, embed_images(model, images, cpu, None, progress=False), atol=1e-6)
    assert capsys.readouterr().err.count("torch.compile failed") == 1  # said once, then eager for every batch


def test_time_budget_stops_training_and_finishes_the_schedule(processed, cache_dir, tmp_path, capsys):
    """--time-budget ends training early (well before --epochs) with the learning rate decayed to ~0, then
    exports as usual."""
    out = tmp_path / "budget"
    resnet.main(tiny_args(processed, out, cache_dir, "--epochs", "500", "--time-budget", "0.03"))
    assert "time budget of 0.03 min reached" in capsys.readouterr().out
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert 1 <= len(log) < 500
    assert log[-1]["lr"] < 0.05 * 1e-3  # the cosine schedule followed the clock to its end
    assert json.loads((out / "metrics.json").read_text())["train_seconds"] < 10


def test_evaluation_compares_runs_with_text_search_class_sizes_and_confidence(trained_runs, processed, cache_dir,
                                                                             tmp_path):
    from fashion_search.cli import evaluation

    table, plot = tmp_path / "comparison.md", tmp_path / "precision.png"
    assert evaluation.main([*(str(run) for run in trained_runs.values()), "--baseline", "pixels", "--data",
                            str(processed), "--cache-dir", str(cache_dir), "--output", str(table),
                            "--plot", str(plot)]) == 0
    text = table.read_text()
    for name in (*trained_runs, "pixels (baseline)"):
        assert f"| {name} |" in text
    assert "### text -> image" in text and "| clip |" in text.split("### text -> image")[1]
    assert "| chance |" in text and "### match confidence of clip" in text
    assert text.count("| gallery items per class |") == len(trained_runs) + 1  # one table per row, pixels too
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
