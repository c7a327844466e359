from __future__ import annotations

import torch
from torch import Tensor

from dstmtl.metrics._base import EpochStatistics, Metric


class Constant(Metric):
    r"""The regulariser term :math:`c_j = 1`.

    With equal metric weights over :math:`M` enabled terms it gives every task a keep
    probability of at least :math:`1/M`. Enabled alone, it keeps every task at every epoch,
    which makes :class:`~dstmtl.TaskDropScheduler` an equal-weight multi-task objective.

    Example:
        >>> from dstmtl import TaskDropScheduler
        >>> from dstmtl.metrics import Constant
        >>> scheduler = TaskDropScheduler(["a", "b"], [Constant()], generator=0)
        >>> _ = scheduler.step([1.0, 2.0])
        >>> _ = scheduler.step([0.5, 1.5])
        >>> scheduler.keep_probabilities
        {'a': 1.0, 'b': 1.0}
    """

    name = "constant"

    def __call__(self, stats: EpochStatistics) -> Tensor:
        return torch.ones(len(stats.task_names), dtype=torch.float64)
