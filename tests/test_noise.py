"""Noise from seeds: the stream is pinned to what earlier versions generated, and compiling keeps it."""

import hashlib

import torch

from loomcfm_core.noise import compiled, counters, noise_from_seeds, noise_words, normals

SEEDS = torch.tensor([0, 1, -7, 2**62, 123456789])


def test_noise_is_the_stream_earlier_versions_generated():
    """Checkpoints hold seeds, not noise: a seed must mean the same noise in every version. The hash was taken
    from the implementation before this module existed (``loomcfm_core.coupling.noise_from_seeds`` at 5b55e53)."""
    x = noise_from_seeds(SEEDS, (3, 5, 5))
    assert hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16] == "fb9dcf9f58db361b"
    assert x[0, 0, 0, :3].tolist() == [0.3707163333892822, -0.2091512531042099, 2.6261141300201416]


def test_compiled_noise_has_the_same_integers_and_equal_normals():
    """What CUDA runs (``torch.compile`` of the same functions), compiled here for the CPU: the integer stream
    must be bit-identical and the normals equal to float32 rounding of log/cos/sin."""
    seeds = torch.cat([SEEDS, torch.randint(-(2**63), 2**63 - 1, (60,), generator=torch.Generator().manual_seed(0))])
    steps = counters(38, "cpu")
    assert torch.equal(compiled(noise_words)(seeds, steps), noise_words(seeds, steps))
    eager = normals(seeds, steps, 75)
    fused = compiled(normals)(seeds, steps, 75)
    assert fused.shape == eager.shape == (65, 75)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
