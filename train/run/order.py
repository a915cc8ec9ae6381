"""The order in which a trainer reads its training rows, the same for every trainer.

Each epoch is a permutation of the rows drawn from (seed, epoch) alone, cut into global batches of
``num_processes * batch_size``; process r takes the r-th slice of each, so processes see disjoint
shards. The position (epoch, micro-batch in the epoch) goes into the checkpoint, so a resumed run
reads exactly what the stopped one would have read next. ``BucketOrder`` does the same for rows in
aspect-ratio buckets, every micro-batch from one bucket.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np


class DataOrder:
    """Which cache rows each process reads at (epoch, micro-batch i)."""

    def __init__(self, rows: np.ndarray, batch_size: int, num_processes: int, rank: int, seed: int):
        self.rows, self.batch_size, self.world, self.rank, self.seed = np.asarray(rows), batch_size, num_processes, rank, seed
        self.batches_per_epoch = len(self.rows) // (batch_size * num_processes)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{len(self.rows)} training images are fewer than one global batch "
                f"(train.batch_size={batch_size} x {num_processes} processes); lower train.batch_size"
            )

    def batch(self, epoch: int, i: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.rows)
        start = (i * self.world + self.rank) * self.batch_size
        return perm[start : start + self.batch_size]


class BucketOrder:
    """``DataOrder`` for rows in aspect-ratio buckets (``train.data.buckets``): every micro-batch holds
    rows of one bucket, and process r reads the r-th slice of each global batch, as in ``DataOrder``.

    Epoch e, a pure function of (seed, e): bucket k's rows are permuted by ``default_rng([seed, e, k])``
    and cut into global batches of ``num_processes * batch_size``; what is left, m rows, makes one
    smaller global batch of ``m // num_processes`` rows per process (as sd-scripts keeps a bucket's last,
    smaller batch), so a bucket with fewer images than a batch still trains, in batches of its own;
    the ``m % num_processes`` rows still left wait for another epoch's permutation. The global batches
    of all buckets are then shuffled by ``default_rng([seed, e])``. Each micro-batch's loss is a mean over
    its rows, so a small bucket's images weigh more per image than a full bucket's.
    """

    def __init__(self, groups: Sequence[np.ndarray], batch_size: int, num_processes: int, rank: int, seed: int):
        self.groups = [np.asarray(g) for g in groups]  # per bucket, its training rows
        self.batch_size, self.world, self.rank, self.seed = batch_size, num_processes, rank, seed
        per_process = []  # per global batch: (bucket, first row in its permutation, rows per process)
        for k, g in enumerate(self.groups):
            full, rest = divmod(len(g), batch_size * num_processes)
            per_process += [(k, j * batch_size * num_processes, batch_size) for j in range(full)]
            if rest >= num_processes:
                per_process.append((k, full * batch_size * num_processes, rest // num_processes))
        self._batches = per_process
        self.batches_per_epoch = len(per_process)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{sum(len(g) for g in self.groups)} training images are fewer than one per process "
                             f"in every bucket ({num_processes} processes); add images or use fewer processes")

    @functools.lru_cache(maxsize=2)
    def _epoch(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        perms = [np.random.default_rng([self.seed, epoch, k]).permutation(g) for k, g in enumerate(self.groups)]
        return perms, np.random.default_rng([self.seed, epoch]).permutation(self.batches_per_epoch)

    def batch(self, epoch: int, i: int) -> np.ndarray:
        perms, shuffled = self._epoch(epoch)
        k, start, n = self._batches[shuffled[i]]
        start += self.rank * n
        return perms[k][start : start + n]
