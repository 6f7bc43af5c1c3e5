"""The collectives training needs, each the identity when no process group of several ranks exists.

``fit`` uses ``torch.distributed`` when Ray Train has set up a process group (gloo on CPU, NCCL on GPU) and
runs alone otherwise; routing every collective through here keeps that one check in one place.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a process group of more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_HOST_GROUP: list = []


def host_group() -> dist.ProcessGroup | None:
    """A gloo group for the coupling's host tensors (``None`` without a process group).

    Its own group: the coupling may talk on a background thread while the training thread's DDP and logging
    collectives run on the default group, and two threads must never interleave calls on one group. Every
    rank must create it at the same point (``fit`` does, before training).
    """
    if not is_distributed():
        return None
    if not _HOST_GROUP or _HOST_GROUP[0][0] is not dist.group.WORLD:
        _HOST_GROUP[:] = [(dist.group.WORLD, dist.new_group(backend="gloo"))]
    return _HOST_GROUP[0][1]


def all_gather(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate every rank's tensor in rank order (the identity without a process group)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


def broadcast_from_rank0(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Rank 0's tensor on every rank (the identity without a process group)."""
    if is_distributed():
        dist.broadcast(tensor, src=0, group=group)
    return tensor


def gather_objects(obj: object) -> list:
    """Every rank's picklable ``obj`` in rank order (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise mean over ranks, in place (NCCL reduces device tensors only, so keep it there)."""
    if is_distributed():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    if is_distributed():
        dist.barrier()
