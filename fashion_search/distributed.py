"""Data-parallel training under torchrun (DistributedDataParallel: NCCL on GPUs, gloo on CPUs). Without torchrun
the world is one process and every helper here is a no-op.

What a process of a world of N does: it takes its contiguous 1/N of every global batch (the batch order still
depends only on the seed and the epoch), computes the loss on it, and DDP averages the gradients, so the update is
that of the whole global batch. Contrastive terms first gather the embeddings of every rank, with gradients
(``gather``), so their pairs span the global batch. Rank 0 alone writes files.

BatchNorm: on GPUs the layers become SyncBatchNorm, whose statistics span the global batch; on CPUs (gloo) each rank
normalises its own shard, as DDP does by default, with rank 0's running statistics kept.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


_world = World()


def world() -> World:
    return _world


def start(device: str) -> World:
    """Join the process group torchrun describes in the environment (a no-op without torchrun). Returns the world,
    which ``world()`` also gives from then on."""
    global _world
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 or dist.is_initialized():
        return _world
    cuda = device != "cpu" and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    _world = World(dist.get_rank(), dist.get_world_size(), local_rank)
    return _world


def finish():
    global _world
    if dist.is_initialized():
        dist.destroy_process_group()
    _world = World()


def shard(batch: list[int]) -> list[int]:
    """This rank's contiguous part of a global batch (a class-balanced batch of P classes x K stays class-balanced on
    every rank when N divides P)."""
    if _world.size == 1:
        return batch
    bounds = np.linspace(0, len(batch), _world.size + 1).astype(int)
    return batch[bounds[_world.rank]:bounds[_world.rank + 1]]


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """[b, ...] per rank -> [B, ...] of the global batch, in rank order, with gradients flowing back to each rank's
    own part (every rank computes the same global loss: the backward sums its N copies and DDP's average divides them
    again, so the update is exact)."""
    if _world.size == 1:
        return tensor
    import torch.distributed.nn.functional as distributed_nn

    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(_world.size)]
    dist.all_gather(sizes, torch.tensor([len(tensor)], device=tensor.device))
    longest = int(max(size.item() for size in sizes))
    padded = torch.cat([tensor, tensor.new_zeros((longest - len(tensor), *tensor.shape[1:]))])
    parts = distributed_nn.all_gather(padded)
    return torch.cat([part[:int(size.item())] for part, size in zip(parts, sizes)])


def broadcast(value: float) -> float:
    """Rank 0's value on every rank (decisions that must agree: the time budget, the validation score)."""
    if _world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def total(*values: float) -> list[float]:
    """Each value summed over the ranks."""
    if _world.size == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier():
    if _world.size > 1:
        dist.barrier()


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module as DistributedDataParallel in a world of several processes, else as it is."""
    if _world.size == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    # static_graph: every step runs the same graph, which lets a model hold weights its loss never uses (CLIP's text
    # tower without the text term) without searching the graph for them on every step
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   static_graph=True)


def replicas_identical(model: torch.nn.Module) -> bool:
    """Whether every rank holds exactly the same weights (checked at the end of training)."""
    if _world.size == 1:
        return True
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu()
    copies = [torch.zeros_like(checksum) for _ in range(_world.size)]
    dist.all_gather(copies, checksum)
    return all(torch.equal(copies[0], copy) for copy in copies[1:])
