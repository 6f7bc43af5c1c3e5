"""The conditional flow-matching objective on the straight path from noise (t=0) to data (t=1).

x_t = (1 - t) x0 + t x1 + sigma * eps, target velocity x1 - x0, t ~ U[0, 1]. The loss is the per-sample
mean squared error over C, H, W, averaged over the batch — the reference implementation's reduction, so
loss values are comparable with its logs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

VelocityField = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample_t(batch: int, device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.rand(batch, device=device, generator=generator)


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, sigma: float = 0.0,
                eps: torch.Tensor | None = None) -> torch.Tensor:
    tt = _expand(t, x1)
    xt = (1 - tt) * x0 + tt * x1
    if sigma > 0:
        xt = xt + sigma * (eps if eps is not None else torch.randn_like(xt))
    return xt


def target_velocity(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    return x1 - x0


def cfm_loss(model: VelocityField, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor,
             sigma: float = 0.0) -> torch.Tensor:
    """Per-sample MSE between the predicted and the target velocity, averaged over the batch."""
    prediction = model(interpolate(x0, x1, t, sigma), t)
    return (prediction.float() - target_velocity(x0, x1)).pow(2).flatten(1).mean(1).mean()
