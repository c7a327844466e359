from __future__ import annotations

import torch
from torch import Tensor

from dstmtl.metrics._base import EpochStatistics, Metric


def relative_incompleteness(stats: EpochStatistics) -> Tensor:
    """``u_j = min(1, A_j / mean_k A_k)`` with ``A_j = Lbar_j(e) / Lbar_j(0)``.

    A task whose ratio is undefined (no baseline yet, no finite loss this epoch, or a
    negative one) gets 1 and is left out of the mean; if no ratio is defined or their mean
    is 0, every task gets 1.
    """
    ratios = stats.losses / stats.baseline_losses
    # The ratio measures how much of the loss is left, which means nothing below 0.
    defined = ratios.isfinite() & (stats.losses >= 0)
    ones = torch.ones_like(ratios)
    if not bool(defined.any()):
        return ones
    mean_ratio = ratios[defined].mean()
    if not mean_ratio > 0:
        return ones
    return torch.where(defined, (ratios / mean_ratio).clamp(max=1.0), ones)


class TaskIncompleteness(Metric):
    r"""The task-incompleteness term :math:`u_j = \min(1, A_j / \bar A)`.

    .. math::

        A_j = \bar L_j(e) / \bar L_j(0), \qquad \bar A = \tfrac{1}{K} \textstyle\sum_k A_k

    :math:`\bar L_j(e)` is the mean training loss of task :math:`j` over epoch :math:`e`
    and :math:`\bar L_j(0)` that of the warm-up epoch. A task that has learned less than
    average keeps :math:`u_j = 1`; a task ahead of the others gets :math:`u_j < 1` and is
    dropped more often. Scaling a task's losses by a constant does not change :math:`u`.

    Edge cases: a task with no baseline, or no finite loss in the epoch, or a negative one
    (the ratio assumes losses :math:`\ge 0`), gets :math:`u_j = 1` and does not count in
    :math:`\bar A`; if :math:`\bar A = 0` every task gets 1.

    Example:
        >>> from dstmtl import TaskDropScheduler
        >>> from dstmtl.metrics import TaskIncompleteness
        >>> scheduler = TaskDropScheduler(["a", "b"], [TaskIncompleteness()])
        >>> _ = scheduler.step([1.0, 2.0])
        >>> _ = scheduler.step([0.5, 1.5])  # A = [0.5, 0.75], mean 0.625
        >>> scheduler.terms["task_incompleteness"]
        {'a': 0.8, 'b': 1.0}
    """

    name = "task_incompleteness"

    def __call__(self, stats: EpochStatistics) -> Tensor:
        return relative_incompleteness(stats)
