"""Standard normal noise as a pure function of an int64 seed, generated for a whole batch on its device.

Counter-based: element pair j of seed s comes from splitmix64(mix(s) + (j+1)·golden), split into a 23-bit and
a 24-bit uniform and turned into two normals by Box–Muller. The integer stream is bit-identical on every device,
so a seed means the same noise on a CPU and on a GPU (up to the last ulp of log/cos/sin), and a whole batch is
generated on the training device instead of one CPU generator per sample plus a copy.

On CUDA the arithmetic (two 64-bit mixes, two conversions, log, sqrt, cos, sin) is compiled into a few fused
kernels with ``torch.compile``; eagerly it is ~40 small kernels, each a pass over the batch. Elsewhere, or if
compiling fails, the eager function runs: same integers, same formula.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# splitmix64 constants as signed int64 (torch has no uint64 arithmetic; int64 multiplication wraps).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_U23, _U24 = 2.0**-23, 2.0**-24


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's ``>>`` is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser: a bijective avalanche of 64-bit words."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def counters(pairs: int, device: torch.device | str) -> torch.Tensor:
    """(j+1)·golden for j < pairs, int64. Always eager: inductor (torch 2.14, CPU) folds ``arange * constant``
    into an index expression whose arithmetic does not wrap at 64 bits, and crashes or computes other words."""
    return torch.arange(1, pairs + 1, device=device, dtype=torch.int64) * _GOLDEN


def noise_words(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The integer stream: ``[len(seeds), len(steps)]`` int64 words, one per pair of normals."""
    return _mix64(_mix64(seeds)[:, None] + steps)


def normals(seeds: torch.Tensor, steps: torch.Tensor, numel: int) -> torch.Tensor:
    """``[len(seeds), numel]`` float32 standard normals from int64 ``seeds`` and ``counters(ceil(numel/2))``."""
    words = noise_words(seeds, steps)
    u1 = (_shr(words, 41).to(torch.float32) + 0.5) * _U23  # exactly in (0, 1): log is finite
    angle = (words & 0xFFFFFF).to(torch.float32) * (2 * math.pi * _U24)
    radius = torch.sqrt(torch.log(u1) * -2.0)
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :numel]


_compiled: dict[str, Callable] = {}
_compile_lock = threading.Lock()  # the coupling's host thread and the training thread both generate noise


def compiled(fn: Callable) -> Callable:
    """``fn`` compiled once per process (dynamic shapes: any batch size, any image size)."""
    if fn.__name__ not in _compiled:
        _compiled[fn.__name__] = torch.compile(fn, dynamic=True)
    return _compiled[fn.__name__]


def noise_from_seeds(seeds: torch.Tensor, shape: tuple[int, ...], device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise ``[len(seeds), *shape]``, a pure function of each seed, in one vectorised call."""
    device = seeds.device if device is None else torch.device(device)
    seeds = seeds.to(device=device, dtype=torch.int64)
    numel = math.prod(shape)
    steps = counters((numel + 1) // 2, device)
    out = None
    if device.type == "cuda" and "failed" not in _compiled:
        try:
            with _compile_lock:  # compiling (and re-guarding) a function is not thread-safe
                out = compiled(normals)(seeds, steps, numel)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager path computes the same
            log.warning("compiling noise generation failed (%s); generating it eagerly", exc)
            _compiled["failed"] = normals
    if out is None:
        out = normals(seeds, steps, numel)
    return out.reshape(len(seeds), *shape).to(dtype)


def random_seeds(count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(-(1 << 63), (1 << 63) - 1, (count,), generator=generator, dtype=torch.int64)
