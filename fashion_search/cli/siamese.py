"""Siamese (twin) ResNet-50: one shared backbone and a projection head trained with a margin contrastive loss
on every positive and negative pair inside class-balanced batches (P classes x K images), no pair list.

Usage: python siamese.py [--from-scratch --image-size 64] [--output-dir runs/siamese]
"""
import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fashion_search import backbones, distributed, pipeline
from fashion_search.config import Config
from fashion_search.errors import cli
from fashion_search.runtime import positive_int
from fashion_search.samplers import ClassBalancedBatches


@dataclass(frozen=True)
class Options:
    classes_per_batch: int = 16
    per_class: int = 4
    margin: float = 1.0
    embedding_dim: int = 128


def parse_config(argv=None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    pipeline.add_common_args(parser, image_size=224, batch_size=64, lr=3e-4, epochs=10)
    backbones.add_resnet_args(parser)
    parser.add_argument("--classes-per-batch", type=positive_int, default=Options.classes_per_batch,
                        help="P: classes in each batch (batch size = P x K; --batch-size is ignored)")
    parser.add_argument("--per-class", type=positive_int, default=Options.per_class, help="K: images per class in a batch")
    parser.add_argument("--margin", type=float, default=Options.margin,
                        help="negatives closer than this (Euclidean, unit sphere: 0..2) are pushed apart")
    parser.add_argument("--embedding-dim", type=positive_int, default=Options.embedding_dim)
    return pipeline.parse(parser, argv, "siamese", Options)


class SiameseNet(backbones.ResNetModel):
    def __init__(self, backbone, feature_dim, embedding_dim):
        super().__init__()
        self.backbone = backbone
        self.projection = nn.Sequential(nn.Linear(feature_dim, 512), nn.ReLU(inplace=True),
                                        nn.Linear(512, embedding_dim))

    def embed(self, images):  # [B, 3, S, S] -> [B, embedding_dim], unit length
        return F.normalize(self.projection(self.backbone(images)).float(), dim=1)


def contrastive_loss(embeddings, labels, margin):
    """Hadsell et al. 2006 over all pairs (i < j) of the batch: positives d^2, negatives max(0, margin - d)^2.
    Positives are averaged over all positive pairs; negatives over the *active* ones (closer than the margin), as
    pytorch-metric-learning's AvgNonZeroReducer does: random unit vectors in 128-d lie ~1.41 apart, beyond the
    margin, so averaging over every negative would shrink their gradient towards zero as training succeeds."""
    distance = torch.cdist(embeddings, embeddings).clamp_min(1e-9)  # [B, B]
    same = labels[:, None] == labels[None, :]
    upper = torch.ones_like(same).triu(diagonal=1)
    positive, negative = same & upper, ~same & upper
    pos_loss = distance[positive].pow(2).mean() if positive.any() else distance.sum() * 0
    neg_terms = F.relu(margin - distance[negative]).pow(2)
    active = neg_terms > 0
    neg_loss = neg_terms[active].mean() if active.any() else distance.sum() * 0
    return pos_loss + neg_loss


def build_model(config: Config, num_classes, backbone_config=None):
    backbone, feature_dim, saved = backbones.resnet_backbone(config.model, backbone_config)
    return SiameseNet(backbone, feature_dim, config.options.embedding_dim), saved


def main(argv=None):
    config, runtime = pipeline.prepare(parse_config(argv))
    if config.run.embed_only:
        return pipeline.embed_only(config, runtime, build_model)
    options = config.options

    def loss_fn(model, images, labels, rows):  # pairs span the global batch under torchrun
        return contrastive_loss(distributed.gather(model.embed(images)), distributed.gather(labels), options.margin)

    def sampler(train_rows):
        return ClassBalancedBatches(train_rows.labels, options.classes_per_batch, options.per_class,
                                    config.train.seed)

    return pipeline.train_and_export(config, runtime, build_model, loss_fn, make_sampler=sampler)


def command():  # fashion-siamese, python siamese.py
    cli(main)


if __name__ == "__main__":
    command()
