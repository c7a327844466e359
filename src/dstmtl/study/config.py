"""The typed description of a study, saved whole in ``study.json`` and compared on resume."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from dstmtl.study._errors import StudyError
from dstmtl.study.methods import check_method_names
from dstmtl.task import TaskKind

__all__ = ["METRICS", "StudyConfig", "StudyError", "StudyTask", "higher_is_better", "parse_seeds"]

METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("accuracy", "balanced_accuracy", "f1"),
    "multiclass": ("accuracy", "miou"),
    "regression": ("mae", "rmse"),
}
"""The evaluation metrics of each task kind; the first is the default for model selection.

Counted over every labelled element (pixel, for a dense task); see
:mod:`dstmtl.study.evaluation` for their definitions.
"""
_LOWER_IS_BETTER = frozenset({"mae", "rmse"})


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` (a name from :data:`METRICS`) is better."""
    return metric not in _LOWER_IS_BETTER


@dataclass(frozen=True)
class StudyTask:
    """One task of a study: its kind, its head's width and the metric it is judged by.

    ``metric`` (by default the kind's first in :data:`METRICS`) drives model selection,
    the comparisons, Δm% and the ranks; every metric of the kind is reported.
    """

    kind: TaskKind
    outputs: int = 1
    metric: str = ""

    def __post_init__(self) -> None:
        if self.kind not in METRICS:
            raise StudyError(f"unknown task kind {self.kind!r}; use one of {', '.join(METRICS)}")
        if not self.metric:
            object.__setattr__(self, "metric", METRICS[self.kind][0])
        if self.metric not in METRICS[self.kind]:
            raise StudyError(
                f"metric {self.metric!r} does not apply to a {self.kind} task; use one of "
                f"{', '.join(METRICS[self.kind])}"
            )


@dataclass(frozen=True)
class StudyConfig:
    """Everything that decides a study's numbers.

    Args:
        tasks: ``{name: StudyTask}``, in the order of the targets' columns.
        methods: Method names (see :data:`dstmtl.study.methods.METHOD_NAMES`); ``"stl"``
            adds single-task models, one per task, as a reference.
        seeds: One run per method and seed; a seed fixes the initial weights, the data
            order and the method's draws, the same for every method.
        epochs: Training epochs per run.
        batch_size: Training and evaluation batch size.
        learning_rate: Adam's learning rate, the same for every method.
        reference: The method the others are compared with (Δm%, paired tests).
        selection: ``"metric"`` selects each run's epoch by the mean validation metric
            over tasks (lower-is-better metrics negated: use it when the tasks share a
            scale), ``"loss"`` by the mean validation loss over tasks.
        precision: ``"bfloat16"`` runs the forward passes under ``torch.autocast`` with
            bfloat16 (fast on recent GPUs, slow on most CPUs), ``"float32"`` does not.
        extra: Your own settings that decide the numbers (JSON values: an image size, a
            dataset version), recorded in ``study.json`` and compared on resume.
    """

    tasks: Mapping[str, StudyTask]
    methods: tuple[str, ...] = ("equal", "dst")
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    reference: str = "equal"
    selection: Literal["metric", "loss"] = "metric"
    precision: Literal["float32", "bfloat16"] = "float32"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", dict(self.tasks))
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if not self.tasks:
            raise StudyError("a study needs at least one task")
        for name, task in self.tasks.items():
            if not isinstance(task, StudyTask):
                raise StudyError(
                    f"task {name!r} is {task!r}; describe it as StudyTask('binary'), "
                    "StudyTask('multiclass', outputs=C) or StudyTask('regression')"
                )
        check_method_names(self.methods)
        if self.reference not in self.methods:
            raise StudyError(
                f"the reference method {self.reference!r} is not among the methods "
                f"{list(self.methods)}; add it or choose another reference"
            )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise StudyError(f"seeds must be distinct and at least one, got {list(self.seeds)}")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StudyError(f"{name} must be a positive int, got {value!r}")
        if not self.learning_rate > 0:
            raise StudyError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.selection not in ("metric", "loss"):
            raise StudyError(f"selection must be 'metric' or 'loss', got {self.selection!r}")
        if self.precision not in ("float32", "bfloat16"):
            raise StudyError(f"precision must be 'float32' or 'bfloat16', got {self.precision!r}")

    def to_json(self) -> dict[str, Any]:
        """The configuration as plain JSON values (what ``study.json`` holds)."""
        data = dataclasses.asdict(self)
        data["methods"], data["seeds"] = list(self.methods), list(self.seeds)
        data["extra"] = dict(self.extra)
        return data


def parse_seeds(spec: str | int | Sequence[int]) -> tuple[int, ...]:
    """Seeds from ``"0,1,2"``, a count (``3`` or ``"3"`` means 0, 1, 2) or a sequence.

    Example:
        >>> from dstmtl.study.config import parse_seeds
        >>> parse_seeds("3"), parse_seeds("4,7")
        ((0, 1, 2), (4, 7))
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        seeds: tuple[int, ...] = tuple(range(spec)) if spec > 0 else ()
    elif isinstance(spec, str):
        parts = [part.strip() for part in spec.split(",")]
        try:
            numbers = [int(part) for part in parts]
        except ValueError:
            raise StudyError(
                f"seeds {spec!r} do not parse; give a count (3 means 0,1,2) or a "
                "comma-separated list of integers (0,1,2)"
            ) from None
        seeds = tuple(range(numbers[0])) if len(numbers) == 1 else tuple(numbers)
        if len(numbers) == 1 and numbers[0] < 1:
            seeds = ()
    elif isinstance(spec, bool):
        seeds = ()
    else:
        seeds = tuple(int(seed) for seed in spec)
    if not seeds or len(set(seeds)) != len(seeds):
        raise StudyError(
            f"seeds {spec!r}: need at least one seed and no seed twice; e.g. 3 or 0,1,2"
        )
    return seeds
