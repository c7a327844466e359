"""Training, evaluation and checkpointing of one run (one method) of the CelebA study."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist
from image_cache import prepare_batch
from records import EpochRecord, EvaluationMetrics, RunResult
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dstmtl import MaskedMultiTaskLoss, MultiHeadNet
from dstmtl.study._atomic import replacing
from dstmtl.study.methods import Method

# Rows of the per-task confusion counts gathered on the device during evaluation.
_TP, _FP, _FN, _TN = range(4)


class BatchSource(Protocol):
    """Yields (uint8 images [B, 3, S, S], float labels [B, K]) on the training device."""

    def __call__(self, split: str, *, epoch: int, seed: int) -> Iterable[tuple[Tensor, Tensor]]: ...


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


class Trainer:
    """One method's model, optimizer and training step (the method's own, see
    :class:`dstmtl.study.methods.Method`), with CelebA's input pipeline around it.

    The step never reads a device value on the host for ``equal``, DST and the loss
    weightings; the TorchJD aggregators solve their small problem on the CPU.
    """

    def __init__(
        self,
        method_name: str,
        build_model: Callable[[], MultiHeadNet],
        train_labels: npt.NDArray[np.float32],
        settings: Settings,
    ) -> None:
        torch.manual_seed(settings.seed)  # the same initial weights for every method
        self.model = build_model().to(settings.device).to(memory_format=torch.channels_last)
        self.device = settings.device
        network: torch.nn.Module = self.model
        if settings.world_size > 1:
            cuda = settings.device.type == "cuda"
            network = DistributedDataParallel(
                self.model, device_ids=[settings.device.index] if cuda else None
            )
        if settings.compile:
            network = torch.compile(network)  # type: ignore[assignment]
        self.network = network
        loss_fn = MaskedMultiTaskLoss(dict.fromkeys(self.model.task_names, "binary"))
        self.method = Method(
            method_name,
            self.model,
            loss_fn,
            learning_rate=settings.learning_rate,
            seed=settings.seed,
            train_labels=torch.from_numpy(train_labels),
            network=network,
            autocast=self.autocast,
        ).to(settings.device)

    def autocast(self) -> torch.autocast:
        """bfloat16 on a GPU; full precision on the CPU, where bfloat16 is slow."""
        cuda = self.device.type == "cuda"
        return torch.autocast(self.device.type, torch.bfloat16, enabled=cuda)

    def step(self, images: Tensor, labels: Tensor, flips: torch.Generator) -> None:
        """One training step on a uint8 batch already on the device."""
        self.method.step(prepare_batch(images, train=True, generator=flips), labels)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "method": self.method.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])


def run_method(
    method_name: str,
    build_model: Callable[[], MultiHeadNet],
    batches: BatchSource,
    train_labels: npt.NDArray[np.float32],
    settings: Settings,
    run_name: str | None = None,
) -> RunResult:
    """Train one method with ``settings.seed`` from its last checkpoint (or from scratch),
    then test it.

    Returns the run's entry of ``results["runs"]``, ``run_name`` (the method's name by
    default) naming its checkpoint. Every epoch ends with an atomic checkpoint, so an
    interrupted run resumes from its last completed epoch and ends with the same results
    as an uninterrupted one (bit for bit on the CPU).
    """
    run_name = run_name or method_name
    checkpoint_path = settings.checkpoint_dir / f"{run_name.replace('/', '-')}.pt"
    state = _load_checkpoint(checkpoint_path, settings.device)
    if state is not None and "result" in state:
        finished: RunResult = state["result"]
        return finished
    trainer = Trainer(method_name, build_model, train_labels, settings)
    tasks = trainer.model.task_names
    history: list[EpochRecord] = []
    best: dict[str, Any] = {"epoch": -1, "score": -1.0, "model": None}
    first_epoch = 0
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        history, best, first_epoch = state["history"], state["best"], state["epoch"]

    for epoch in range(first_epoch, settings.epochs):
        started = time.perf_counter()
        # Re-seeded per epoch, so a resumed run draws what an uninterrupted one draws.
        torch.manual_seed(settings.seed * 1000 + epoch)
        flips = torch.Generator(settings.device).manual_seed(settings.seed * 1000 + epoch)
        trainer.model.train()
        description = f"{run_name} {epoch + 1}/{settings.epochs}"
        for images, labels in _progress(
            batches("train", epoch=epoch, seed=settings.seed), description, settings
        ):
            trainer.step(images, labels, flips)
        trainer.method.end_epoch()

        valid_batches = _progress(batches("valid", epoch=0, seed=settings.seed), "valid", settings)
        valid = scores(evaluate(trainer, valid_batches), tasks)
        scheduler = trainer.method.scheduler
        history.append(
            EpochRecord(
                epoch=epoch,
                train_loss=scheduler.epoch_losses,
                keep_probabilities=scheduler.keep_probabilities,
                gates=scheduler.gates,
                # The other methods' scheduler only gathers losses: its constant term is noise.
                terms=scheduler.terms if trainer.method.drops_tasks else {},
                loss_weights=scheduler.loss_weights,
                valid={"accuracy": valid["accuracy"], "mean_accuracy": valid["mean_accuracy"]},
                seconds=time.perf_counter() - started,
            )
        )
        if settings.is_main:
            # One line per epoch that survives in a log (the bars are erased) and with
            # --no-progress.
            _log_epoch(run_name, history[-1], settings.epochs)
        # Model selection on the validation split only; the test split is read once, below.
        if valid["mean_accuracy"] > best["score"]:
            best = {
                "epoch": epoch,
                "score": valid["mean_accuracy"],
                "model": {
                    k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()
                },
            }
        checkpoint = {"epoch": epoch + 1, "trainer": trainer.state_dict()}
        save_checkpoint(checkpoint_path, {**checkpoint, "history": history, "best": best}, settings)

    trainer.model.load_state_dict(best["model"])
    test = scores(
        evaluate(
            trainer, _progress(batches("test", epoch=0, seed=settings.seed), "test", settings)
        ),
        tasks,
    )
    result = RunResult(
        method=method_name,
        seed=settings.seed,
        description=trainer.method.description,
        epochs=history,
        selected_epoch=best["epoch"],
        test=test,
        wall_seconds=sum(entry["seconds"] for entry in history),
    )
    # The selected weights stay, for whoever wants the trained model; the optimizer and the
    # rest of the training state go.
    save_checkpoint(checkpoint_path, {"result": dict(result), "model": best["model"]}, settings)
    return result


def evaluate(trainer: Trainer, batches: Iterable[tuple[Tensor, Tensor]]) -> Tensor:
    """Per-task confusion counts ``[4, K]`` (TP, FP, FN, TN) over a whole split.

    The counts stay on the device until the end, so evaluation does not synchronise per
    batch. Every rank evaluates the whole split, which keeps the counts exact without
    padding the split to a multiple of the number of ranks.
    """
    tasks = trainer.model.task_names
    trainer.network.eval()
    counts = torch.zeros(4, len(tasks), dtype=torch.long, device=trainer.device)
    with torch.no_grad(), trainer.autocast():
        for images, labels in batches:
            outputs = trainer.network(prepare_batch(images, train=False))
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
    # The mean recall over the classes present in the split (as scikit-learn computes it):
    # a class without samples has no recall, not a recall of 0.
    positives, negatives = tp + fn, tn + fp
    recalls = tp / positives.clamp(min=1) + tn / negatives.clamp(min=1)
    balanced = recalls / ((positives > 0).double() + (negatives > 0).double()).clamp(min=1)
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


def _log_epoch(method_name: str, record: EpochRecord, epochs: int) -> None:
    losses = [v for v in record["train_loss"].values() if v is not None and math.isfinite(v)]
    line = (
        f"{method_name} epoch {record['epoch'] + 1}/{epochs}: train loss "
        f"{sum(losses) / max(len(losses), 1):.4f}, valid mean accuracy "
        f"{record['valid']['mean_accuracy']:.4f}, {record['seconds']:.1f} s"
    )
    dropped = [task for task, kept in record["gates"].items() if not kept]
    if dropped and record["epoch"] + 1 < epochs:
        line += f"; next epoch drops {', '.join(dropped)}"
    tqdm.write(line, file=sys.stdout)


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
