from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

TaskKind = Literal["binary", "multiclass", "regression"]

KINDS: tuple[str, ...] = get_args(TaskKind)


@dataclass(frozen=True)
class Task:
    """One task's description, accepted wherever dstmtl takes tasks by name.

    ``MultiHeadNet.from_torchvision`` reads ``outputs`` (the width of the task's head),
    ``MaskedMultiTaskLoss`` reads ``kind``, ``outputs`` and the loss options, and
    ``TaskDropScheduler`` needs only the names, so one ``{name: Task(...)}`` mapping serves
    all three.

    Args:
        kind: ``"binary"``, ``"multiclass"`` or ``"regression"``.
        outputs: The head's output width (dimension 1 of its output): C for a C-class task
            (at least 2), the number of labels of a multi-label binary task, the number of
            values of a multi-output regression, 1 for one value per sample or per pixel.
        class_weights: ``"multiclass"`` only: one weight per class (``outputs`` of them,
            non-negative, not all 0), as ``weight`` of
            :func:`~torch.nn.functional.cross_entropy`. Stored as a tuple of floats.
        label_smoothing: ``"multiclass"`` only: in ``[0, 1)``, as ``label_smoothing`` of
            :func:`~torch.nn.functional.cross_entropy`.
        pos_weight: ``"binary"`` only: the weight of positive labels, one positive number
            for all labels (stored as a float) or one per label (``outputs`` of them, stored
            as a tuple of floats), as ``pos_weight`` of
            :func:`~torch.nn.functional.binary_cross_entropy_with_logits`.

    Raises:
        ValueError: For an unknown kind, a width below 1 (below 2 for ``"multiclass"``), or
            an option that does not fit the kind, has the wrong length or an invalid value.

    Example:
        >>> from dstmtl import Task
        >>> tasks = {
        ...     "smiling": Task("binary", pos_weight=3.0),
        ...     "segmentation": Task("multiclass", outputs=13, label_smoothing=0.1),
        ...     "age": Task("regression"),
        ... }
        >>> tasks["segmentation"].outputs
        13
    """

    kind: TaskKind
    outputs: int = 1
    class_weights: Sequence[float] | Tensor | None = None
    label_smoothing: float = 0.0
    pos_weight: float | Sequence[float] | Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Task: kind {self.kind!r} is not one of {list(KINDS)}")
        if isinstance(self.outputs, bool) or not isinstance(self.outputs, int):
            raise TypeError(
                f"Task: outputs must be an int (the head's output width), got {self.outputs!r}"
            )
        least = 2 if self.kind == "multiclass" else 1
        if self.outputs < least:
            fix = (
                "give the number of classes, e.g. Task('multiclass', outputs=10)"
                if self.kind == "multiclass"
                else "use 1 for one value per sample or per pixel"
            )
            raise ValueError(
                f"Task: a {self.kind} task needs outputs >= {least}, got {self.outputs}; {fix}"
            )
        self._check_fits_kind("class_weights", self.class_weights is not None, "multiclass")
        self._check_fits_kind("label_smoothing", self.label_smoothing != 0.0, "multiclass")
        self._check_fits_kind("pos_weight", self.pos_weight is not None, "binary")
        if self.class_weights is not None:
            weights = _floats(self.class_weights, "class_weights")
            if len(weights) != self.outputs:
                raise ValueError(
                    f"Task: class_weights has {len(weights)} values for {self.outputs} classes "
                    "(outputs); give one weight per class"
                )
            if any(not math.isfinite(w) or w < 0 for w in weights) or not any(weights):
                raise ValueError(
                    f"Task: class_weights must be finite, non-negative and not all 0, "
                    f"got {list(weights)}"
                )
            object.__setattr__(self, "class_weights", weights)
        smoothing = self.label_smoothing
        if isinstance(smoothing, bool) or not isinstance(smoothing, int | float):
            raise TypeError(f"Task: label_smoothing must be a number, got {smoothing!r}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"Task: label_smoothing must be in [0, 1), got {smoothing}")
        object.__setattr__(self, "label_smoothing", float(smoothing))
        if self.pos_weight is not None:
            object.__setattr__(self, "pos_weight", self._checked_pos_weight(self.pos_weight))

    def _check_fits_kind(self, option: str, given: bool, kind: str) -> None:
        if given and self.kind != kind:
            raise ValueError(
                f"Task: {option} applies to {kind} tasks only, not to a {self.kind} task"
            )

    def _checked_pos_weight(
        self, pos_weight: float | Sequence[float] | Tensor
    ) -> float | tuple[float, ...]:
        if isinstance(pos_weight, Tensor):
            scalar = pos_weight.dim() == 0
            values = _floats(pos_weight.reshape(-1) if scalar else pos_weight, "pos_weight")
        elif isinstance(pos_weight, Sequence):
            scalar = False
            values = _floats(pos_weight, "pos_weight")
        else:
            scalar = True
            values = _floats([pos_weight], "pos_weight")
        if len(values) not in (1, self.outputs):
            raise ValueError(
                f"Task: pos_weight has {len(values)} values for {self.outputs} labels "
                "(outputs); give one number for all labels or one per label"
            )
        if any(not math.isfinite(w) or w <= 0 for w in values):
            raise ValueError(f"Task: pos_weight must be finite and positive, got {list(values)}")
        return values[0] if scalar or len(values) == 1 else values


def _floats(values: Sequence[float] | Tensor, option: str) -> tuple[float, ...]:
    """``values`` as a tuple of floats, from a sequence of numbers or a 1-D real tensor."""
    if isinstance(values, Tensor):
        if values.dim() != 1 or values.dtype == torch.bool or values.is_complex():
            raise TypeError(
                f"Task: {option} must be a 1-D tensor of real numbers, got {values.dtype} "
                f"of shape {tuple(values.shape)}"
            )
        return tuple(float(v) for v in values.detach().cpu().tolist())
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"Task: {option} must be a sequence of numbers, got {values!r}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"Task: {option} must hold numbers, got {value!r} in {values!r}")
    return tuple(float(v) for v in values)
