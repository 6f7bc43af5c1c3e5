"""The flow-matching objective on the straight path, against values worked out by hand."""

import pytest
import torch

from loomcfm_core.flow import cfm_loss, interpolate, sample_t, target_velocity


def _pair():
    """Two samples of shape [1, 1, 2]: noise x0 and data x1."""
    x0 = torch.tensor([[[[0.0, 0.0]]], [[[1.0, 1.0]]]])
    x1 = torch.tensor([[[[1.0, 3.0]]], [[[1.0, -1.0]]]])
    return x0, x1


def test_interpolation_runs_from_noise_to_data():
    x0, x1 = _pair()
    torch.testing.assert_close(interpolate(x0, x1, torch.zeros(2)), x0)
    torch.testing.assert_close(interpolate(x0, x1, torch.ones(2)), x1)
    # per-sample t: sample 0 halfway, sample 1 a quarter of the way
    expected = torch.tensor([[[[0.5, 1.5]]], [[[1.0, 0.5]]]])
    torch.testing.assert_close(interpolate(x0, x1, torch.tensor([0.5, 0.25])), expected)
    torch.testing.assert_close(interpolate(x0, x1, torch.tensor([0.5, 0.25]), sigma=0.1, eps=torch.ones_like(x0)),
                               expected + 0.1)
    torch.testing.assert_close(target_velocity(x0, x1), torch.tensor([[[[1.0, 3.0]]], [[[0.0, -2.0]]]]))


def test_cfm_loss_equals_the_hand_computed_value():
    """With v(x, t) = x: sample 0 errs by (-0.5, -1.5) -> mean square 1.25, sample 1 by (1, 2.5) -> 3.625;
    the loss is the batch mean of the per-sample means, 2.4375 (a sum would be 9.75)."""
    x0, x1 = _pair()
    loss = cfm_loss(lambda x, t: x, x0, x1, torch.tensor([0.5, 0.25]))
    assert loss.item() == pytest.approx(2.4375)


def test_cfm_loss_is_zero_for_the_true_velocity_and_differentiable():
    x0, x1 = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    assert cfm_loss(lambda x, t: x1 - x0, x0, x1, sample_t(4, "cpu")).item() == pytest.approx(0.0, abs=1e-12)
    scale = torch.tensor(0.5, requires_grad=True)
    loss = cfm_loss(lambda x, t: scale * (x1 - x0), x0, x1, sample_t(4, "cpu"))
    loss.backward()
    # d/ds mean((s - 1)^2 v^2) = 2 (s - 1) mean(v^2)
    assert scale.grad.item() == pytest.approx(-(x1 - x0).pow(2).mean().item(), rel=1e-5)


def test_time_is_uniform_and_follows_its_generator():
    t = sample_t(10_000, "cpu", torch.Generator().manual_seed(1))
    assert 0.0 <= t.min() and t.max() < 1.0 and abs(t.mean().item() - 0.5) < 0.01
    assert torch.equal(t, sample_t(10_000, "cpu", torch.Generator().manual_seed(1)))
