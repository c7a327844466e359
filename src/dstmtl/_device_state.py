"""The scheduler's per-step state on the losses' device: running sums and staged gates.

The per-step path only adds to these buffers and reads them in place, so it never waits
for the device; :meth:`DeviceState.collect` reads the sums back once per epoch, summed
over all ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dstmtl._distributed import all_reduce_sum

# Rows of the running sums: the losses of labelled steps, the labelled steps, the labelled
# samples; then, for means by label, the losses times their steps' labelled samples and
# those samples (of labelled steps only).
LOSS_SUM, LABELLED_STEPS, LABEL_COUNT, COUNTED_LOSS_SUM, COUNTED_LABELS = range(5)
_ROWS = 5


class DeviceState:
    """Running sums ``[5, K]`` and the gate-times-weight factors ``[K]`` on one device."""

    def __init__(self, num_tasks: int, device: torch.device | str = "cpu") -> None:
        device = torch.device(device)
        dtype = _state_dtype(device)
        self.sums = torch.zeros(_ROWS, num_tasks, dtype=dtype, device=device)
        self.factors = torch.ones(num_tasks, dtype=dtype, device=device)
        self.kept_index = torch.arange(num_tasks, device=device)

    @property
    def device(self) -> torch.device:
        return self.sums.device

    def to(self, device: torch.device | str) -> None:
        """Move the buffers to ``device``, keeping the sums; the caller stages the gates.

        From the CPU to a GPU, the copy goes through pinned memory without waiting for it.
        """
        device = torch.device(device)
        dtype = _state_dtype(device)
        sums = torch.empty(self.sums.shape, dtype=dtype, device=device)
        sums.copy_(_staged(self.sums.to(dtype), device), non_blocking=True)
        self.sums = sums
        self.factors = torch.empty(self.factors.shape, dtype=dtype, device=device)
        self.kept_index = torch.empty(0, dtype=torch.long, device=device)

    def record(self, losses: Tensor, label_counts: Tensor | None, *, by_label: bool) -> None:
        """Add one step's detached losses; a step counts for a task when its loss is finite
        and, with ``label_counts``, the task had a labelled sample. ``by_label`` (which
        needs ``label_counts``) also fills the rows of the means by label."""
        dtype = self.sums.dtype
        detached = losses.detach().to(dtype)
        labelled = detached.isfinite()
        if label_counts is not None:
            counts = label_counts.to(dtype)
            labelled = labelled & (counts > 0)
            self.sums[LABEL_COUNT] += counts
        kept = torch.where(labelled, detached, 0.0)
        self.sums[LOSS_SUM] += kept
        self.sums[LABELLED_STEPS] += labelled.to(dtype)
        if by_label and label_counts is not None:
            self.sums[COUNTED_LOSS_SUM] += kept * counts
            self.sums[COUNTED_LABELS] += torch.where(labelled, counts, 0.0)

    def gate(self, losses: Tensor) -> Tensor:
        """``g_j w_j L_j``: exactly 0 for a dropped task, even with a non-finite loss."""
        # A copy: autograd keeps it for the backward pass, and the buffer is rewritten in
        # place at the next draw (gradient accumulation).
        factors = self.factors.to(losses.dtype, copy=True)
        return torch.where(factors > 0, losses * factors, torch.zeros_like(losses))

    def stage(self, gates: Tensor, loss_weights: Tensor) -> None:
        """Copy host gates and weights into the device buffers without waiting for them."""
        device = self.device
        factors = (gates.to(torch.float64) * loss_weights).to(self.factors.dtype)
        self.factors.copy_(_staged(factors, device), non_blocking=True)
        kept = gates.nonzero().squeeze(1)
        self.kept_index = _staged(kept, device).to(device, non_blocking=True)

    def collect(self) -> Tensor:
        """The sums since the last collect, added over all ranks, as float64 on the CPU;
        then restart them."""
        totals = all_reduce_sum(self.sums.clone()).to("cpu", torch.float64)
        self.sums.zero_()
        return totals

    def saved_sums(self) -> Tensor:
        # A copy even on the CPU, where .cpu() would return the live running sums.
        return self.sums.to("cpu", copy=True)

    def load_sums(self, sums: Tensor) -> None:
        """Restore saved sums; rows that an older state lacks (it had 3) start at 0."""
        self.sums.zero_()
        self.sums[: len(sums)].copy_(sums)


def _state_dtype(device: torch.device) -> torch.dtype:
    """float64, so that long epochs, label counts past 2**24 and float64 losses' weights stay
    exact; MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _staged(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` in pinned memory when it goes to a CUDA device.

    A non-blocking copy from ordinary host memory may still wait for the GPU; from pinned
    memory it does not, which matters for per-step redraws.
    """
    return tensor.pin_memory() if device.type == "cuda" else tensor
