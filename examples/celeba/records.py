"""The record types of the CelebA study's results, apart from the report writer, so that
training does not import matplotlib."""

from __future__ import annotations

from typing import Literal, TypedDict

__all__ = [
    "DatasetName",
    "EpochRecord",
    "EvaluationMetrics",
    "Hardware",
    "Results",
    "RunResult",
    "Session",
    "Study",
    "ValidationMetrics",
]

DatasetName = Literal["celeba", "demo"]


class Hardware(TypedDict):
    device: str
    device_name: str
    cpu: str
    gpus: int
    processes: int


class Session(TypedDict):
    """One start of the study: the first, or a ``--resume``."""

    command: str
    argv: list[str]
    started: str
    hardware: Hardware


class Study(TypedDict):
    """The study's settings; ``command``, ``argv``, ``started`` and ``hardware`` are those of
    its first start, and ``resumed`` lists the later ones."""

    command: str
    argv: list[str]
    dstmtl_version: str
    torch_version: str
    seed: int
    seeds: list[int]
    hardware: Hardware
    dataset: DatasetName
    root: str
    attributes: list[str]
    image_size: int
    batch_size: int
    effective_batch_size: int
    epochs: int
    started: str
    finished: str | None
    resumed: list[Session]
    network_depth: dict[str, int]
    load_average: dict[str, list[float] | None]


class ValidationMetrics(TypedDict):
    accuracy: dict[str, float]
    mean_accuracy: float


class EpochRecord(TypedDict):
    """One epoch of one run.

    ``train_loss`` may hold NaN (a task without a loss that epoch); it is written as
    ``null``, so a record read back from ``metrics.json`` holds ``None`` there instead, which
    every function here accepts. ``terms`` is empty for runs without DST terms and for the
    warm-up epoch. ``keep_probabilities``, ``terms`` and ``gates`` are those computed at the
    end of the epoch, which decide the next epoch's updates.
    """

    epoch: int
    train_loss: dict[str, float]
    keep_probabilities: dict[str, float]
    gates: dict[str, bool]
    terms: dict[str, dict[str, float]]
    loss_weights: dict[str, float]
    valid: ValidationMetrics
    seconds: float


class EvaluationMetrics(TypedDict):
    """Test-split scores of the selected epoch's weights."""

    accuracy: dict[str, float]
    balanced_accuracy: dict[str, float]
    f1: dict[str, float]
    mean_accuracy: float
    mean_balanced_accuracy: float
    mean_f1: float


class RunResult(TypedDict):
    method: str
    seed: int
    description: str
    epochs: list[EpochRecord]
    selected_epoch: int
    test: EvaluationMetrics
    wall_seconds: float


class Results(TypedDict):
    """The whole study; ``runs`` keeps insertion order and its first run is the reference."""

    study: Study
    majority_baseline: dict[str, float]
    test_positive_rate: dict[str, float]
    runs: dict[str, RunResult]
