"""ResNet-50 fine-tuned as an article-type classifier; the pooled 2048-d feature before the new head (batch-normalised,
BNNeck) is the retrieval embedding.

Usage: python resnet.py [--from-scratch --image-size 64] [--output-dir runs/resnet]
"""
import argparse
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from fashion_search import backbones, heads, pipeline
from fashion_search.config import Config
from fashion_search.errors import cli


@dataclass(frozen=True)
class Options:
    label_smoothing: float = 0.1
    bn_neck: bool = True


def parse_config(argv=None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    pipeline.add_common_args(parser, image_size=224, batch_size=64, lr=3e-4, epochs=10)
    backbones.add_resnet_args(parser)
    heads.add_head_args(parser)
    parser.add_argument("--label-smoothing", type=float, default=Options.label_smoothing, help="softer targets: better-spread embeddings")
    parser.add_argument("--no-bn-neck", dest="bn_neck", action="store_false",
                        help="embed the raw pooled feature instead of its batch-normalised version (BNNeck)")
    return pipeline.parse(parser, argv, "resnet", Options)


class ResNetClassifier(backbones.ResNetModel):
    def __init__(self, backbone, feature_dim, head, bn_neck=True):
        super().__init__()
        self.backbone = backbone
        # BNNeck (Luo et al. 2019): pooled ReLU features are all positive, so their cosine similarities bunch up
        # near 1; batch-normalising them (no learnt shift) centres them, which suits cosine retrieval.
        self.neck = nn.BatchNorm1d(feature_dim) if bn_neck else nn.Identity()
        if bn_neck:
            self.neck.bias.requires_grad_(False)
        self.head = head

    def embed(self, images):  # [B, 3, S, S] -> [B, 2048]
        return self.neck(self.backbone(images))

    def forward(self, images):  # -> logits [B, classes]
        return self.head(self.embed(images))


def build_model(config: Config, num_classes, backbone_config=None):
    backbone, feature_dim, saved = backbones.resnet_backbone(config.model, backbone_config)
    bn_neck = config.options.bn_neck
    head = heads.classifier_head(config.model, feature_dim, num_classes, bias=not bn_neck)
    return ResNetClassifier(backbone, feature_dim, head, bn_neck), saved


def main(argv=None):
    config, runtime = pipeline.prepare(parse_config(argv))
    if config.run.embed_only:
        return pipeline.embed_only(config, runtime, build_model)
    smoothing = config.options.label_smoothing

    def loss_fn(model, images, labels, rows):
        return F.cross_entropy(model(images).float(), labels, label_smoothing=smoothing)

    return pipeline.train_and_export(config, runtime, build_model, loss_fn)


def command():  # fashion-resnet, python resnet.py
    cli(main)


if __name__ == "__main__":
    command()
