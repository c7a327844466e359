"""The collectives the scheduler needs, no-ops outside an initialised process group."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    """The device a collective of the default group must use: CUDA for NCCL, else the CPU."""
    if dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks (a copy on the collective device when needed)."""
    if not is_distributed():
        return tensor
    reduced = tensor.to(collective_device())
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced


def all_reduce_max(tensor: Tensor) -> Tensor:
    """The elementwise maximum of ``tensor`` over all ranks, on the device it came from."""
    if not is_distributed():
        return tensor
    reduced = tensor.to(collective_device())
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    return reduced.to(tensor.device)


def broadcast_from_first(tensor: Tensor) -> Tensor:
    """Rank 0's value of ``tensor`` on every rank, on the device ``tensor`` came from."""
    if not is_distributed():
        return tensor
    shared = tensor.to(collective_device())
    dist.broadcast(shared, src=0)
    return shared.to(tensor.device)
