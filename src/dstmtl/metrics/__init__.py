"""The DST terms: each maps the training statistics of an epoch to a keep term per task.

Every class implements :class:`Metric`; :class:`~dstmtl.TaskDropScheduler` combines the
enabled terms into keep probabilities.
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
