"""Each loss weighting's state survives a resume, and a batch without one task still
trains the others, for every method (moved from the CelebA example's own trainer)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from dstmtl import MaskedMultiTaskLoss, MultiHeadNet
from dstmtl.study import StudyConfig, StudyTask, run_study
from dstmtl.study.methods import METHOD_NAMES, Method, is_single_task

TASKS = ("a", "b", "c")
_AGGREGATORS = ("upgrad", "mgda", "pcgrad", "dst+upgrad")


def tiny_model() -> MultiHeadNet:
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    heads = {task: nn.Linear(4, 1) for task in TASKS}
    return MultiHeadNet(backbone, heads, example_input=torch.zeros(1, 3, 8, 8))


def random_split(seed: int, batches: int) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    split = []
    for _ in range(batches):
        images = torch.rand((8, 3, 8, 8), generator=generator)
        labels = torch.randint(0, 2, (8, len(TASKS)), generator=generator).float()
        labels[torch.rand(labels.shape, generator=generator) < 0.2] = float("nan")
        split.append((images, labels))
    return split


TRAIN, VALID, TEST = random_split(0, 4), random_split(1, 1), random_split(2, 1)


def without_task_c(split: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """The split with task c unlabelled in every other batch."""
    return [
        (images, torch.where(torch.arange(3) == 2, float("nan"), labels) if i % 2 else labels)
        for i, (images, labels) in enumerate(split)
    ]


def fixed(split: list[tuple[Tensor, Tensor]]) -> Any:
    def batches(*, epoch: int, seed: int, **shard: int) -> list[tuple[Tensor, Tensor]]:
        return split

    return batches


def study(method: str, out: Path, train: Any, *, resume: bool = False) -> dict[str, Any]:
    config = StudyConfig(
        tasks=dict.fromkeys(TASKS, StudyTask("binary")),
        methods=(method,),
        seeds=(0,),
        epochs=3,
        batch_size=8,
        learning_rate=0.05,
        reference=method,
    )
    results = run_study(
        config, tiny_model, train, fixed(VALID), fixed(TEST), out, resume=resume, progress=False
    )
    (run,) = results["runs"].values()
    # Everything but the clock.
    epochs = [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in run["epochs"]]
    return {**run, "epochs": epochs, "wall_seconds": None}


# The methods whose state lives beside the model: DWA's weights come from the two previous
# epochs' losses and FAMO steps its own Adam, so the third epoch of a run resumed after the
# second tells whether that state was kept.
@pytest.mark.parametrize("method", ["uw", "dwa", "famo"])
def test_a_resumed_run_equals_an_uninterrupted_one(method: str, tmp_path: Path) -> None:
    pytest.importorskip("torchjd")
    uninterrupted = study(method, tmp_path / "uninterrupted", fixed(TRAIN))

    def killed_in_the_third_epoch(*, epoch: int, seed: int, **shard: int) -> Any:
        if epoch == 2:
            raise KeyboardInterrupt
        return TRAIN

    with pytest.raises(KeyboardInterrupt):
        study(method, tmp_path / "resumed", killed_in_the_third_epoch)
    resumed = study(method, tmp_path / "resumed", fixed(TRAIN), resume=True)
    assert resumed == uninterrupted


def fresh_method(
    method: str, *, learning_rate: float
) -> tuple[MultiHeadNet, MaskedMultiTaskLoss, Method]:
    """A tiny model seeded alike for every method, its loss and the method (TorchJD's
    aggregators skip the test where TorchJD is not installed)."""
    if method in _AGGREGATORS:
        pytest.importorskip("torchjd")
    torch.manual_seed(0)
    model = tiny_model()
    loss_fn = MaskedMultiTaskLoss(dict.fromkeys(TASKS, "binary"))
    labels = torch.cat([labels for _, labels in TRAIN])
    trained = Method(
        method, model, loss_fn, learning_rate=learning_rate, seed=0, train_labels=labels
    )
    return model, loss_fn, trained


@pytest.mark.parametrize("method", [name for name in METHOD_NAMES if not is_single_task(name)])
def test_every_method_trains_with_a_task_absent_from_some_batches(method: str) -> None:
    model, _, trained = fresh_method(method, learning_rate=0.05)
    for _ in range(3):
        for images, targets in without_task_c(TRAIN):
            trained.step(images, targets)
        trained.end_epoch()
    weighting = [] if trained.weighting is None else [trained.weighting]
    for module in (model, *weighting):
        for name, value in module.state_dict().items():
            if isinstance(value, Tensor) and value.is_floating_point() and name != "means":
                assert value.isfinite().all(), f"{method}: {name}"
    assert all(math.isfinite(loss) for loss in trained.epoch_losses.values())


@pytest.mark.parametrize("method", [name for name in METHOD_NAMES if not is_single_task(name)])
def test_a_batch_without_one_task_still_trains_the_others(method: str) -> None:
    """FAMO's log(0 + 1e-8) shrank the whole update to about 1e-8 of itself, and MGDA's
    minimum-norm combination with the absent task's zero gradient was 0."""
    model, loss_fn, trained = fresh_method(method, learning_rate=0.01)
    images, targets = without_task_c(TRAIN)[1]
    trained.step(images, targets)  # the gradients stay until the next step
    assert loss_fn.label_counts[2] == 0
    gradients = [p.grad for p in model.backbone.parameters()]
    norm = torch.cat([g.flatten() for g in gradients if g is not None]).norm()
    assert norm > 1e-3
    head_c = model.heads["c"]
    assert isinstance(head_c, nn.Linear)
    assert head_c.weight.grad is None or not head_c.weight.grad.any()
