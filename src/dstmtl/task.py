from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TaskKind = Literal["binary", "multiclass", "regression"]


@dataclass(frozen=True)
class Task:
    """One task's description, accepted wherever dstmtl takes tasks by name.

    ``MultiHeadNet.from_torchvision`` reads ``outputs`` (the width of the task's head),
    ``MaskedMultiTaskLoss`` reads ``kind``, and ``TaskDropScheduler`` needs only the names,
    so one ``{name: Task(...)}`` mapping serves all three.

    Args:
        kind: ``"binary"``, ``"multiclass"`` or ``"regression"``.
        outputs: The head's output width: C for a C-class task, the number of labels of a
            multi-label binary task, the number of values of a multi-output regression.

    Example:
        >>> from dstmtl import Task
        >>> tasks = {"smiling": Task("binary"), "age": Task("regression")}
        >>> tasks["age"].outputs
        1
    """

    kind: TaskKind
    outputs: int = 1
