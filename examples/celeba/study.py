"""Training, evaluation and checkpointing of one run (one method) of the CelebA study."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist
from atomic import replacing
from image_cache import prepare_batch
from methods import Method
from reporting import EpochRecord, EvaluationMetrics, RunResult
from torch import Tensor
from tqdm import tqdm

from dstmtl import MaskedMultiTaskLoss, MultiHeadNet

# Rows of the per-task confusion counts gathered on the device during evaluation.
_TP, _FP, _FN, _TN = range(4)


class BatchSource(Protocol):
    """Yields (uint8 images [B, 3, S, S], float labels [B, K]) on the training device."""

    def __call__(self, split: str, *, epoch: int) -> Iterable[tuple[Tensor, Tensor]]: ...


@dataclass(frozen=True)
class Settings:
    epochs: int
    learning_rate: float
    seed: int
    device: torch.device
    compile: bool
    progress: bool
    rank: int
    world_size: int
    checkpoint_dir: Path

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def run_method(
    method_name: str,
    build_model: Callable[[], MultiHeadNet],
    batches: BatchSource,
    train_labels: npt.NDArray[np.float32],
    settings: Settings,
) -> RunResult:
    """Train one method from its last checkpoint (or from scratch), then test it.

    Returns the run's entry of ``results["runs"]``. Every epoch ends with an atomic
    checkpoint, so an interrupted run resumes from its last completed epoch and ends with
    the same results as an uninterrupted one (bit for bit on the CPU).
    """
    torch.manual_seed(settings.seed)  # the same initial weights for every method
    model = build_model().to(settings.device).to(memory_format=torch.channels_last)
    method = Method(
        method_name,
        model,
        train_labels,
        seed=settings.seed,
        distributed=settings.world_size > 1,
    )
    for module in method.modules():
        module.to(settings.device)
    parameters = list(model.parameters()) + method.parameters()
    optimizer = torch.optim.Adam(parameters, lr=settings.learning_rate)
    loss_fn = MaskedMultiTaskLoss(dict.fromkeys(model.task_names, "binary"))
    network: torch.nn.Module = model
    if settings.world_size > 1:
        network = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[settings.device.index] if settings.device.type == "cuda" else None
        )
    if settings.compile:
        network = torch.compile(network)  # type: ignore[assignment]

    checkpoint_path = settings.checkpoint_dir / f"{method_name}.pt"
    state = _load_checkpoint(checkpoint_path, settings.device)
    if state is not None and "result" in state:
        finished: RunResult = state["result"]
        return finished
    history: list[EpochRecord] = []
    best: dict[str, Any] = {"epoch": -1, "score": -1.0, "model": None}
    first_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        method.load_state_dict(state["method"])
        history, best, first_epoch = state["history"], state["best"], state["epoch"]

    for epoch in range(first_epoch, settings.epochs):
        started = time.perf_counter()
        _train_epoch(network, model, method, loss_fn, optimizer, batches, epoch, settings)
        valid = scores(
            evaluate(network, batches, "valid", model.task_names, settings), model.task_names
        )
        history.append(
            EpochRecord(
                epoch=epoch,
                train_loss=method.scheduler.epoch_losses,
                keep_probabilities=method.scheduler.keep_probabilities,
                gates=method.scheduler.gates,
                # The other methods' scheduler only gathers losses: its constant term is noise.
                terms=method.scheduler.terms if method.drops_tasks else {},
                loss_weights=method.scheduler.loss_weights,
                valid={"accuracy": valid["accuracy"], "mean_accuracy": valid["mean_accuracy"]},
                seconds=time.perf_counter() - started,
            )
        )
        # Model selection on the validation split only; the test split is read once, below.
        if valid["mean_accuracy"] > best["score"]:
            best = {
                "epoch": epoch,
                "score": valid["mean_accuracy"],
                "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            }
        save_checkpoint(
            checkpoint_path,
            {
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "method": method.state_dict(),
                "history": history,
                "best": best,
            },
            settings,
        )

    model.load_state_dict(best["model"])
    test = scores(evaluate(network, batches, "test", model.task_names, settings), model.task_names)
    result = RunResult(
        method=method_name,
        description=method.description,
        epochs=history,
        selected_epoch=best["epoch"],
        test=test,
        wall_seconds=sum(entry["seconds"] for entry in history),
    )
    save_checkpoint(checkpoint_path, {"result": dict(result)}, settings)
    return result


def _train_epoch(
    network: torch.nn.Module,
    model: MultiHeadNet,
    method: Method,
    loss_fn: MaskedMultiTaskLoss,
    optimizer: torch.optim.Optimizer,
    batches: BatchSource,
    epoch: int,
    settings: Settings,
) -> None:
    """One pass over the training split; nothing in it reads a device value on the host."""
    # Re-seeded per epoch, so a resumed run draws what an uninterrupted one draws.
    torch.manual_seed(settings.seed * 1000 + epoch)
    flips = torch.Generator(settings.device).manual_seed(settings.seed * 1000 + epoch)
    autocast = settings.device.type == "cuda"
    model.train()
    description = f"{method.name} {epoch + 1}/{settings.epochs}"
    for images, labels in _progress(batches("train", epoch=epoch), description, settings):
        x = prepare_batch(images, train=True, generator=flips)
        with torch.autocast(settings.device.type, torch.bfloat16, enabled=autocast):
            features = None
            if method.aggregator is not None:
                features = model.forward_features(x)
                outputs = model.forward_heads(features)
            else:
                outputs = network(x)
            losses = loss_fn(outputs, labels)
        optimizer.zero_grad(set_to_none=True)
        method.backward(losses, loss_fn.label_counts, features)
        optimizer.step()
        method.after_optimizer_step(functools.partial(_losses, network, loss_fn, x, labels))
    method.end_epoch()


def _losses(
    network: torch.nn.Module, loss_fn: MaskedMultiTaskLoss, x: Tensor, labels: Tensor
) -> Tensor:
    losses: Tensor = loss_fn(network(x), labels)
    return losses


def evaluate(
    network: torch.nn.Module,
    batches: BatchSource,
    split: str,
    tasks: tuple[str, ...],
    settings: Settings,
) -> Tensor:
    """Per-task confusion counts ``[4, K]`` (TP, FP, FN, TN) over a whole split.

    The counts stay on the device until the end, so evaluation does not synchronise per
    batch. Every rank evaluates the whole split, which keeps the counts exact without
    padding the split to a multiple of the number of ranks.
    """
    network.eval()
    counts = torch.zeros(4, len(tasks), dtype=torch.long, device=settings.device)
    autocast = settings.device.type == "cuda"
    with torch.no_grad(), torch.autocast(settings.device.type, torch.bfloat16, enabled=autocast):
        for images, labels in _progress(batches(split, epoch=0), split, settings):
            outputs = network(prepare_batch(images, train=False))
            predicted = torch.stack([outputs[t].reshape(-1) > 0 for t in tasks], dim=1)
            labelled = ~labels.isnan()
            positive = labels == 1
            counts[_TP] += (labelled & predicted & positive).sum(dim=0)
            counts[_FP] += (labelled & predicted & ~positive).sum(dim=0)
            counts[_FN] += (labelled & ~predicted & positive).sum(dim=0)
            counts[_TN] += (labelled & ~predicted & ~positive).sum(dim=0)
    return counts.cpu()


def scores(counts: Tensor, tasks: tuple[str, ...]) -> EvaluationMetrics:
    """Accuracy, balanced accuracy and F1 per task from confusion counts, and their means."""
    tp, fp, fn, tn = (counts[row].double() for row in (_TP, _FP, _FN, _TN))
    accuracy = (tp + tn) / (tp + fp + fn + tn).clamp(min=1)
    # A class absent from the split contributes a recall of 0 rather than NaN.
    balanced = (tp / (tp + fn).clamp(min=1) + tn / (tn + fp).clamp(min=1)) / 2
    f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)

    def per_task(values: Tensor) -> dict[str, float]:
        return dict(zip(tasks, values.tolist(), strict=True))

    return EvaluationMetrics(
        accuracy=per_task(accuracy),
        balanced_accuracy=per_task(balanced),
        f1=per_task(f1),
        mean_accuracy=accuracy.mean().item(),
        mean_balanced_accuracy=balanced.mean().item(),
        mean_f1=f1.mean().item(),
    )


def save_checkpoint(path: Path, state: dict[str, Any], settings: Settings) -> None:
    """Write ``state`` atomically on rank 0 (temp file, then rename); other ranks wait."""
    if settings.is_main:
        with replacing(path) as temporary:
            torch.save(state, temporary)
    if settings.world_size > 1:
        dist.barrier()


def _load_checkpoint(path: Path, device: torch.device) -> dict[str, Any] | None:
    if not path.exists():
        return None
    state: dict[str, Any] = torch.load(path, map_location=device, weights_only=True)
    return state


def _progress(
    batches: Iterable[tuple[Tensor, Tensor]], description: str, settings: Settings
) -> Iterable[tuple[Tensor, Tensor]]:
    total = len(batches) if isinstance(batches, Sized) else None
    bar: Iterable[tuple[Tensor, Tensor]] = tqdm(
        batches,
        desc=description,
        total=total,
        leave=False,
        disable=not (settings.progress and settings.is_main),
        unit="batch",
    )
    return bar
