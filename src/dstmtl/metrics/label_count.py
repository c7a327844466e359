from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from dstmtl._validation import per_task_tensor
from dstmtl.metrics._base import EpochStatistics, Metric


class LabelCount(Metric):
    r"""The ground-truth term :math:`n_j = N_j / \max_k N_k`.

    :math:`N_j` is the number of training samples that carry a label for task :math:`j`.
    As in the authors' script, tasks with more labels are kept more often.

    Args:
        counts: The counts :math:`N_j` as a mapping from task name or a sequence in task
            order; or the training labels as a tensor ``[N, K]`` in task order, where a
            missing label is NaN (floating tensors) or ``-1`` (integer tensors), as for
            :class:`~dstmtl.MaskedMultiTaskLoss`, and an infinite label raises
            ``ValueError``. In a floating tensor ``-1`` counts as a label, since it may be
            a regression value; when it marks a missing class, pass
            ``loss_fn.count_labels(labels)`` instead
            (:meth:`~dstmtl.MaskedMultiTaskLoss.count_labels` knows each task's kind).
            Counts must be non-negative with at least one positive (``ValueError``);
            counts that do not match the scheduler's tasks raise ``ValueError`` at the first
            evaluation.

    Example:
        >>> import torch
        >>> from dstmtl import TaskDropScheduler
        >>> from dstmtl.metrics import LabelCount
        >>> labels = torch.tensor([[1.0, float("nan")], [0.0, 1.0], [1.0, float("nan")]])
        >>> scheduler = TaskDropScheduler(["a", "b"], [LabelCount(labels)])
        >>> _ = scheduler.step([1.0, 1.0])
        >>> _ = scheduler.step([0.9, 0.9])
        >>> scheduler.terms["label_count"]
        {'a': 1.0, 'b': 0.3333333333333333}
    """

    name = "label_count"

    def __init__(self, counts: Mapping[str, float] | Sequence[float] | Tensor) -> None:
        if isinstance(counts, Tensor):
            if counts.dim() != 2:
                raise ValueError(
                    "LabelCount: a label tensor must have shape [N, K] (samples x tasks), "
                    f"got shape {tuple(counts.shape)}"
                )
            if counts.is_floating_point() and bool(counts.isinf().any()):
                # The loss takes infinity as a label value, so counting it as missing here
                # would disagree with what the loss trains on.
                raise ValueError(
                    "LabelCount: the label tensor holds an infinite value; mark a missing "
                    "label with NaN"
                )
            labelled = ~counts.isnan() if counts.is_floating_point() else counts != -1
            counts = labelled.sum(dim=0).to(torch.float64)
            self._counts: Mapping[str, float] | Sequence[float] | Tensor = counts
            values = counts.tolist()
        else:
            self._counts = counts
            values = list(counts.values() if isinstance(counts, Mapping) else counts)
        if any(not 0 <= float(v) < math.inf for v in values) or not any(
            float(v) > 0 for v in values
        ):
            raise ValueError(
                "LabelCount: counts must be finite and non-negative with at least one positive, "
                f"got {values}"
            )

    def __call__(self, stats: EpochStatistics) -> Tensor:
        counts = per_task_tensor(self._counts, stats.task_names, what="LabelCount counts")
        return counts / counts.max()

    def __repr__(self) -> str:
        return f"LabelCount({self._counts!r})"
