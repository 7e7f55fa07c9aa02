"""Batch transforms on the training device: uint8 -> normalised float, and the augmentation."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize(images_uint8: torch.Tensor, mean, std, device, channels_last=False) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> normalised float [B, 3, S, S] on ``device`` (the copy travels as uint8: 4x less, from
    pinned memory to a GPU, so that it overlaps the work queued before it)."""
    device = torch.device(device)
    if device.type == "cuda" and images_uint8.device.type == "cpu" and not images_uint8.is_pinned():
        images_uint8 = images_uint8.pin_memory()
    images = images_uint8.to(device, non_blocking=True).float().div_(255)
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=device).view(1, 3, 1, 1)
    images = (images - mean) / std
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def augment_draws(rows: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, 4] uniform draws, one set per training row for an epoch: a row's augmentation then depends only on
    (seed, epoch, row), not on the batch or the process it lands in (data-parallel training shards every batch)."""
    return torch.rand(rows, 4, generator=generator)


def augment(images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Random horizontal flip and random zoom-in (scale 0.8-1) with shift, on a float batch [B, 3, S, S] with the
    batch rows' draws [B, 4], in one grid_sample so that it runs on the training device."""
    batch = images.shape[0]
    rand = draws.to(images.device)
    scale = 0.8 + 0.2 * rand[:, 0]
    flip = torch.where(rand[:, 1] < 0.5, -1.0, 1.0)
    shift_x = (rand[:, 2] * 2 - 1) * (1 - scale)
    shift_y = (rand[:, 3] * 2 - 1) * (1 - scale)
    theta = torch.zeros(batch, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
    theta[:, 0, 2], theta[:, 1, 2] = shift_x, shift_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
