"""The batches ``fit`` trains on, each with its coupling decided ahead — one unit ahead on a host thread when
``coupling.pipelined``.

A *unit* is what one assignment problem covers: ``coupling.span`` consecutive batches of one epoch (one batch
unless several global batches fit ``coupling.max_problem``), closed early where a checkpoint follows. While
the device trains on unit k, a background thread decides unit k+1 from the loader's next batches: within an
epoch no point repeats, so unit k's table update cannot change unit k+1's problem, and the thread applies
updates in unit order — the same draws, reads and writes in the same order as the unpipelined loop, so both
give bit-identical tables and weights. Nothing is decided ahead across a checkpoint or an epoch boundary: a
checkpoint then holds exactly the state the unpipelined loop has at that step (an exact resume needs no record
of decisions for batches not yet trained), and the next epoch's first problem, which may share points with
this epoch's last, waits for it.

The training targets are drawn where their unit is decided (``targets``: the posterior samples of a latent
cache, from a generator in the checkpoint): the coupling's cost is on exactly the latents the step trains on,
the draws come in unit order on one thread at a time (the same order pipelined or not), and no draw is ahead
of the step at a checkpoint, so the saved generator state resumes the draws exactly.

On CUDA the thread works on its own stream, so copying its cost matrix to the host waits for its kernels, not
for the training step's; the training thread itself makes no host-device synchronisation for the coupling.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from loomcfm_core.coupling import Assigned, Coupling, SeedCoupling
from loomcfm_core.data.latents import Targets
from loomcfm_core.training.distributed import all_gather, broadcast_from_rank0, host_group


@dataclass
class Unit:
    batches: list[tuple[torch.Tensor, torch.Tensor]]  # (the loaded batch on the host, index)
    ends_at_checkpoint: bool


class Background:
    """``fn(*args)`` on a daemon thread (a thread stuck in a collective must not keep the process alive)."""

    def __init__(self, fn: Callable, *args) -> None:
        self._value, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True, name="coupling")
        self._thread.start()

    def _run(self, fn: Callable, args: tuple) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread by result()
            self._error = exc

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class CouplingPlanner:
    """Turns the loader's batches into ``(x1, index, assigned)`` for ``train_step``.

    Args:
        checkpoint_every, total_steps: where ``fit`` saves, so that no unit spans a checkpoint.
        pipelined: decide the next unit on a background thread while this one trains.
        targets: turns a loaded batch into the flow's targets x1 (posterior draws of a latent cache; the
            identity for images and pairs).
    """

    def __init__(self, coupling: Coupling, local_batch: int, checkpoint_every: int, total_steps: int,
                 pipelined: bool = True, device: torch.device | None = None, targets: Targets | None = None) -> None:
        self.coupling, self.checkpoint_every, self.total_steps = coupling, checkpoint_every, total_steps
        self.pipelined, self.device, self.targets = pipelined, device, targets or Targets()
        self.span = coupling.span(local_batch) if isinstance(coupling, SeedCoupling) else 1
        group = host_group()  # created on every rank now, in step
        self.gather = functools.partial(all_gather, group=group)
        self.broadcast = functools.partial(broadcast_from_rank0, group=group)
        self._stream = None

    def _units(self, batches: Iterator, step: int) -> Iterator[Unit]:
        unit: list = []
        for x1, _, index in batches:
            unit.append((x1, index))
            step += 1
            checkpoint = step % self.checkpoint_every == 0 or step >= self.total_steps
            if checkpoint or len(unit) == self.span:
                yield Unit(unit, checkpoint)
                unit = []
                if step >= self.total_steps:
                    return
        if unit:
            yield Unit(unit, True)

    def _on_thread_stream(self):
        """A CUDA stream of the coupling's own (its copies wait for its kernels only); nothing on a CPU."""
        if self.device is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self._stream)

    def _target(self, batch: torch.Tensor) -> torch.Tensor:
        """The batch's x1 on the host; a new tensor (a draw) is pinned for a CUDA device, as the loader's are."""
        x1 = self.targets(batch)
        return x1.pin_memory() if x1 is not batch and self.device is not None and self.device.type == "cuda" else x1

    def _decide(self, unit: Unit, background: bool = False) -> list[tuple[torch.Tensor, torch.Tensor, Assigned]]:
        """The unit's targets, drawn here, with the coupling decided on exactly them."""
        batches = [(self._target(batch), index) for batch, index in unit.batches]
        with self._on_thread_stream() if background else contextlib.nullcontext():
            decided = self.coupling.plan(batches, self.gather, self.broadcast)
        return [(x1, index, assigned) for (x1, index), assigned in zip(batches, decided)]

    def batches(self, loader: Iterator, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, Assigned | None]]:
        """The targets x1 (on the host) of one pass over ``loader`` (starting at global step ``step``), each with
        its coupling (``None`` for couplings without seeds, which ``train_step`` couples itself)."""
        if not isinstance(self.coupling, SeedCoupling):
            for batch, _, index in loader:
                yield self._target(batch), index, None
            return
        units = self._units(iter(loader), step)
        unit, ahead = next(units, None), None
        while unit is not None:
            decided = ahead.result() if ahead is not None else self._decide(unit)
            ahead, fetched = None, self.pipelined and not unit.ends_at_checkpoint
            if fetched:
                following = next(units, None)
                if following is not None:
                    ahead = Background(self._decide, following, True)
            yield from decided
            unit = following if fetched else next(units, None)
