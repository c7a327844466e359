"""The record types of a study's results (plain JSON values), apart from the report writer,
so that training does not import matplotlib."""

from __future__ import annotations

from typing import Any, TypedDict

__all__ = ["EpochRecord", "RunResult", "StudyResults"]


class EpochRecord(TypedDict):
    """One epoch of one run.

    ``train_loss`` may hold NaN (a task without a labelled sample all epoch), written as
    ``null``. ``keep_probabilities`` and ``gates`` are those drawn at the end of the epoch,
    which decide the next epoch's updates; ``dropped`` lists the tasks whose gate was off
    during this epoch. ``valid`` maps each task to its metrics, and ``valid_score`` is the
    model-selection score (higher is better).
    """

    epoch: int
    train_loss: dict[str, float]
    keep_probabilities: dict[str, float]
    gates: dict[str, bool]
    dropped: list[str]
    valid: dict[str, dict[str, float]]
    valid_loss: dict[str, float]
    valid_score: float
    seconds: float


class RunResult(TypedDict):
    """One method and seed: its epochs, the epoch selected on validation and its test scores.

    ``first_drop_epoch`` is the first epoch in which DST dropped a task (``None`` when none
    did); ``selected_before_first_drop`` says whether the selected weights are older than
    it, so identical to an equal-weight run's. ``peak_memory_bytes`` is the accelerator's
    peak allocation during the run, ``None`` on the CPU (not measured there).
    """

    method: str
    seed: int
    description: str
    epochs: list[EpochRecord]
    selected_epoch: int
    dropping_epochs: int
    first_drop_epoch: int | None
    selected_before_first_drop: bool
    test: dict[str, dict[str, float]]
    wall_seconds: float
    peak_memory_bytes: int | None


class StudyResults(TypedDict):
    """The whole study: its configuration, the runs by ``"<method>/seed<seed>"`` and the
    statistics over seeds (see :func:`dstmtl.study.report.statistics`)."""

    config: dict[str, Any]
    environment: dict[str, Any]
    runs: dict[str, RunResult]
    statistics: dict[str, Any]
