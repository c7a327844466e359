"""Checks that need a CUDA device: no host-device sync per step, bf16, device-side state.

Skipped without CUDA. On a GPU machine, from the repository root:

    PYTHONPATH=src python -m pytest tests/test_gpu.py -q

The no-sync tests run the step under ``torch.cuda.set_sync_debug_mode("error")``, which
turns every synchronising call that torch knows of (``.item()``, ``.cpu()``, a blocking
copy, ``nonzero`` on the device, ...) into a ``RuntimeError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import numpy as np
import numpy.typing as npt
import pytest
import torch
from torch import Tensor, nn

from dstmtl import MaskedMultiTaskLoss, MultiHeadNet, TaskDropScheduler
from dstmtl.metrics import Constant, TaskIncompleteness

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.cuda,
]

_TASKS = ("male", "smiling", "young", "eyeglasses")
_BATCH, _SIZE = 16, 32

Step = Callable[[Tensor, Tensor], None]


@pytest.fixture
def image_cache() -> ModuleType:
    # Imported here, not at the top, so that a machine without the example's extras
    # (tqdm, Pillow) still runs the library's tests and skips only these.
    module: ModuleType = pytest.importorskip("image_cache")
    return module


@contextmanager
def _sync_is_an_error() -> Iterator[None]:
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _drawn_scheduler(redraw_every: int | None = None) -> TaskDropScheduler:
    scheduler = TaskDropScheduler(
        _TASKS, [TaskIncompleteness(), Constant()], redraw_every=redraw_every, generator=0
    )
    # Two made-up epochs, so that the probabilities fall below 1 and the gates are real
    # draws; with generator=0 the first task's gate is off, so the dropped path runs too.
    scheduler.step([1.0, 1.0, 1.0, 1.0])
    scheduler.step([0.2, 0.5, 0.8, 1.0])
    assert not all(scheduler.gates.values())
    return scheduler


def _model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model: nn.Module = (
        MultiHeadNet.from_torchvision("resnet18", _TASKS, weights=None)
        .to(device)
        .to(memory_format=torch.channels_last)
    )
    return model


def _training_step(model: nn.Module, scheduler: TaskDropScheduler) -> Step:
    """The CelebA example's step: channels_last ResNet18, bf16 autocast, Adam."""
    loss_fn = MaskedMultiTaskLoss(dict.fromkeys(_TASKS, "binary"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(images: Tensor, labels: Tensor) -> None:
        with torch.autocast("cuda", torch.bfloat16):
            losses = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scheduler(losses, loss_fn.label_counts).backward()
        optimizer.step()

    return step


def _batch(device: torch.device) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(_BATCH, 3, _SIZE, _SIZE, generator=generator)
    labels = torch.randint(0, 2, (_BATCH, len(_TASKS)), generator=generator).float()
    labels[torch.rand(labels.shape, generator=generator) < 0.3] = float("nan")
    return images.to(device).contiguous(memory_format=torch.channels_last), labels.to(device)


def _uint8_dataset(rows: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(rows, 3, _SIZE, _SIZE), dtype=np.uint8)
    labels = (rng.random((rows, len(_TASKS))) < 0.5).astype(np.float32)
    labels[rng.random(labels.shape) < 0.3] = np.nan
    return images, labels


# ------------------------------------------------------------------------------ no sync


@pytest.mark.parametrize("redraw_every", [None, 1])
def test_training_steps_do_not_synchronise(redraw_every: int | None) -> None:
    device = _device()
    scheduler = _drawn_scheduler(redraw_every)
    step = _training_step(_model(device), scheduler)
    images, labels = _batch(device)
    # One step before checking: the one-time lazy set-up of the first step (cuBLAS and
    # cuDNN handles, Adam's state) is not the per-step path. The scheduler's own first
    # call is checked alone, in the next test.
    step(images, labels)
    with _sync_is_an_error():
        for _ in range(3):
            step(images, labels)
    scheduler.step()  # the end of an epoch reads the sums back: a sync by design
    assert all(math.isfinite(loss) for loss in scheduler.epoch_losses.values())


def test_first_scheduler_call_does_not_synchronise() -> None:
    device = _device()
    scheduler = _drawn_scheduler()
    losses = torch.tensor([0.5, 1.0, 1.5, 2.0], device=device, requires_grad=True)
    counts = torch.full((len(_TASKS),), float(_BATCH), device=device)
    # The first call creates the scheduler's device state and copies the gates and the
    # weights there from pinned memory with non_blocking=True: no sync.
    with _sync_is_an_error():
        total = scheduler(losses, counts)
        kept = scheduler.kept_losses(losses, counts)
        (total + kept.sum()).backward()
    gates = torch.tensor([float(gate) for gate in scheduler.gates.values()])
    torch.testing.assert_close(losses.grad, 2 * gates.to(device))


@pytest.fixture
def study() -> ModuleType:
    module: ModuleType = pytest.importorskip("study")
    return module


@pytest.mark.parametrize("preload", [True, False], ids=["preloaded", "host"])
@pytest.mark.parametrize("method", ["equal", "dst"])
def test_the_studys_epoch_does_not_synchronise(
    image_cache: ModuleType, study: ModuleType, preload: bool, method: str, tmp_path: Path
) -> None:
    """The example's own step (study.Trainer) over DeviceBatches, as run_method drives it."""
    device = _device()
    images, labels = _uint8_dataset(40)
    batches = image_cache.DeviceBatches(
        images, labels, batch_size=8, device=device, shuffle=True, preload=preload
    )
    settings = study.Settings(
        epochs=1,
        learning_rate=1e-3,
        seed=0,
        device=device,
        compile=False,
        progress=False,
        rank=0,
        world_size=1,
        checkpoint_dir=tmp_path,
    )
    trainer = study.Trainer(
        method,
        lambda: MultiHeadNet.from_torchvision("resnet18", _TASKS, weights=None),
        labels,
        settings,
    )
    scheduler = trainer.method.scheduler
    scheduler.step([1.0, 1.0, 1.0, 1.0])  # two made-up epochs: DST's gates are real draws
    scheduler.step([0.2, 0.5, 0.8, 1.0])
    flips = torch.Generator(device).manual_seed(0)
    # A first step outside the check: besides the lazy set-up, prepare_batch's first call
    # on a device copies its normalisation constants there with a blocking .to(), once.
    trainer.step(*next(iter(batches)), flips)
    seen = 0
    with _sync_is_an_error():
        for uint8_images, batch_labels in batches:
            trainer.step(uint8_images, batch_labels, flips)
            seen += 1
    assert seen == len(batches)


# ---------------------------------------------------------------------------------- bf16


def test_bf16_autocast_gives_finite_losses_and_gradients() -> None:
    device = _device()
    scheduler = _drawn_scheduler()
    model = _model(device)
    loss_fn = MaskedMultiTaskLoss(dict.fromkeys(_TASKS, "binary"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = _batch(device)
    labels[:, 3] = float("nan")  # a task without a label in the batch: its loss is exactly 0
    for _ in range(3):
        with torch.no_grad():
            reference = loss_fn(model(images), labels)
        with torch.autocast("cuda", torch.bfloat16):
            losses = loss_fn(model(images), labels)
        assert bool(losses.isfinite().all()), losses
        assert losses[3].item() == 0.0
        # bf16 keeps about 3 significant digits; the losses need only stay near float32's.
        torch.testing.assert_close(losses.float(), reference, rtol=0.05, atol=0.05)
        optimizer.zero_grad(set_to_none=True)
        total = scheduler(losses, loss_fn.label_counts)
        assert bool(total.isfinite())
        total.backward()
        for name, parameter in model.named_parameters():
            assert parameter.grad is not None, name
            assert bool(parameter.grad.isfinite().all()), name
        optimizer.step()


# ----------------------------------------------------------------------- scheduler state


def _hand_means(losses: list[list[float]], counts: list[list[float]]) -> list[float]:
    """Per task, the mean of the finite losses of the steps with a labelled sample."""
    means = []
    for j in range(len(losses[0])):
        kept = [
            step[j]
            for step, count in zip(losses, counts, strict=True)
            if math.isfinite(step[j]) and count[j] > 0
        ]
        means.append(sum(kept) / len(kept) if kept else math.nan)
    return means


def test_step_reads_back_the_cuda_accumulators() -> None:
    device = _device()
    scheduler = TaskDropScheduler(_TASKS, [TaskIncompleteness(), Constant()], generator=0)
    generator = torch.Generator().manual_seed(0)
    epochs: list[list[float]] = []
    for _ in range(2):
        losses = (torch.rand(20, len(_TASKS), generator=generator) * 2 + 0.1).tolist()
        counts = torch.randint(1, 9, (20, len(_TASKS)), generator=generator).float().tolist()
        losses[3][1] = math.nan  # never counts
        losses[5][2] = math.inf  # never counts either
        counts[7][0] = 0.0  # a step without a label for the task does not count
        for step_losses, step_counts in zip(losses, counts, strict=True):
            scheduler(
                torch.tensor(step_losses, device=device, requires_grad=True),
                torch.tensor(step_counts, device=device),
            )
        scheduler.step()

        expected = _hand_means(losses, counts)
        assert list(scheduler.epoch_losses.values()) == pytest.approx(expected, rel=1e-5)
        state = scheduler.state_dict()
        assert state["label_counts"].tolist() == pytest.approx(
            [sum(step[j] for step in counts) for j in range(len(_TASKS))]
        )
        assert not bool(state["accumulator"].any()), "step() must empty the device sums"
        epochs.append(expected)

    # The probabilities from the read-back means, as docs/algorithm.md defines them.
    ratios = [now / first for now, first in zip(epochs[1], epochs[0], strict=True)]
    mean_ratio = sum(ratios) / len(ratios)
    expected_p = [(min(1.0, ratio / mean_ratio) + 1.0) / 2 for ratio in ratios]
    assert list(scheduler.keep_probabilities.values()) == pytest.approx(expected_p, rel=1e-5)
    # The new gates reach the device copy that weights the losses.
    weighted = scheduler.weighted_losses(torch.ones(len(_TASKS), device=device))
    assert weighted.tolist() == [float(gate) for gate in scheduler.gates.values()]
