"""The Stable Diffusion VAE encoder (stabilityai/sd-vae-ft-mse, diffusers AutoencoderKL) fine-tuned with a classifier
on its latents. The posterior mean [B, 4, S/8, S/8] is average-pooled to a 4x4 grid and projected to the embedding;
the decoder is dropped (not needed to embed). It is by far the slowest backbone per image: its first stage runs
128 channels at full resolution, so the default input is 128 px and training uses bf16 autocast where available.

Usage: python vae.py [--from-scratch --image-size 64] [--output-dir runs/vae]
"""
import argparse
from dataclasses import dataclass
from functools import partial

import torch.nn.functional as F
from torch import nn

from fashion_search import backbones, heads, pipeline
from fashion_search.config import Config
from fashion_search.errors import cli
from fashion_search.model import EmbeddingModel
from fashion_search.runtime import positive_int

HUB_MODEL = "stabilityai/sd-vae-ft-mse"


@dataclass(frozen=True)
class Options:
    embedding_dim: int = 256
    width_divisor: int = 4


def parse_config(argv=None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    pipeline.add_common_args(parser, image_size=128, batch_size=32, lr=1e-4, epochs=5)
    parser.add_argument("--embedding-dim", type=positive_int, default=Options.embedding_dim)
    parser.add_argument("--width-divisor", type=positive_int, default=Options.width_divisor,
                        help="--from-scratch only: divide the SD-VAE channel widths by this to fit a CPU budget")
    heads.add_head_args(parser)
    return pipeline.parse(parser, argv, "vae", Options)


class VAEClassifier(EmbeddingModel):
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # the VAE expects pixels in [-1, 1]
    # Big CPU jobs stay bf16: its int8 encoder was no faster than the bf16 graph (BENCHMARKS.md, section 1)
    int8_worthwhile = False

    def __init__(self, vae, head, embedding_dim, grid=4):
        super().__init__()
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv
        self.latent_channels = vae.config.latent_channels
        flat = self.latent_channels * grid * grid
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.project = nn.Sequential(nn.Flatten(), nn.LayerNorm(flat), nn.Linear(flat, embedding_dim), nn.GELU(),
                                     nn.Linear(embedding_dim, embedding_dim))
        self.head = head

    def embed(self, images):  # [B, 3, S, S] -> [B, embedding_dim]
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        latent_mean = moments[:, :self.latent_channels]  # posterior mean [B, 4, S/8, S/8]
        return self.project(self.pool(latent_mean.float()))


def scratch_config(tiny: bool, width_divisor: int):
    """SD-VAE's architecture (4 down blocks, 2 layers each, 4 latent channels), channel widths divided."""
    widths = (8, 16) if tiny else tuple(max(8, c // width_divisor) for c in (128, 256, 512, 512))
    return dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1 if tiny else 2,
                block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * len(widths),
                up_block_types=("UpDecoderBlock2D",) * len(widths), norm_num_groups=8)


def build_model(config: Config, num_classes, backbone_config=None):
    from diffusers import AutoencoderKL

    if backbone_config is None and config.model.random_init:
        backbone_config = scratch_config(config.model.tiny, config.options.width_divisor)
    if backbone_config is not None:
        vae = AutoencoderKL.from_config(backbone_config)
    else:
        # low_cpu_mem_usage=False: load into initialised weights, which needs no accelerate (a few seconds more)
        load = partial(AutoencoderKL.from_pretrained, low_cpu_mem_usage=False)
        vae = backbones.load_pretrained(load, config.model.weights or HUB_MODEL, "VAE")
    saved = dict(vae.config)
    dim = config.options.embedding_dim
    model = VAEClassifier(vae, heads.classifier_head(config.model, dim, num_classes), dim)
    del vae  # the decoder goes with it
    return model, saved


def main(argv=None):
    config, runtime = pipeline.prepare(parse_config(argv))
    if config.run.embed_only:
        return pipeline.embed_only(config, runtime, build_model)

    def loss_fn(model, images, labels, rows):
        return F.cross_entropy(model.head(model.embed(images)).float(), labels, label_smoothing=0.1)

    return pipeline.train_and_export(config, runtime, build_model, loss_fn)


def command():  # fashion-vae, python vae.py
    cli(main)


if __name__ == "__main__":
    command()
