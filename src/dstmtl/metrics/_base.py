"""The protocol every DST metric implements, and the statistics it receives."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor


@dataclass(frozen=True)
class EpochStatistics:
    """What the scheduler knows about training when it asks the metrics for their terms.

    All tensors are float64, on the CPU, with one entry per task in the order of
    ``task_names``. A loss is NaN for a task that had no finite, labelled step in that
    epoch.

    Attributes:
        task_names: The tasks, in the scheduler's order.
        epoch: Index of the epoch that just ended; ``0`` is the warm-up epoch whose losses
            are the baseline, so metrics are first asked at ``epoch == 1``.
        losses: Mean training loss per task over the epoch that just ended, ``Lbar(e)``.
        previous_losses: The last finite mean loss of each task before this epoch
            (``Lbar(e-1)`` when the task was measured then), NaN if there is none.
        baseline_losses: ``Lbar(0)``: the first finite, positive mean loss of each task,
            NaN while a task has none.
        label_counts: Labelled samples seen per task during the epoch, summed over ranks; 0
            when the per-step calls got no ``label_counts`` or :meth:`step
            <dstmtl.TaskDropScheduler.step>` got ``mean_losses``.
    """

    task_names: tuple[str, ...]
    epoch: int
    losses: Tensor
    previous_losses: Tensor
    baseline_losses: Tensor
    label_counts: Tensor


class Metric(ABC):
    """A DST term: one value in ``[0, 1]`` per task; higher means the task is kept more often.

    A metric is called by :class:`~dstmtl.TaskDropScheduler` at the end of every epoch after
    the warm-up epoch, with the :class:`EpochStatistics` of that epoch, and returns a tensor
    of shape ``[K]`` in task order, of any dtype and on any device (the scheduler converts
    it to float64 on the CPU). The scheduler checks the shape and the range, raising
    ``ValueError``, and accepts only instances of :class:`Metric` subclasses. A metric that
    keeps state between epochs overrides :meth:`state_dict` and :meth:`load_state_dict` so
    that a resumed run continues exactly where it stopped.

    Example:
        A term that keeps tasks with fewer labels more often:

        >>> import torch
        >>> from dstmtl.metrics import Metric, EpochStatistics
        >>> class FewLabels(Metric):
        ...     name = "few_labels"
        ...     def __call__(self, stats: EpochStatistics) -> torch.Tensor:
        ...         counts = stats.label_counts.clamp(min=1)
        ...         return counts.min() / counts
    """

    name: ClassVar[str]
    """Key of this term in :attr:`~dstmtl.TaskDropScheduler.terms` and in the scheduler's state.

    A class attribute; names must differ within one scheduler.
    """

    @abstractmethod
    def __call__(self, stats: EpochStatistics) -> Tensor:
        """Return the term for every task, shape ``[K]``, values in ``[0, 1]``."""

    def state_dict(self) -> dict[str, Any]:
        """Return the state needed to resume; stateless metrics return an empty dict."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        The default, for stateless metrics, raises ``ValueError`` for a non-empty dict.
        """
        if state_dict:
            raise ValueError(
                f"{type(self).__name__} is stateless but got state with keys {sorted(state_dict)}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
