"""The record types of a study's results (plain JSON values), apart from the report writer,
so that training does not import matplotlib."""

from __future__ import annotations

from typing import Any, TypedDict

__all__ = ["EpochRecord", "Hardware", "RunResult", "Session", "StudyResults"]


class EpochRecord(TypedDict):
    """One epoch of one run.

    ``train_loss`` may hold NaN (a task without a labelled sample all epoch), written as
    ``null``. ``keep_probabilities`` and ``gates`` are those drawn at the end of the epoch,
    which decide the next epoch's updates; ``dropped`` lists the tasks whose gate was off
    during this epoch. ``terms`` (each DST term's value per task) and ``loss_weights`` are
    empty for methods that drop no task. ``valid`` maps each task to its metrics, and
    ``valid_score`` is the model-selection score (higher is better).
    """

    epoch: int
    train_loss: dict[str, float]
    keep_probabilities: dict[str, float]
    gates: dict[str, bool]
    dropped: list[str]
    terms: dict[str, dict[str, float]]
    loss_weights: dict[str, float]
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


class Hardware(TypedDict):
    """What a session ran on: the device, its name, the host's CPU and the GPUs it saw."""

    device: str
    device_name: str
    cpu: str
    gpus: int


class Session(TypedDict):
    """One start of a study, the first or a resume.

    ``launcher`` is how the processes were started (``["python"]``, or torchrun with its
    process count), ``world_size`` the number of processes and ``effective_batch_size`` the
    batch of one optimizer step over all of them. ``load_at_start`` and ``load_at_end`` are
    the host's 1, 5 and 15-minute load averages (``None`` where the system has none, and at
    the end of a session that did not finish): wall times are only comparable under the
    same load.
    """

    started: str
    finished: str | None
    argv: list[str]
    launcher: list[str]
    world_size: int
    effective_batch_size: int
    hardware: Hardware
    load_at_start: list[float] | None
    load_at_end: list[float] | None


class StudyResults(TypedDict):
    """The whole study.

    ``config`` is the :class:`~dstmtl.study.config.StudyConfig` as JSON; ``info`` the
    caller's description of the data (shown in the report, not compared on resume);
    ``environment`` the versions; ``sessions`` every start; ``baselines["majority"]`` each
    binary task's test accuracy when always predicting the training majority class; ``runs``
    by ``"<method>/seed<seed>"``; ``statistics`` over seeds (see
    :func:`dstmtl.study.report.statistics`).
    """

    config: dict[str, Any]
    info: dict[str, Any]
    environment: dict[str, Any]
    sessions: list[Session]
    baselines: dict[str, dict[str, float]]
    runs: dict[str, RunResult]
    statistics: dict[str, Any]
