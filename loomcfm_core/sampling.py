"""Sampling: integrate the learned velocity field from noise (t=0) to data (t=1) with torchdiffeq.

Methods are strings ``solver-steps`` (``euler-4``, ``midpoint-6``, ``rk4-2``, ``dopri5-1``); fixed-step
solvers use the grid [0, 1/steps, ..., 1], ``dopri5`` adapts its steps (atol = rtol = 1e-5) and ignores
the count. The number of function evaluations (NFE) is what the speed/quality trade-off is measured in,
so it is counted on the network calls, never inferred from the method name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchdiffeq import odeint
from tqdm.auto import tqdm

from loomcfm_core.choices import parse_method
from loomcfm_core.noise import noise_from_seeds

ADAPTIVE_TOLERANCE = 1e-5
GRID_CELL = 64  # the smallest side, in pixels, an image of a grid is shown at


class CountingField(nn.Module):
    """The velocity field in torchdiffeq's ``f(t, x)`` form, counting its evaluations."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.nfe = 0

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.model(x, t.expand(x.shape[0]).to(x.dtype))


@torch.no_grad()
def solve(model: nn.Module, x0: torch.Tensor, method: str) -> tuple[torch.Tensor, int]:
    """Integrate from noise ``x0`` to t=1; returns the samples and the number of network evaluations."""
    solver, steps = parse_method(method)
    field = CountingField(model)
    if solver == "dopri5":
        grid = torch.tensor([0.0, 1.0], device=x0.device)
        options = {"atol": ADAPTIVE_TOLERANCE, "rtol": ADAPTIVE_TOLERANCE}
    else:
        grid = torch.linspace(0.0, 1.0, steps + 1, device=x0.device)
        options = {}
    trajectory = odeint(field, x0, grid, method=solver, **options)
    return trajectory[-1], field.nfe


@dataclass
class Samples:
    images: torch.Tensor  # [n, C, H, W] float in about [-1, 1], on the CPU; image i from noise of seeds[i]
    nfe: float            # mean network evaluations per batch


def sample_seeds(num: int, offset: int = 0) -> torch.Tensor:
    """Noise seeds for evaluation: a fixed range, so every method and every model sees the same noise."""
    return torch.arange(offset, offset + num, dtype=torch.int64) + (1 << 40)


def generate(model: nn.Module, shape: tuple[int, ...], method: str, seeds: torch.Tensor, batch_size: int,
             device: torch.device | str, desc: str | None = None) -> Samples:
    """Samples for the given noise seeds, in batches, with a progress bar."""
    outputs, nfes = [], []
    model = model.to(device).eval()
    for start in tqdm(range(0, len(seeds), batch_size), desc=desc or f"sampling {method}", unit="batch",
                      dynamic_ncols=True, leave=False):
        x0 = noise_from_seeds(seeds[start:start + batch_size], shape, device)
        x1, nfe = solve(model, x0, method)
        outputs.append(x1.float().cpu())
        nfes.append(nfe)
    return Samples(torch.cat(outputs), sum(nfes) / len(nfes))


@torch.no_grad()
def path_curvature(model: nn.Module, x0: torch.Tensor, steps: int = 64) -> float:
    """Mean squared deviation of the velocity from the straight line between the path's ends.

    ``E_t ||v(x_t, t) - (x_1 - x_0)||^2`` per dimension along an Euler trajectory: zero for perfectly
    straight paths, which a one-step sampler would then follow exactly.
    """
    x, velocities = x0, []
    for i in range(steps):
        t = torch.full((x.shape[0],), i / steps, device=x.device, dtype=x.dtype)
        v = model(x, t)
        velocities.append(v)
        x = x + v / steps
    straight = x - x0
    return torch.stack([(v - straight).pow(2).flatten(1).mean(1) for v in velocities]).mean().item()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats to uint8 pixels (clamped), the form images are stored and scored in."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images: torch.Tensor, path, nrow: int = 8) -> None:
    """A PNG grid of ``images`` (floats in [-1, 1] or uint8 pixels) with ``nrow`` images per row
    (torchvision's ``make_grid`` convention).

    Small images are enlarged by an integer factor (nearest neighbour: every pixel stays a crisp square) to
    at least ``GRID_CELL`` pixels a side, so an 8x8 digit is a picture a person can see in the MLflow UI.
    """
    from torchvision.utils import save_image

    scaled = images.float() / 255 if images.dtype == torch.uint8 else (images.clamp(-1, 1) + 1) / 2
    factor = max(1, -(-GRID_CELL // images.shape[-1]))
    scaled = scaled.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2)
    save_image(scaled, path, nrow=nrow, padding=2)
