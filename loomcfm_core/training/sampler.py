"""The order training visits the data in: global batches shared by all ranks, each rank taking its slice."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from loomcfm_core.errors import UsageError


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Per epoch, a permutation of the images shared by all ranks, cut into global batches; each rank takes
    its slice.

    An epoch visits each of the N images once; with ``hflip`` each is flipped with probability 1/2, i.e.
    served as data point ``i + N`` (the paper's protocol: a flipped image is its own point, yet an epoch is
    N images). No point repeats within a global batch (LOOM writes each point's seed back once) and the
    last incomplete batch is dropped, so every rank runs the same number of equal-sized steps. The order is
    a function of (seed, epoch) alone, which makes a mid-epoch resume land on the same batches.
    """

    def __init__(self, num_images: int, local_batch: int, rank: int, world_size: int, seed: int,
                 hflip: bool = False) -> None:
        self.num_images, self.local_batch, self.rank, self.world_size = num_images, local_batch, rank, world_size
        self.seed, self.hflip = seed, hflip
        self.steps_per_epoch = num_images // (local_batch * world_size)
        if self.steps_per_epoch == 0:
            raise UsageError(f"train.batch_size={local_batch} x {world_size} workers exceeds the dataset's "
                             f"{num_images} images")
        self.epoch, self.skip = 0, 0

    def set_position(self, epoch: int, skip: int = 0) -> None:
        """Start the next iteration at ``epoch``, skipping its first ``skip`` global batches (a resume)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.steps_per_epoch - self.skip

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.num_images)
        if self.hflip:
            order = order + self.num_images * rng.integers(0, 2, self.num_images)
        global_batch = self.local_batch * self.world_size
        for step in range(self.skip, self.steps_per_epoch):
            start = step * global_batch + self.rank * self.local_batch
            yield order[start:start + self.local_batch].tolist()
