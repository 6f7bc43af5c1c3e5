"""Solvers against a flow with a known solution, and NFE counted on the network calls."""

import math

import pytest
import torch
from torch import nn

from loomcfm_core.choices import parse_method
from loomcfm_core.sampling import generate, path_curvature, sample_seeds, solve, to_uint8


class Linear(nn.Module):
    """v(x, t) = a x: the flow is x(1) = exp(a) x(0)."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = a
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        assert t.shape == (x.shape[0],)
        return self.a * x


class TimeDependent(nn.Module):
    """v(x, t) = 3 t^2: x(1) = x(0) + 1, exact for solvers of order >= 3 on any grid."""

    def forward(self, x, t):
        return 3 * t[:, None] ** 2 * torch.ones_like(x)


@pytest.mark.parametrize("method, per_step, tolerance", [
    ("euler-100", 1, 2e-2), ("midpoint-50", 2, 1e-3), ("rk4-10", 4, 1e-5), ("dopri5-1", None, 1e-4)])
def test_solvers_match_the_analytic_flow(method, per_step, tolerance):
    model = Linear(-0.7)
    x0 = torch.randn(5, 3, dtype=torch.float64)
    x1, nfe = solve(model, x0, method)
    torch.testing.assert_close(x1, math.exp(-0.7) * x0, rtol=tolerance, atol=tolerance)
    assert nfe == model.calls
    solver, steps = parse_method(method)
    if per_step is not None:
        assert nfe == per_step * steps


def test_error_shrinks_with_order():
    x0 = torch.ones(1, 1, dtype=torch.float64)
    exact = math.exp(1.0)
    errors = {m: abs(solve(Linear(1.0), x0, m)[0].item() - exact) for m in ("euler-4", "midpoint-4", "rk4-4")}
    assert errors["euler-4"] > 10 * errors["midpoint-4"] > 10 * errors["rk4-4"]
    assert errors["euler-4"] == pytest.approx(exact - 1.25**4, rel=1e-9)  # (1 + 1/4)^4


def test_time_dependent_field_uses_the_grid():
    x0 = torch.zeros(2, 1, dtype=torch.float64)
    assert solve(TimeDependent(), x0, "rk4-1")[0].flatten().tolist() == pytest.approx([1.0, 1.0])
    assert solve(TimeDependent(), x0, "euler-2")[0].flatten().tolist() == pytest.approx([0.375, 0.375])  # 0.5 * 3 * 0.5^2


@pytest.mark.parametrize("bad", ["euler", "euler-0", "heun-2", "dopri5", "rk4-x"])
def test_bad_method_strings(bad):
    with pytest.raises(ValueError, match="solver-steps|<solver>-<steps>"):
        parse_method(bad)


def test_generate_batches_and_reports_mean_nfe():
    model = Linear(0.0)
    samples = generate(model, (1, 2, 2), "midpoint-3", sample_seeds(10), batch_size=4, device="cpu")
    assert samples.images.shape == (10, 1, 2, 2) and samples.nfe == 6 and model.calls == 18
    again = generate(Linear(0.0), (1, 2, 2), "euler-1", sample_seeds(10), batch_size=10, device="cpu")
    torch.testing.assert_close(samples.images, again.images)  # a=0: the output is the seeds' noise


def test_curvature_is_zero_for_straight_paths():
    assert path_curvature(Linear(0.0), torch.randn(4, 3)) == pytest.approx(0.0)
    assert path_curvature(Linear(1.0), torch.randn(4, 3)) > 0.01


def test_to_uint8_clamps():
    assert to_uint8(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])).tolist() == [0, 0, 128, 255, 255]
