"""Siamese (twin) ResNet-50: one shared backbone and a projection head trained with a margin contrastive loss
on every positive and negative pair inside class-balanced batches (P classes x K images), no pair list.

Usage: python siamese.py [--from-scratch --image-size 64] [--output-dir runs/siamese]
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn

from fashion_search import backbones, distributed, pipeline
from fashion_search.errors import cli
from fashion_search.runtime import positive_int
from fashion_search.samplers import ClassBalancedBatches


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    pipeline.add_common_args(parser, image_size=224, batch_size=64, lr=3e-4, epochs=10)
    backbones.add_resnet_args(parser)
    parser.add_argument("--classes-per-batch", type=positive_int, default=16,
                        help="P: classes in each batch (batch size = P x K; --batch-size is ignored)")
    parser.add_argument("--per-class", type=positive_int, default=4, help="K: images per class in a batch")
    parser.add_argument("--margin", type=float, default=1.0,
                        help="negatives closer than this (Euclidean, unit sphere: 0..2) are pushed apart")
    parser.add_argument("--embedding-dim", type=positive_int, default=128)
    return parser.parse_args(argv)


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


def build_model(args, num_classes, backbone_config=None):
    backbone, feature_dim, config = backbones.resnet_backbone(args, backbone_config)
    return SiameseNet(backbone, feature_dim, args.embedding_dim), config


def main(argv=None):
    args = parse_args(argv)
    runtime = pipeline.prepare(args, "siamese")
    if args.embed_only:
        return pipeline.embed_only(args, runtime, "siamese", build_model)

    def loss_fn(model, images, labels, rows):  # pairs span the global batch under torchrun
        return contrastive_loss(distributed.gather(model.embed(images)), distributed.gather(labels), args.margin)

    def sampler(train_rows):
        return ClassBalancedBatches(train_rows.labels, args.classes_per_batch, args.per_class, args.seed)

    return pipeline.train_and_export(args, runtime, "siamese", build_model, loss_fn, make_sampler=sampler)


if __name__ == "__main__":
    cli(main)
