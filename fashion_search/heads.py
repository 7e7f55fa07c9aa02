"""Classifier heads on the embedding."""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from fashion_search.config import ModelConfig


def add_head_args(parser: argparse.ArgumentParser):
    parser.add_argument("--head", choices=("linear", "cosine"), default=ModelConfig.head,
                        help="classifier on the embedding: linear, or cosine (normalised softmax: trains the cosine "
                             "geometry that retrieval ranks by, and class weights cannot grow with class frequency)")
    parser.add_argument("--cosine-scale", type=float, default=ModelConfig.cosine_scale,
                        help="--head cosine: logits = scale * cosine (a temperature of 1/scale)")


class CosineHead(nn.Module):
    """Normalised-softmax classifier (Zhai & Wu 2019, "Classification is a strong baseline for deep metric
    learning"): logits = scale * cos(embedding, class weight). The unit-norm class weights also remove a linear head's
    bias towards frequent classes, whose weights grow larger (Kang et al. 2020)."""

    def __init__(self, feature_dim: int, num_classes: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, feature_dim) * feature_dim ** -0.5)
        self.scale = scale

    def forward(self, features):  # [B, D] -> logits [B, classes], in float32 (small, and exact softmax)
        return self.scale * F.normalize(features.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).T


def classifier_head(model: ModelConfig, feature_dim: int, num_classes: int, bias: bool = True) -> nn.Module:
    if model.head == "cosine":
        return CosineHead(feature_dim, num_classes, model.cosine_scale)
    return nn.Linear(feature_dim, num_classes, bias=bias)
