"""The order in which a trainer reads its training rows, the same for every trainer.

Each epoch is a permutation of the rows drawn from (seed, epoch) alone, cut into global batches of
``num_processes * batch_size``; process r takes the r-th slice of each, so processes see disjoint
shards. The position (epoch, micro-batch in the epoch) goes into the checkpoint, so a resumed run
reads exactly what the stopped one would have read next.
"""

from __future__ import annotations

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
