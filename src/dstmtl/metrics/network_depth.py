from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from torch import Tensor, nn

from dstmtl._validation import per_task_tensor
from dstmtl.metrics._base import EpochStatistics, Metric

if TYPE_CHECKING:
    from dstmtl.multihead import MultiHeadNet


class NetworkDepth(Metric):
    r"""The task-depth term :math:`d_j = D_j / \max_k D_k`.

    :math:`D_j` is the number of weight layers on the longest path from the input to the
    output of task :math:`j` (see :meth:`~dstmtl.MultiHeadNet.depths` for what counts).
    Deeper tasks are kept more often; when every head sits on the same backbone output,
    :math:`d_j = 1` for every task.

    Args:
        depths: The depths :math:`D_j`, as a mapping from task name, a sequence in the
            scheduler's task order, or a :class:`~dstmtl.MultiHeadNet` built with an
            ``example_input`` (as :meth:`~dstmtl.MultiHeadNet.from_torchvision` does) whose
            :meth:`~dstmtl.MultiHeadNet.depths` are used; also one wrapped by
            :func:`torch.compile`, ``nn.DataParallel`` or ``DistributedDataParallel``. For
            a net without one, pass ``net.depths(example_input)``. Depths must be positive
            (``ValueError``); depths that do not match the scheduler's tasks raise
            ``ValueError`` at the first evaluation (the second :meth:`step
            <dstmtl.TaskDropScheduler.step>`).

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

    def __init__(self, depths: Mapping[str, float] | Sequence[float] | nn.Module) -> None:
        self._depths = _multihead_net(depths).depths() if isinstance(depths, nn.Module) else depths
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


def _multihead_net(module: nn.Module) -> MultiHeadNet:
    """The MultiHeadNet inside the wrappers of torch.compile, DataParallel and DDP."""
    from dstmtl.multihead import MultiHeadNet

    found = module
    while not isinstance(found, MultiHeadNet):
        inner = getattr(found, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None and isinstance(
            found, (nn.DataParallel, nn.parallel.DistributedDataParallel)
        ):
            inner = found.module
        if not isinstance(inner, nn.Module):
            raise TypeError(
                f"NetworkDepth takes depths or a MultiHeadNet, got {type(found).__name__}; "
                "pass the depths explicitly, e.g. NetworkDepth({'task': 18, ...})"
            )
        found = inner
    return found
