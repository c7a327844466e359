"""Train and test every method x seed of a study, resumable after a kill at any point."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sized
from pathlib import Path
from typing import Any, Protocol, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import dstmtl
from dstmtl.loss import MaskedMultiTaskLoss
from dstmtl.multihead import MultiHeadNet
from dstmtl.study._atomic import replacing, write_bytes
from dstmtl.study._errors import StudyError
from dstmtl.study.config import StudyConfig, higher_is_better
from dstmtl.study.evaluation import evaluate
from dstmtl.study.methods import Method, is_single_task
from dstmtl.study.records import EpochRecord, RunResult, StudyResults

__all__ = ["BatchSource", "Data", "run_study"]

_STUDY_FILE = "study.json"
_FORMAT = 1


class BatchSource(Protocol):
    """Yields ``(inputs, targets [B, K])`` batches of one split for an epoch and a seed; the
    order must depend on nothing else, so that every method of a seed sees the same data."""

    def __call__(self, *, epoch: int, seed: int) -> Iterable[tuple[Tensor, Tensor]]: ...


Data = Union["Dataset[Any]", BatchSource]
"""One split's data, a torch ``Dataset`` or a :class:`BatchSource`."""


def run_study(
    config: StudyConfig,
    model_factory: Callable[[], MultiHeadNet],
    train: Data,
    valid: Data,
    test: Data,
    out: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    resume: bool = False,
    progress: bool = True,
) -> StudyResults:
    """Run every method of ``config`` with every seed, then write the report into ``out``.

    Per seed, every method starts from the same initial weights (``torch.manual_seed(seed)``
    before ``model_factory()``) and sees the same training batches in the same order. Each
    epoch ends with an atomic checkpoint; each run's epoch is selected on ``valid`` only and
    ``test`` is evaluated once, with the selected weights. ``resume=True`` continues a study
    in ``out`` whose ``study.json`` holds the same configuration, and gives the results an
    uninterrupted study gives.

    Args:
        config: The study.
        model_factory: Builds a fresh :class:`~dstmtl.MultiHeadNet` with one head per task.
        train, valid, test: Datasets of ``(input, target [K])`` samples (NaN = missing
            label; a class index as a float for multiclass tasks), batched here with
            ``config.batch_size`` (training shuffled by seed and epoch), or batch sources
            called as ``source(epoch=..., seed=...)``.
        out: The study's folder (``study.json``, ``checkpoints/``, ``metrics.json``,
            ``results.md``, figures).
        device: Where to train; CUDA when available by default.
        resume: Continue the study in ``out``.
        progress: tqdm bars and one line per epoch.
    """
    out = Path(out)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tasks = config.tasks
    # Everything that can be checked is checked before anything is written.
    for name, split in (("train", train), ("valid", valid), ("test", test)):
        _check_targets(split, name, len(tasks), config)
    _prepare(out, config, resume=resume)
    train_labels = _labels(train, config)
    loss_fn = MaskedMultiTaskLoss({name: task.kind for name, task in tasks.items()}).to(target)
    runs: dict[str, RunResult] = {}
    environment = {
        "dstmtl": dstmtl.__version__,
        "torch": torch.__version__,
        "device": str(target),
        "load_at_start": _load(),
    }
    for seed in config.seeds:
        for method in config.methods:
            only_tasks: list[str | None] = list(tasks) if is_single_task(method) else [None]
            parts = [
                _run(
                    method,
                    seed,
                    only,
                    config,
                    model_factory,
                    (train, valid, test),
                    train_labels,
                    loss_fn,
                    out,
                    target,
                    progress,
                )
                for only in only_tasks
            ]
            runs[f"{method}/seed{seed}"] = _merge_single_task(parts) if len(parts) > 1 else parts[0]
    environment["load_at_end"] = _load()
    results = StudyResults(
        config=config.to_json(), environment=environment, runs=runs, statistics={}
    )
    from dstmtl.study.report import statistics, write_report

    results["statistics"] = statistics(results, config)
    write_report(results, config, out)
    return results


def _run(
    method_name: str,
    seed: int,
    only_task: str | None,
    config: StudyConfig,
    model_factory: Callable[[], MultiHeadNet],
    data: tuple[Data, Data, Data],
    train_labels: Tensor | None,
    loss_fn: MaskedMultiTaskLoss,
    out: Path,
    device: torch.device,
    progress: bool,
) -> RunResult:
    suffix = "" if only_task is None else f"-{only_task}"
    path = out / "checkpoints" / f"{method_name}-seed{seed}{suffix}.pt"
    state = torch.load(path, map_location=device, weights_only=True) if path.exists() else None
    if state is not None and "result" in state:
        finished: RunResult = state["result"]
        return finished
    train, valid, test = data
    torch.manual_seed(seed)  # the same initial weights for every method of this seed
    model = model_factory().to(device)
    method = Method(
        method_name,
        model,
        loss_fn,
        learning_rate=config.learning_rate,
        seed=seed,
        train_labels=train_labels,
        only_task=only_task,
    ).to(device)
    history: list[EpochRecord] = []
    best: dict[str, Any] = {"epoch": -1, "score": -math.inf, "model": None}
    first_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        method.load_state_dict(state["method"])
        history, best, first_epoch = state["history"], state["best"], state["epoch"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    label = f"{method_name}{suffix} seed {seed}"
    for epoch in range(first_epoch, config.epochs):
        started = time.perf_counter()
        # Re-seeded per epoch, so a resumed run draws what an uninterrupted one draws.
        torch.manual_seed(seed * 1000 + epoch)
        model.train()
        batches = _batches(train, config, epoch=epoch, seed=seed, shuffle=True)
        bar = tqdm(
            batches,
            desc=f"{label} epoch {epoch + 1}/{config.epochs}",
            total=len(batches) if isinstance(batches, Sized) else None,
            leave=False,
            disable=not progress,
            unit="batch",
        )
        for inputs, targets in bar:
            method.step(inputs.to(device), targets.to(device))
        dropped = [task for task, kept in method.scheduler.gates.items() if not kept]
        method.end_epoch()
        valid_metrics, valid_loss = evaluate(
            model, _device_batches(valid, config, device), config.tasks, loss_fn
        )
        score = _selection_score(valid_metrics, valid_loss, config, only_task)
        history.append(
            EpochRecord(
                epoch=epoch,
                train_loss=method.scheduler.epoch_losses,
                keep_probabilities=method.scheduler.keep_probabilities,
                gates=method.scheduler.gates,
                dropped=dropped,
                valid=valid_metrics,
                valid_loss=valid_loss,
                valid_score=score,
                seconds=time.perf_counter() - started,
            )
        )
        if progress:
            losses = [v for v in history[-1]["train_loss"].values() if math.isfinite(v)]
            mean_loss = sum(losses) / len(losses) if losses else math.nan
            tqdm.write(
                f"{label} epoch {epoch + 1}/{config.epochs}: train loss {mean_loss:.4f}, "
                f"valid score {score:.4f}" + (f", dropped {', '.join(dropped)}" if dropped else "")
            )
        # Model selection on the validation split only; the test split is read once, below.
        if score > best["score"]:
            weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            best = {"epoch": epoch, "score": score, "model": weights}
        _save(
            path,
            {
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "method": method.state_dict(),
                "history": history,
                "best": best,
            },
        )
    if best["model"] is None:
        raise StudyError(
            f"{label}: no epoch had a finite validation score (is every validation label "
            "missing?); give a validation split with labels"
        )
    model.load_state_dict(best["model"])
    test_metrics, _ = evaluate(model, _device_batches(test, config, device), config.tasks, loss_fn)
    drops = [record["epoch"] for record in history if record["dropped"]]
    result = RunResult(
        method=method_name,
        seed=seed,
        description=method.description,
        epochs=history,
        selected_epoch=best["epoch"],
        dropping_epochs=len(drops),
        first_drop_epoch=drops[0] if drops else None,
        selected_before_first_drop=bool(
            method.drops_tasks and (not drops or best["epoch"] < drops[0])
        ),
        test=test_metrics,
        wall_seconds=sum(record["seconds"] for record in history),
        peak_memory_bytes=int(torch.cuda.max_memory_allocated(device))
        if device.type == "cuda"
        else None,
    )
    _save(path, {"result": dict(result), "model": best["model"]})
    return result


def _merge_single_task(parts: list[RunResult]) -> RunResult:
    """One ``stl`` result from its single-task runs: each task's scores from its own model."""
    tasks = list(parts[0]["test"])
    merged = dict(parts[0])
    merged["test"] = {task: part["test"][task] for task, part in zip(tasks, parts, strict=True)}
    merged["wall_seconds"] = sum(part["wall_seconds"] for part in parts)
    memory = [part["peak_memory_bytes"] for part in parts if part["peak_memory_bytes"] is not None]
    merged["peak_memory_bytes"] = max(memory) if memory else None
    merged["selected_epoch"] = -1  # one per task, in the parts' checkpoints
    result: RunResult = RunResult(**merged)  # type: ignore[typeddict-item]
    return result


def _selection_score(
    metrics: dict[str, dict[str, float]],
    losses: dict[str, float],
    config: StudyConfig,
    only_task: str | None,
) -> float:
    names = [only_task] if only_task is not None else list(config.tasks)
    if config.selection == "loss":
        values = [-losses[name] for name in names]
    else:
        values = []
        for name in names:
            metric = config.tasks[name].metric
            sign = 1.0 if higher_is_better(metric) else -1.0
            values.append(sign * metrics[name][metric])
    finite = [value for value in values if math.isfinite(value)]
    return sum(finite) / len(finite) if finite else -math.inf


def _batches(
    data: Data, config: StudyConfig, *, epoch: int, seed: int, shuffle: bool
) -> Iterable[tuple[Tensor, Tensor]]:
    if isinstance(data, Dataset):
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        loader: DataLoader[tuple[Tensor, Tensor]] = DataLoader(
            data, batch_size=config.batch_size, shuffle=shuffle, generator=generator
        )
        return loader
    return data(epoch=epoch, seed=seed)


def _device_batches(
    data: Data, config: StudyConfig, device: torch.device
) -> Iterable[tuple[Tensor, Tensor]]:
    for inputs, targets in _batches(data, config, epoch=0, seed=0, shuffle=False):
        yield inputs.to(device), targets.to(device)


def _check_targets(data: Data, split: str, num_tasks: int, config: StudyConfig) -> None:
    for _, targets in _batches(data, config, epoch=0, seed=0, shuffle=False):
        if targets.ndim != 2 or targets.shape[1] != num_tasks:
            raise StudyError(
                f"the {split} targets have shape {tuple(targets.shape)}, expected [batch, "
                f"{num_tasks}]: one column per task ({', '.join(config.tasks)}), NaN where a "
                "label is missing"
            )
        return
    raise StudyError(f"the {split} split is empty; every split needs samples")


def _labels(data: Data, config: StudyConfig) -> Tensor | None:
    """The training targets, for DST's label-count term (only when a method uses it)."""
    if not any("labels" in name or name == "dst-all" for name in config.methods):
        return None
    batches = _batches(data, config, epoch=0, seed=0, shuffle=False)
    return torch.cat([targets.float().cpu() for _, targets in batches])


def _prepare(out: Path, config: StudyConfig, *, resume: bool) -> None:
    study_file = out / _STUDY_FILE
    wanted = {"format": _FORMAT, "config": config.to_json()}
    # The JSON round trip makes tuples lists, as they are in the file.
    wanted = json.loads(json.dumps(wanted))
    if resume:
        if not study_file.exists():
            raise StudyError(f"resume: {out} holds no study to resume (no {_STUDY_FILE})")
        saved = json.loads(study_file.read_text())
        if saved != wanted:
            differing = _differences(saved, wanted)
            raise StudyError(
                f"resume needs the configuration of the interrupted study; {differing}. Run "
                "with that configuration, or start a new study in another folder"
            )
        return
    try:
        if out.exists() and any(out.iterdir()):
            raise StudyError(
                f"{out} already holds files; resume the study there (resume=True), or choose "
                "another folder"
            )
        out.mkdir(parents=True, exist_ok=True)
        write_bytes(study_file, (json.dumps(wanted, indent=2) + "\n").encode())
    except OSError as error:
        raise StudyError(
            f"cannot create the study folder {out}: {error.strerror or error}"
        ) from error


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> str:
    old, new = saved.get("config", {}), wanted["config"]
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if saved.get("format") != wanted["format"]:
        keys.insert(0, "format")
        old, new = {**old, "format": saved.get("format")}, {**new, "format": wanted["format"]}
    return ", ".join(f"{k}: was {old.get(k)!r}, now {new.get(k)!r}" for k in keys)


def _save(path: Path, state: dict[str, Any]) -> None:
    with replacing(path) as temporary:
        torch.save(state, temporary)


def _load() -> list[float] | None:
    """The host's 1, 5 and 15-minute load averages, where the system reports them."""
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None
