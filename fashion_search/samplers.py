"""Batch orders that depend only on (seed, epoch), so that a resumed run sees the batches an uninterrupted one
would: shuffled, or class-balanced for metric learning."""
from __future__ import annotations

import math

import numpy as np
import torch

from fashion_search import distributed
from fashion_search.errors import UserError


def _identity(batch):
    return batch


class ShuffledBatches:
    """Seeded batches of a shuffled permutation; the order depends only on (seed, epoch), so a resumed
    run sees exactly the batches an uninterrupted one would."""

    def __init__(self, num_rows: int, batch_size: int, seed: int, drop_last: bool = True):
        self.num_rows, self.batch_size, self.seed, self.drop_last, self.epoch = num_rows, batch_size, seed, drop_last, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        if self.drop_last and self.num_rows >= self.batch_size:
            return self.num_rows // self.batch_size
        return math.ceil(self.num_rows / self.batch_size)

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)
        for i in range(len(self)):
            yield order[i * self.batch_size:(i + 1) * self.batch_size].tolist()


class ClassBalancedBatches(ShuffledBatches):
    """P classes x K images per batch (metric learning): every batch holds positive pairs for every anchor.
    Classes with fewer than K rows are sampled with replacement; classes with one row are never drawn."""

    def __init__(self, labels, classes_per_batch: int, per_class: int, seed: int):
        labels = np.asarray(labels)
        self.by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        self.by_class = [rows for rows in self.by_class if len(rows) >= 2]
        if not self.by_class:
            raise UserError("class-balanced batches need at least one class with two rows")
        self.classes_per_batch = min(classes_per_batch, len(self.by_class))
        self.per_class = per_class
        super().__init__(len(labels), self.classes_per_batch * per_class, seed)

    def __len__(self):
        return max(1, self.num_rows // self.batch_size)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        for _ in range(len(self)):
            chosen = rng.choice(len(self.by_class), self.classes_per_batch, replace=False)
            batch = [rng.choice(self.by_class[c], self.per_class, replace=len(self.by_class[c]) < self.per_class)
                     for c in chosen]
            yield np.concatenate(batch).tolist()


class RankShard:
    """This process's part of every global batch of ``batches`` (fashion_search.distributed.shard): each rank reads
    a disjoint shard, and the global order still depends only on the seed and the epoch."""

    def __init__(self, batches):
        self.batches = batches

    def set_epoch(self, epoch: int):
        self.batches.set_epoch(epoch)

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            yield distributed.shard(batch)


def batches(dataset, batch_sampler) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=_identity, num_workers=0)
