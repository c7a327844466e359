from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from dstmtl._validation import per_task_tensor
from dstmtl.metrics._base import EpochStatistics, Metric

if TYPE_CHECKING:
    from dstmtl.multihead import MultiHeadNet


class NetworkDepth(Metric):
    r"""The task-depth term :math:`d_j = D_j / \max_k D_k`.

    :math:`D_j` is the number of weight layers on the longest path from the input to the
    output of task :math:`j`. Deeper tasks are kept more often; when every head sits on the
    same backbone output, :math:`d_j = 1` for every task.

    Args:
        depths: The depths :math:`D_j`, as a mapping from task name, a sequence in the
            scheduler's task order, or a :class:`~dstmtl.MultiHeadNet` whose
            :meth:`~dstmtl.MultiHeadNet.depths` are used.

    Example:
        >>> from dstmtl import TaskDropScheduler
        >>> from dstmtl.metrics import NetworkDepth
        >>> scheduler = TaskDropScheduler(["pose", "landmarks"], [NetworkDepth([17, 26])])
        >>> _ = scheduler.step([1.0, 1.0])
        >>> _ = scheduler.step([0.9, 0.9])
        >>> round(scheduler.terms["network_depth"]["pose"], 4)
        0.6538
    """

    name = "network_depth"

    def __init__(self, depths: Mapping[str, float] | Sequence[float] | MultiHeadNet) -> None:
        from dstmtl.multihead import MultiHeadNet

        self._depths = depths.depths() if isinstance(depths, MultiHeadNet) else depths
        values = self._depths.values() if isinstance(self._depths, Mapping) else self._depths
        if any(not 0 < float(v) < math.inf for v in values):
            raise ValueError(
                f"NetworkDepth: depths must be positive and finite, got {self._depths}"
            )

    def __call__(self, stats: EpochStatistics) -> Tensor:
        depths = per_task_tensor(self._depths, stats.task_names, what="NetworkDepth depths")
        return depths / depths.max()

    def __repr__(self) -> str:
        return f"NetworkDepth({self._depths!r})"
