"""Train and test every method x seed of a study, resumable after a kill at any point.

Under torchrun (``WORLD_SIZE`` > 1 in the environment) the study joins the process group,
trains each model with DistributedDataParallel on shards of the training split, evaluates
the whole validation and test splits in every process, and writes its files from the first
process only.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, Union, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

import dstmtl
from dstmtl.loss import MaskedMultiTaskLoss
from dstmtl.multihead import MultiHeadNet
from dstmtl.study._atomic import replacing, write_bytes
from dstmtl.study._errors import StudyError
from dstmtl.study.config import StudyConfig, higher_is_better
from dstmtl.study.evaluation import Targets, evaluate
from dstmtl.study.methods import (
    Method,
    check_method_names,
    is_single_task,
    needs_one_process,
)
from dstmtl.study.records import EpochRecord, Hardware, RunResult, Session, StudyResults

__all__ = ["BatchSource", "Data", "Processes", "batches", "join_processes", "run_study"]

_STUDY_FILE = "study.json"
_SESSIONS_FILE = "sessions.json"
# 2: the methods' checkpoints hold their own loss sums (no scheduler for non-DST methods).
_FORMAT = 2
_T = TypeVar("_T")


class BatchSource(Protocol):
    """Yields ``(inputs, targets)`` batches of one split for an epoch and a seed; the order
    must depend on nothing else, so that every method of a seed sees the same data.

    Under torchrun the training split's source is also given ``rank=`` and
    ``world_size=`` and must yield that process's shard: give it those two keyword
    arguments with the defaults 0 and 1. A source may yield batches already on the device,
    and does its own preprocessing and augmentation (seeded by ``epoch`` and ``seed``).
    It may have a ``targets`` attribute, the split's ``[N, K]`` targets, which the harness
    then reads instead of going through the split.
    """

    def __call__(self, *, epoch: int, seed: int) -> Iterable[tuple[Tensor, Targets]]: ...


Data = Union["Dataset[Any]", BatchSource]
"""One split's data, a torch ``Dataset`` of ``(input, target)`` samples or a
:class:`BatchSource`."""


def batches(
    data: Data,
    *,
    batch_size: int,
    epoch: int,
    seed: int,
    shuffle: bool,
    rank: int = 0,
    world_size: int = 1,
) -> Iterable[tuple[Tensor, Targets]]:
    """The batches of one split for one epoch, as a study trains on them.

    A ``Dataset`` is batched by a ``DataLoader`` (shuffled with the seed ``seed * 1000 +
    epoch``; over ``world_size`` processes, this process's shard, the last incomplete
    shard dropped); a :class:`BatchSource` is called. The benchmarks time the same batches.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from dstmtl.study.harness import batches
        >>> data = TensorDataset(torch.arange(6.0).unsqueeze(1), torch.zeros(6, 2))
        >>> [x.flatten().tolist() for x, _ in batches(data, batch_size=4, epoch=0, seed=0,
        ...                                           shuffle=False)]
        [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0]]
    """
    if isinstance(data, Dataset):
        if world_size > 1:
            sampler: DistributedSampler[Any] = DistributedSampler(
                data, world_size, rank, shuffle=shuffle, seed=seed * 1000 + epoch, drop_last=True
            )
            return DataLoader(data, batch_size=batch_size, sampler=sampler)
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator)
    if world_size > 1:
        shard = cast(Callable[..., Iterable[tuple[Tensor, Targets]]], data)
        return shard(epoch=epoch, seed=seed, rank=rank, world_size=world_size)
    return data(epoch=epoch, seed=seed)


@dataclass(frozen=True)
class Processes:
    """This process's place among torchrun's processes: rank 0 of 1 without torchrun.

    Get it from :func:`join_processes`, to prepare data once (in the first process) before
    :func:`run_study`, which then uses the same process group.
    """

    rank: int
    world_size: int
    device: torch.device

    @property
    def first(self) -> bool:
        """Whether this is the first process, the one that writes files."""
        return self.rank == 0

    def on_first(self, work: Callable[[], _T]) -> _T:
        """``work()`` in the first process only, its result in every process.

        An exception in the first process is raised there and, as a
        :class:`~dstmtl.study.config.StudyError` with its message, in every other one, so that
        none waits for a process that stopped.
        """
        if self.world_size == 1:
            return work()
        box: list[Any] = [None, None]
        failure: Exception | None = None
        if self.first:
            try:
                box[0] = work()
            except Exception as error:
                failure, box[1] = error, str(error) or repr(error)
        dist.broadcast_object_list(box, src=0)
        if failure is not None:
            raise failure
        if box[1] is not None:
            raise StudyError(f"the first process stopped: {box[1]}")
        result: _T = box[0]
        return result

    def check_methods(self, methods: Sequence[str]) -> None:
        """Refuse, before any data work, methods that cannot run on these processes: under
        torchrun those whose state each process would build from its own shard alone; and
        unknown names anywhere."""
        check_method_names(methods)
        single = [name for name in methods if needs_one_process(name)]
        if self.world_size > 1 and single:
            raise StudyError(
                f"methods {single} keep state that each torchrun process would build from its "
                "own shard; run them in one process (python, not torchrun) or leave them out"
            )


def join_processes(device: str | torch.device | None = None) -> tuple[Processes, bool]:
    """This process's rank and device, joining torchrun's process group if there is one and
    nobody joined it yet (NCCL on CUDA, gloo on the CPU).

    Returns:
        The :class:`Processes`, and whether the group was joined here: then the caller
        leaves it at the end (``torch.distributed.destroy_process_group()``).

    Example:
        >>> from dstmtl.study.harness import join_processes
        >>> processes, joined = join_processes("cpu")  # no torchrun here
        >>> processes.rank, processes.world_size, processes.device, joined
        (0, 1, device(type='cpu'), False)
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = torch.device(device) if device is not None else None
    cuda = torch.cuda.is_available() if wanted is None else wanted.type == "cuda"
    if world_size == 1:
        chosen = wanted or torch.device("cuda" if cuda else "cpu")
        if chosen.type == "cuda" and chosen.index is None:
            chosen = torch.device("cuda", torch.cuda.current_device())
        return Processes(0, 1, chosen), False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(chosen)
    joined = not dist.is_initialized()
    if joined:
        # The first process may prepare data for long while the others wait in a collective;
        # NCCL's default 10-minute timeout would end the job meanwhile.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    return Processes(dist.get_rank(), dist.get_world_size(), chosen), joined


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
    overwrite: bool = False,
    progress: bool = True,
    compile: bool = False,
    info: Mapping[str, Any] | None = None,
    command: Sequence[str] | None = None,
) -> StudyResults:
    """Run every method of ``config`` with every seed, then write the report into ``out``.

    Per seed, every method starts from the same initial weights (``torch.manual_seed(seed)``
    before ``model_factory()``) and sees the same training batches in the same order. Each
    epoch ends with an atomic checkpoint; each run's epoch is selected on ``valid`` only and
    ``test`` is evaluated once, with the selected weights. ``resume=True`` continues a study
    in ``out`` whose ``study.json`` holds the same configuration, and gives the results an
    uninterrupted study gives. Every check (the data's targets, the methods, the folder)
    comes before anything is written, so a refused start leaves nothing behind.

    Args:
        config: The study.
        model_factory: Builds a fresh :class:`~dstmtl.MultiHeadNet` with one head per task.
        train, valid, test: Datasets of ``(input, target)`` samples (see
            :data:`~dstmtl.study.evaluation.Targets`), batched here with
            ``config.batch_size`` (training shuffled by seed and epoch), or batch sources
            (see :class:`BatchSource`).
        out: The study's folder (``study.json``, ``sessions.json``, ``checkpoints/``,
            ``metrics.json``, ``results.md``, figures).
        device: Where to train; CUDA when available by default (under torchrun, the GPU of
            the process's ``LOCAL_RANK``).
        resume: Continue the study in ``out``.
        overwrite: Replace the study in ``out`` (only a folder that holds a study).
        progress: tqdm bars; one line per epoch is printed either way.
        compile: ``torch.compile`` the training forward pass.
        info: Your description of the data and the model (JSON values: a dataset name, a
            folder, class rates), shown in the report and kept in ``metrics.json``; unlike
            ``config.extra`` it is not compared on resume.
        command: The command line recorded in ``sessions.json`` (``sys.argv`` by
            default), for a script that calls its ``main(argv)``.

    Raises:
        StudyError: A problem you can fix (the message says how): targets that do not
            match the tasks, an empty split, a folder that holds files or cannot be
            created, a resume whose configuration differs, a method that cannot run under
            torchrun.
    """
    out = Path(out)
    processes, joined = join_processes(device)
    try:
        return _study(
            config,
            model_factory,
            (train, valid, test),
            out,
            processes,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            compile=compile,
            info=dict(info or {}),
            command=list(sys.argv if command is None else command),
        )
    finally:
        if joined:
            dist.destroy_process_group()


def _study(
    config: StudyConfig,
    model_factory: Callable[[], MultiHeadNet],
    data: tuple[Data, Data, Data],
    out: Path,
    processes: Processes,
    *,
    resume: bool,
    overwrite: bool,
    progress: bool,
    compile: bool,
    info: dict[str, Any],
    command: list[str],
) -> StudyResults:
    tasks = config.tasks
    if processes.world_size > 1:
        processes.check_methods(config.methods)
        _check_sharded_source(data[0])
    for name, split in zip(("train", "valid", "test"), data, strict=True):
        _check_targets(split, name, config)
    binary = any(task.kind == "binary" for task in tasks.values())
    # Read once, for DST's label-count term and the majority baselines.
    train_targets = (
        _all_targets(data[0], config) if binary or _needs_train_targets(config) else None
    )
    baselines = {"majority": _majority(train_targets, data[2], config)}
    started = _now()
    processes.on_first(lambda: _prepare(out, config, resume=resume, overwrite=overwrite))
    session = Session(
        started=started,
        finished=None,
        argv=command,
        launcher=_launcher(processes.world_size),
        world_size=processes.world_size,
        effective_batch_size=config.batch_size * processes.world_size,
        hardware=_hardware(processes.device),
        load_at_start=_load(),
        load_at_end=None,
    )
    sessions: list[Session] = processes.on_first(lambda: _add_session(out, session, resume))
    loss_fn = MaskedMultiTaskLoss({name: task.kind for name, task in tasks.items()}).to(
        processes.device
    )
    runs: dict[str, RunResult] = {}
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
                    data,
                    train_targets,
                    loss_fn,
                    out,
                    processes,
                    progress=progress,
                    compile=compile,
                )
                for only in only_tasks
            ]
            runs[f"{method}/seed{seed}"] = _merge_single_task(parts) if len(parts) > 1 else parts[0]
    sessions[-1] = Session(**{**sessions[-1], "finished": _now(), "load_at_end": _load()})
    results = StudyResults(
        config=config.to_json(),
        info=info,
        environment={"dstmtl": dstmtl.__version__, "torch": torch.__version__},
        sessions=sessions,
        baselines=baselines,
        runs=runs,
        statistics={},
    )
    from dstmtl.study.report import statistics, write_report

    results["statistics"] = statistics(results, config)
    if processes.first:
        _write_sessions(out, sessions)
        write_report(results, config, out)
    return results


def _run(
    method_name: str,
    seed: int,
    only_task: str | None,
    config: StudyConfig,
    model_factory: Callable[[], MultiHeadNet],
    data: tuple[Data, Data, Data],
    train_targets: Tensor | None,
    loss_fn: MaskedMultiTaskLoss,
    out: Path,
    processes: Processes,
    *,
    progress: bool,
    compile: bool,
) -> RunResult:
    device = processes.device
    suffix = "" if only_task is None else f"-{only_task}"
    path = out / "checkpoints" / f"{method_name}-seed{seed}{suffix}.pt"
    state = torch.load(path, map_location=device, weights_only=True) if path.exists() else None
    if state is not None and "result" in state:
        finished: RunResult = state["result"]
        return finished
    train, valid, test = data
    torch.manual_seed(seed)  # the same initial weights for every method of this seed
    model = model_factory().to(device)
    network: nn.Module = model
    if processes.world_size > 1:
        network = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if compile:
        network = torch.compile(network)  # type: ignore[assignment]
    autocast = _autocast(config, device)
    method = Method(
        method_name,
        model,
        loss_fn,
        learning_rate=config.learning_rate,
        seed=seed,
        epochs=config.epochs,
        train_labels=train_targets,
        only_task=only_task,
        network=network,
        autocast=autocast,
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
    show = progress and processes.first
    for epoch in range(first_epoch, config.epochs):
        started = time.perf_counter()
        # Re-seeded per epoch, so a resumed run draws what an uninterrupted one draws.
        torch.manual_seed(seed * 1000 + epoch)
        model.train()
        dropped = [task for task, kept in method.gates.items() if not kept]
        epoch_batches = batches(
            train,
            batch_size=config.batch_size,
            epoch=epoch,
            seed=seed,
            shuffle=True,
            rank=processes.rank,
            world_size=processes.world_size,
        )
        for inputs, targets in _bar(epoch_batches, f"{label} epoch {epoch + 1}", show):
            method.step(inputs.to(device), _to_device(targets, device))
        method.end_epoch()
        with autocast():
            valid_metrics, valid_loss = evaluate(
                model,
                _bar(_eval_batches(valid, config, device), "valid", show),
                config.tasks,
                loss_fn,
            )
        score = _selection_score(valid_metrics, valid_loss, config, only_task)
        history.append(
            EpochRecord(
                epoch=epoch,
                train_loss=method.epoch_losses,
                keep_probabilities=method.keep_probabilities,
                gates=method.gates,
                dropped=dropped,
                terms=method.terms,
                loss_weights=method.loss_weights,
                valid=valid_metrics,
                valid_loss=valid_loss,
                valid_score=score,
                seconds=time.perf_counter() - started,
            )
        )
        if processes.first:
            # One line per epoch that survives in a log, where the bars are erased.
            tqdm.write(_epoch_line(label, history[-1], config.epochs))
        # Model selection on the validation split only; the test split is read once, below.
        if score > best["score"]:
            weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            best = {"epoch": epoch, "score": score, "model": weights}
        if processes.first:
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
    with autocast():
        test_metrics, _ = evaluate(
            model, _bar(_eval_batches(test, config, device), "test", show), config.tasks, loss_fn
        )
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
    if processes.first:
        _save(path, {"result": dict(result), "model": best["model"]})
    return result


def _epoch_line(label: str, record: EpochRecord, epochs: int) -> str:
    losses = [v for v in record["train_loss"].values() if math.isfinite(v)]
    mean_loss = sum(losses) / len(losses) if losses else math.nan
    dropped = record["dropped"]
    return (
        f"{label} epoch {record['epoch'] + 1}/{epochs}: train loss {mean_loss:.4f}, valid score "
        f"{record['valid_score']:.4f}, {record['seconds']:.1f} s"
        + (f", dropped {', '.join(dropped)}" if dropped else "")
    )


def _bar(
    iterable: Iterable[tuple[Tensor, Targets]], description: str, show: bool
) -> Iterable[tuple[Tensor, Targets]]:
    bar: Iterable[tuple[Tensor, Targets]] = tqdm(
        iterable,
        desc=description,
        total=len(iterable) if isinstance(iterable, Sized) else None,
        leave=False,
        disable=not show,
        unit="batch",
    )
    return bar


def _autocast(
    config: StudyConfig, device: torch.device
) -> Callable[[], AbstractContextManager[Any]]:
    if config.precision == "bfloat16":
        return lambda: torch.autocast(device.type, torch.bfloat16)
    return contextlib.nullcontext


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


def _to_device(targets: Targets, device: torch.device) -> Targets:
    if isinstance(targets, Tensor):
        return targets.to(device, non_blocking=True)
    return {task: target.to(device, non_blocking=True) for task, target in targets.items()}


def _eval_batches(
    data: Data, config: StudyConfig, device: torch.device
) -> Iterable[tuple[Tensor, Targets]]:
    for inputs, targets in batches(
        data, batch_size=config.batch_size, epoch=0, seed=0, shuffle=False
    ):
        yield inputs.to(device, non_blocking=True), _to_device(targets, device)


def _check_targets(data: Data, split: str, config: StudyConfig) -> None:
    names = list(config.tasks)
    for _, targets in batches(data, batch_size=config.batch_size, epoch=0, seed=0, shuffle=False):
        if isinstance(targets, Mapping):
            if set(targets) != set(names):
                raise StudyError(
                    f"the {split} targets are for the tasks {sorted(targets)}, the study's are "
                    f"{names}: give one target per task, keyed by task name"
                )
        elif targets.ndim != 2 or targets.shape[1] != len(names):
            raise StudyError(
                f"the {split} targets have shape {tuple(targets.shape)}, expected [batch, "
                f"{len(names)}]: one column per task ({', '.join(names)}), NaN where a "
                "label is missing; dense tasks take a {task: tensor} mapping"
            )
        return
    raise StudyError(f"the {split} split is empty; every split needs samples")


def _check_sharded_source(train: Data) -> None:
    if not isinstance(train, Dataset):
        parameters = inspect.signature(train).parameters
        if not {"rank", "world_size"} <= parameters.keys() and not any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
        ):
            raise StudyError(
                "under torchrun the training batch source is called with rank= and "
                "world_size= and must yield that process's shard; add those two keyword "
                "arguments (defaults 0 and 1)"
            )


def _needs_train_targets(config: StudyConfig) -> bool:
    return any("labels" in name or name == "dst-all" for name in config.methods)


def _all_targets(data: Data, config: StudyConfig) -> Tensor | None:
    """A split's ``[N, K]`` targets: its ``targets`` attribute where it has one, else read
    batch by batch; ``None`` for dense targets."""
    targets = getattr(data, "targets", None)
    if isinstance(targets, Tensor) and targets.ndim == 2 and targets.shape[1] == len(config.tasks):
        return targets.detach().float().cpu()
    parts = []
    for _, batch in batches(data, batch_size=config.batch_size, epoch=0, seed=0, shuffle=False):
        if not isinstance(batch, Tensor):
            return None
        parts.append(batch.detach().float().cpu())
    return torch.cat(parts)


def _majority(train: Tensor | None, test: Data, config: StudyConfig) -> dict[str, float]:
    """Each binary task's test accuracy when always predicting its training majority class,
    over the labelled test samples; the floor any model must beat. Empty without binary
    tasks, and for dense targets."""
    binary = [j for j, task in enumerate(config.tasks.values()) if task.kind == "binary"]
    if not binary or train is None:
        return {}
    test_targets = _all_targets(test, config)
    if test_targets is None:
        return {}
    names = list(config.tasks)
    found = {}
    for j in binary:
        known = train[:, j][~train[:, j].isnan()]
        truth = test_targets[:, j][~test_targets[:, j].isnan()]
        if len(known) and len(truth):
            majority = float(known.mean() >= 0.5)
            found[names[j]] = float((truth == majority).float().mean())
    return found


def _prepare(out: Path, config: StudyConfig, *, resume: bool, overwrite: bool) -> None:
    study_file = out / _STUDY_FILE
    wanted = {"format": _FORMAT, "config": config.to_json()}
    # The JSON round trip makes tuples lists, as they are in the file.
    wanted = json.loads(json.dumps(wanted))
    if resume and overwrite:
        raise StudyError(
            "resume continues the study in the folder, overwrite replaces it: choose one"
        )
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
            if not overwrite:
                raise StudyError(
                    f"{out} already holds files; resume the study there (resume=True, "
                    "--resume in the examples), replace it (overwrite=True, --overwrite), or "
                    "choose another folder"
                )
            if not study_file.exists():
                raise StudyError(
                    f"overwrite replaces only a study folder, and {out} holds no {_STUDY_FILE}; "
                    "choose another folder"
                )
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        write_bytes(study_file, (json.dumps(wanted, indent=2) + "\n").encode())
    except OSError as error:
        raise StudyError(
            f"cannot create the study folder {out}: {error.strerror or error}; choose a folder "
            "you can write to"
        ) from error


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> str:
    """Every differing field, nested ones by their dotted path (``extra.data.labels``)."""
    changes: list[str] = []

    def compare(old: Any, new: Any, path: str) -> None:
        if isinstance(old, dict) and isinstance(new, dict):
            for key in sorted(old.keys() | new.keys()):
                compare(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        elif old != new:
            changes.append(f"{path}: was {old!r}, now {new!r}")

    compare(saved.get("format"), wanted["format"], "format")
    compare(saved.get("config", {}), wanted["config"], "")
    return ", ".join(changes)


def _add_session(out: Path, session: Session, resume: bool) -> list[Session]:
    path = out / _SESSIONS_FILE
    sessions: list[Session] = json.loads(path.read_text()) if resume and path.exists() else []
    sessions.append(session)
    _write_sessions(out, sessions)
    return sessions


def _write_sessions(out: Path, sessions: list[Session]) -> None:
    write_bytes(out / _SESSIONS_FILE, (json.dumps(sessions, indent=2) + "\n").encode())


def _launcher(world_size: int) -> list[str]:
    """How the processes were started, so that the record reproduces the run."""
    if world_size == 1:
        return [Path(sys.executable).name]
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return ["torchrun", f"--nnodes={world_size // per_node}", f"--nproc-per-node={per_node}"]


def _hardware(device: torch.device) -> Hardware:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cpu = _cpu_name()
    return Hardware(
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        cpu=cpu,
        gpus=gpus,
    )


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def _save(path: Path, state: dict[str, Any]) -> None:
    with replacing(path) as temporary:
        torch.save(state, temporary)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _load() -> list[float] | None:
    """The host's 1, 5 and 15-minute load averages, where the system reports them."""
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None
