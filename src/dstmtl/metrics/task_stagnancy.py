from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dstmtl.metrics._base import EpochStatistics, Metric
from dstmtl.metrics.task_incompleteness import relative_incompleteness


class TaskStagnancy(Metric):
    r"""The task-stagnancy term :math:`s_j = \min(1, \bar R / R_j)`.

    At every epoch :math:`e \ge 1`, with the relative incompleteness :math:`u_j` of
    :class:`TaskIncompleteness`:

    .. math::

        r_j = \frac{\bar L_j(e-1) - \bar L_j(e)}{\bar L_j(e-1)\, u_j}, \qquad
        R_j \leftarrow \begin{cases}
            |r_j| & \text{at the task's first update} \\
            \alpha r_j + (1 - \alpha) R_j & \text{if } r_j > 0 \\
            R_j & \text{otherwise}
        \end{cases}

    and :math:`\bar R` is the mean of :math:`R` over the tasks. A task whose loss still
    falls fast (large :math:`R_j`) is dropped more often; a stagnating task keeps
    :math:`s_j = 1`. Scaling a task's losses by a constant does not change :math:`s`.

    :math:`\bar L_j(e-1)` is the task's last finite epoch mean before :math:`e` (the previous
    epoch's, unless that one was not measured).

    Edge cases: :math:`r_j` is undefined when the task has no finite loss this epoch or
    none before it, when :math:`\bar L_j(e-1) \le 0` or :math:`\bar L_j(e) < 0` (the rate
    assumes losses :math:`\ge 0`), or when :math:`u_j = 0`; then :math:`R_j` is left as it
    is. A task without :math:`R_j` yet, or with :math:`R_j = 0`, gets :math:`s_j = 1`, and so
    does every task while :math:`\bar R = 0`.

    Stateful: :meth:`state_dict` returns ``{"alpha": ..., "rates": ...}``, with ``rates``
    ``None`` before the first evaluation.

    Args:
        alpha: Weight of the newest rate in the moving average, in ``(0, 1]``
            (``ValueError`` otherwise).

    Example:
        >>> from dstmtl import TaskDropScheduler
        >>> from dstmtl.metrics import TaskStagnancy
        >>> scheduler = TaskDropScheduler(["a", "b"], [TaskStagnancy(alpha=0.1)])
        >>> _ = scheduler.step([1.0, 1.0])
        >>> _ = scheduler.step([0.5, 0.9])  # u = [0.714.., 1], R = [0.7, 0.1]
        >>> {k: round(v, 4) for k, v in scheduler.terms["task_stagnancy"].items()}
        {'a': 0.5714, 'b': 1.0}
    """

    name = "task_stagnancy"

    def __init__(self, alpha: float = 0.1) -> None:
        self.alpha = _checked_alpha(alpha)
        self._rates: Tensor | None = None

    def __call__(self, stats: EpochStatistics) -> Tensor:
        incompleteness = relative_incompleteness(stats)
        previous = stats.previous_losses
        rate = (previous - stats.losses) / previous / incompleteness
        # As for the incompleteness, a relative fall means nothing for losses below 0.
        defined = rate.isfinite() & (previous > 0) & (stats.losses >= 0)
        rates = self._rates
        if rates is None:
            rates = torch.full_like(rate, float("nan"))
        elif rates.shape != rate.shape:
            raise ValueError(
                f"TaskStagnancy holds rates for {rates.numel()} tasks but got statistics for "
                f"{rate.numel()} tasks {list(stats.task_names)}; use one TaskStagnancy per "
                "scheduler, and load only a state saved with the same tasks"
            )
        first = defined & rates.isnan()
        later = defined & ~rates.isnan() & (rate > 0)
        rates = torch.where(first, rate.abs(), rates)
        rates = torch.where(later, self.alpha * rate + (1 - self.alpha) * rates, rates)
        self._rates = rates

        ones = torch.ones_like(rates)
        known = rates.isfinite()
        if not bool(known.any()):
            return ones
        # R >= 0, so a mean of 0 means every R is 0, and the where gives 1 to every task.
        mean_rate = rates[known].mean()
        return torch.where(known & (rates > 0), (mean_rate / rates).clamp(max=1.0), ones)

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "rates": self._rates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rates = state_dict["rates"]
        if rates is not None and (not isinstance(rates, Tensor) or rates.ndim != 1):
            raise ValueError(
                f"TaskStagnancy: rates in the state must be None or a 1-D tensor, got {rates!r}"
            )
        self.alpha = _checked_alpha(float(state_dict["alpha"]))
        self._rates = rates

    def __repr__(self) -> str:
        return f"TaskStagnancy(alpha={self.alpha})"


def _checked_alpha(alpha: float) -> float:
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"TaskStagnancy: alpha must be in (0, 1], got {alpha}")
    return alpha
