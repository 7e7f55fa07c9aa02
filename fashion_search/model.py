"""The model interface, written once: what the shared code (training, embedding, acceleration, serving) asks of a
model script's network, and of the app's query encoder."""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Embedder(Protocol):
    """Anything that embeds photos: a model script's network (EmbeddingModel) or the app's CLIP encoder."""
    mean: tuple[float, float, float]  # per-channel input normalisation
    std: tuple[float, float, float]
    channels_last: bool  # its inputs' memory format (convolutions run faster channels-last)
    int8_worthwhile: bool  # whether a very big CPU job may embed through an int8 graph of it

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] normalised pixels -> [B, D] (normalised to unit length by the caller)."""

    def eval(self): ...

    def float_embed_module(self) -> nn.Module:
        """embed() as an fp32 module that owns its weights, for torch.export (the int8 quantizer)."""


class EmbeddingModel(nn.Module):
    """Base class of every model script's network: subclasses set mean / std and define embed(); the script's loss
    may use anything else they hold (a classifier head, a text tower)."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channels_last = False
    int8_worthwhile = True

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def for_inference(self) -> nn.Module:
        """The network to embed with after training: itself, or an equivalent faster copy (ResNets fold BatchNorm)."""
        return self

    def float_embed_module(self) -> nn.Module:
        import copy

        return _EmbedModule(copy.deepcopy(self).float())


class _EmbedModule(nn.Module):
    """``model.embed`` as the forward of a module that owns the model, as torch.export needs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.embed(images)
