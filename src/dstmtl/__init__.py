"""Multi-task learning for PyTorch with Dropped Scheduled Task (DST) training.

* :class:`MultiHeadNet`: a shared backbone with one head per task.
* :class:`FusedLinearHeads`: K linear heads on one feature, held as one weight matrix
  (:class:`FusedLinearHead`: one task's handle); :class:`FeaturePool`: a feature of any
  layout pooled to ``[B, C]``.
* :class:`MaskedMultiTaskLoss`: per-task losses over the labelled samples only.
* :class:`TaskDropScheduler`: drops tasks from each update with a probability built from
  the metrics in :mod:`dstmtl.metrics`.
* :class:`Task`: one task's description (kind and output width), for all three.
"""

from importlib.metadata import PackageNotFoundError, version

from dstmtl import metrics
from dstmtl.heads import FeaturePool, FusedLinearHead, FusedLinearHeads, Layout
from dstmtl.loss import MaskedMultiTaskLoss
from dstmtl.multihead import MultiHeadNet
from dstmtl.scheduler import TaskDropScheduler
from dstmtl.task import Task, TaskKind

try:
    __version__ = version("dstmtl")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"

__all__ = [
    "FeaturePool",
    "FusedLinearHead",
    "FusedLinearHeads",
    "Layout",
    "MaskedMultiTaskLoss",
    "MultiHeadNet",
    "Task",
    "TaskDropScheduler",
    "TaskKind",
    "metrics",
]
