"""The global batch order: shared by all ranks, no repeats within a global batch, N images an epoch."""

import pytest

from loomcfm_core.training.sampler import GlobalBatchSampler


def test_global_batch_sampler_splits_without_repeats():
    ranks = [GlobalBatchSampler(23, 4, r, 3, seed=1) for r in range(3)]
    assert all(len(s) == 1 for s in ranks)
    for epoch in range(3):
        for s in ranks:
            s.set_position(epoch)
        batch = [i for s in ranks for b in s for i in b]
        assert len(batch) == len(set(batch)) == 12
    ranks[0].set_position(2, skip=1)
    assert list(ranks[0]) == []
    with pytest.raises(ValueError, match="exceeds the dataset"):
        GlobalBatchSampler(10, 4, 0, 3, seed=0)


def test_flips_keep_an_epoch_at_n_images():
    sampler = GlobalBatchSampler(1000, 100, 0, 1, seed=0, hflip=True)
    assert sampler.steps_per_epoch == 10
    epoch = [i for batch in sampler for i in batch]
    assert len(epoch) == 1000 and sorted(i % 1000 for i in epoch) == list(range(1000)), "each image once"
    flipped = sum(i >= 1000 for i in epoch)
    assert 400 < flipped < 600, "flipped with probability 1/2 (as point i + N)"
