"""The DST terms: each maps the training statistics of an epoch to a keep term per task.

Every class implements :class:`Metric`; :class:`~dstmtl.TaskDropScheduler` combines the
enabled terms into keep probabilities, their weighted mean. Each term is one value in
``[0, 1]`` per task, higher meaning "keep more often", and is asked for at every
:meth:`~dstmtl.TaskDropScheduler.step` after the first one.

Example:
    The five terms of DST, with equal weights:

    >>> from dstmtl import TaskDropScheduler
    >>> from dstmtl.metrics import (
    ...     Constant, LabelCount, NetworkDepth, TaskIncompleteness, TaskStagnancy
    ... )
    >>> scheduler = TaskDropScheduler(
    ...     ["a", "b", "c"],
    ...     [
    ...         Constant(),
    ...         NetworkDepth([17, 17, 26]),
    ...         LabelCount({"a": 100, "b": 50, "c": 200}),
    ...         TaskIncompleteness(),
    ...         TaskStagnancy(alpha=0.1),
    ...     ],
    ...     generator=0,
    ... )
    >>> for means in ([1.0, 2.0, 4.0], [0.5, 1.8, 2.0], [0.25, 1.9, 1.5]):
    ...     _ = scheduler.step(means)
    >>> scheduler.terms["label_count"]
    {'a': 0.5, 'b': 0.25, 'c': 1.0}
    >>> {task: round(p, 4) for task, p in scheduler.keep_probabilities.items()}
    {'a': 0.6623, 'b': 0.7808, 'c': 0.8949}
"""

from dstmtl.metrics._base import EpochStatistics, Metric
from dstmtl.metrics.constant import Constant
from dstmtl.metrics.label_count import LabelCount
from dstmtl.metrics.network_depth import NetworkDepth
from dstmtl.metrics.task_incompleteness import TaskIncompleteness
from dstmtl.metrics.task_stagnancy import TaskStagnancy

__all__ = [
    "Constant",
    "EpochStatistics",
    "LabelCount",
    "Metric",
    "NetworkDepth",
    "TaskIncompleteness",
    "TaskStagnancy",
]
