"""CLIP ViT-B/32 fine-tuned on product photos: a classifier head on the image embeddings (as in the original),
plus an optional image-text contrastive term pairing each photo with its productDisplayName through CLIP's
text tower, which keeps the text tower aligned so that the app can answer text queries.

Usage: python clip.py [--from-scratch --image-size 64] [--output-dir runs/clip]
"""
import argparse
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from fashion_search import backbones, distributed, heads, pipeline
from fashion_search.config import Config, ModelConfig
from fashion_search.data import SPLITS, load_processed
from fashion_search.errors import cli
from fashion_search.files import atomic_folder, atomic_save_npy
from fashion_search.model import EmbeddingModel
from fashion_search.runtime import positive_int



@dataclass(frozen=True)
class Options:
    text_loss_weight: float = 0.5
    max_text_length: int = 77


def parse_config(argv=None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    pipeline.add_common_args(parser, image_size=224, batch_size=64, lr=1e-5, epochs=5)
    parser.add_argument("--text-loss-weight", type=float, default=Options.text_loss_weight,
                        help="weight of the image-text contrastive term (0 disables; >0 keeps text search working)")
    parser.add_argument("--max-text-length", type=positive_int, default=Options.max_text_length)
    heads.add_head_args(parser)
    return pipeline.parse(parser, argv, "clip", Options)


class CLIPClassifier(EmbeddingModel):
    mean, std = backbones.CLIP_MEAN, backbones.CLIP_STD

    def __init__(self, clip, head):
        super().__init__()
        self.clip = clip
        self.head = head

    def embed(self, images):  # [B, 3, S, S] -> [B, projection_dim]
        return backbones.clip_image_features(self.clip, images)


def scratch_config(image_size: int, tiny: bool, max_text_length: int):
    """The ViT-B/32 family scaled to a CPU budget: a coarse patch grid as in ViT-B/32 (7x7 at 224 px; patch 16 gives
    4x4 at 64 px), ViT-Tiny width (192, 3 heads, 6 layers) and a 2-layer text tower (product names are short)."""
    from transformers import CLIPConfig

    patch = 16 if image_size < 160 else 32
    width, layers, heads, text_layers = (32, 1, 2, 1) if tiny else (192, 6, 3, 2)
    tokenizer = backbones.char_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=text_layers,
                num_attention_heads=heads, max_position_embeddings=max_text_length,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(image_size=image_size, patch_size=patch, hidden_size=width, intermediate_size=4 * width,
                  num_hidden_layers=layers, num_attention_heads=heads)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=width).to_dict()


def build_model(config: Config, num_classes, backbone_config=None):
    from transformers import CLIPConfig, CLIPModel

    if backbone_config is None and config.model.random_init:
        backbone_config = scratch_config(config.data.image_size, config.model.tiny, config.options.max_text_length)
    if backbone_config is not None:
        clip = CLIPModel(CLIPConfig.from_dict(backbone_config))
    else:
        clip = backbones.load_pretrained(CLIPModel.from_pretrained, config.model.weights or backbones.CLIP_HUB_MODEL,
                                         "CLIP model")
    head = heads.classifier_head(config.model, clip.config.projection_dim, num_classes)
    return CLIPClassifier(clip, head), clip.config.to_dict()


def load_tokenizer(model: ModelConfig):
    from transformers import CLIPTokenizer

    if model.random_init:
        return backbones.char_tokenizer()
    return backbones.load_pretrained(CLIPTokenizer.from_pretrained, model.weights or backbones.CLIP_HUB_MODEL,
                                     "CLIP tokenizer")


def text_tower_record(model: ModelConfig, text_loss_weight: float) -> dict:
    """Whether the exported text tower can answer text queries: it can when it was pretrained or trained with the
    image-text term; a from-scratch text tower trained without it is random."""
    if text_loss_weight > 0 or not model.random_init:
        return {"usable": True, "why": ""}
    return {"usable": False, "why": "this model's text tower was trained from scratch without the image-text term "
                                    "(--text-loss-weight 0), so it cannot match text to photos; retrain clip.py with "
                                    "--text-loss-weight > 0 to search by text"}


def export(model, tokenizer, image_size, folder, text_tower: dict):
    """A standard save_pretrained folder (model, tokenizer, image processor) that the app loads, with text_tower.json
    saying whether text search works. Inputs are padded to a white square before the processor's resize, as in
    training."""
    from transformers import CLIPImageProcessor
    from transformers.utils import logging

    logging.disable_progress_bar()  # a one-shard save needs no progress bar in the run's log
    with atomic_folder(folder) as partial:  # the app never loads a half-written model
        model.clip.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        CLIPImageProcessor(size={"height": image_size, "width": image_size}, do_center_crop=False,
                           image_mean=list(model.mean), image_std=list(model.std)).save_pretrained(partial)
        (partial / "text_tower.json").write_text(json.dumps(text_tower))


def name_tokens(tokenizer, names, max_length):
    """Product names tokenized: input_ids and attention_mask [N, L]. Names end with the article type ("Turtle Check
    Men Navy Blue Shirt"), so long ones are cut from the left."""
    tokenizer.truncation_side = "left"
    return tokenizer([name or "" for name in names], padding="max_length", truncation=True, max_length=max_length,
                     return_tensors="pt")


def train_name_tokens(config: Config, tokenizer):
    """The productDisplayName of every training row, tokenized."""
    dataset, _ = load_processed(config.data.path)
    names = dataset["train"]["productDisplayName"][:config.data.limit or None]
    return name_tokens(tokenizer, names, config.options.max_text_length)


@torch.inference_mode()
def export_text_embeddings(model, tokenizer, run_dir, max_text_length: int, runtime, batch_size=256):
    """embeddings/text_<split>.npy: each product's name through the text tower, L2-normalised and row-aligned with
    <split>.parquet, for evaluation's text-to-image protocol."""
    model.eval()
    for split in SPLITS:
        names = pd.read_parquet(run_dir / "embeddings" / f"{split}.parquet", columns=["productDisplayName"])
        tokens = name_tokens(tokenizer, names["productDisplayName"].tolist(), max_text_length)
        chunks = []
        for start in range(0, len(names), batch_size):
            with runtime.autocast():
                features = backbones.clip_text_features(
                    model.clip, tokens["input_ids"][start:start + batch_size].to(runtime.device),
                    tokens["attention_mask"][start:start + batch_size].to(runtime.device))
            chunks.append(F.normalize(features.float(), dim=1).cpu())
        atomic_save_npy(run_dir / "embeddings" / f"text_{split}.npy", torch.cat(chunks).numpy().astype(np.float32))


def main(argv=None):
    config, runtime = pipeline.prepare(parse_config(argv))
    if config.run.embed_only:
        return pipeline.embed_only(config, runtime, build_model)
    weight = config.options.text_loss_weight
    tokenizer = load_tokenizer(config.model)
    tokens = train_name_tokens(config, tokenizer) if weight > 0 else None  # only the text term reads them

    def loss_fn(model, images, labels, rows):
        image_embeddings = model.embed(images)
        loss = F.cross_entropy(model.head(image_embeddings).float(), labels)
        if weight > 0:  # over the global batch under torchrun
            text_embeddings = backbones.clip_text_features(model.clip, tokens["input_ids"][rows].to(images.device),
                                                           tokens["attention_mask"][rows].to(images.device))
            image_side = F.normalize(distributed.gather(image_embeddings).float(), dim=1)
            text_side = F.normalize(distributed.gather(text_embeddings).float(), dim=1)
            logits = model.clip.logit_scale.exp() * image_side @ text_side.T  # [B, B], matching pairs on the diagonal
            targets = torch.arange(len(logits), device=images.device)
            loss = loss + weight * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        return loss

    def export_all(model, run_dir):
        text_tower = text_tower_record(config.model, weight)
        export(model, tokenizer, config.data.image_size, run_dir / "hf_model", text_tower)
        if text_tower["usable"]:
            export_text_embeddings(model, tokenizer, run_dir, config.options.max_text_length, runtime)

    return pipeline.train_and_export(config, runtime, build_model, loss_fn, export=export_all)


def command():  # fashion-clip, python clip.py
    cli(main)


if __name__ == "__main__":
    command()
