"""One method of the study (``methods.Method``, ``study.run_method``) on a tiny model."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import study
import torch
from celeba_files import CelebAError
from methods import CELEBA_METHODS, check_methods
from torch import Tensor, nn

from dstmtl import MaskedMultiTaskLoss, MultiHeadNet
from dstmtl.study.methods import Method

TASKS = ("a", "b", "c")


def tiny_model() -> MultiHeadNet:
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    heads = {task: nn.Linear(4, 1) for task in TASKS}
    return MultiHeadNet(backbone, heads, example_input=torch.zeros(1, 3, 8, 8))


def random_split(seed: int, batches: int) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    split = []
    for _ in range(batches):
        images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 2, (8, len(TASKS)), generator=generator).float()
        labels[torch.rand(labels.shape, generator=generator) < 0.2] = float("nan")
        split.append((images, labels))
    return split


SPLITS = {"train": random_split(0, 4), "valid": random_split(1, 1), "test": random_split(2, 1)}


def batches(split: str, *, epoch: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    return SPLITS[split]


TRAIN_LABELS = torch.cat([labels for _, labels in SPLITS["train"]]).numpy()


def settings(checkpoint_dir: Path) -> study.Settings:
    return study.Settings(
        epochs=3,
        learning_rate=0.05,
        seed=0,
        device=torch.device("cpu"),
        compile=False,
        progress=False,
        rank=0,
        world_size=1,
        checkpoint_dir=checkpoint_dir,
    )


def run(method: str, checkpoint_dir: Path) -> dict[str, Any]:
    result = study.run_method(method, tiny_model, batches, TRAIN_LABELS, settings(checkpoint_dir))
    # Everything but the clock.
    epochs = [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in result["epochs"]]
    return {**result, "epochs": epochs, "wall_seconds": None}


# The methods whose state lives in TorchJD (test_run.py resumes equal and DST). DWA's
# weights come from the two previous epochs' losses and FAMO steps its own Adam, so the
# third epoch of a run resumed after the second tells whether that state was kept.
@pytest.mark.parametrize("method", ["uw", "dwa", "famo"])
def test_a_resumed_run_equals_an_uninterrupted_one(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torchjd")
    uninterrupted = run(method, tmp_path / "uninterrupted")

    original = study.save_checkpoint

    def crash_after_the_second_epoch(
        path: Path, state: dict[str, Any], settings: study.Settings
    ) -> None:
        original(path, state, settings)
        if state.get("epoch") == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(study, "save_checkpoint", crash_after_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(method, tmp_path / "resumed")
    monkeypatch.setattr(study, "save_checkpoint", original)
    resumed = run(method, tmp_path / "resumed")

    assert resumed == uninterrupted


@pytest.mark.parametrize("method", ["upgrad", "dst+upgrad", "uw", "dwa", "famo"])
def test_methods_with_per_process_state_refuse_torchrun(method: str) -> None:
    with pytest.raises(CelebAError, match=f"method '{re.escape(method)}' keeps state"):
        check_methods(["equal", method], distributed=True)
    check_methods(["equal", method], distributed=False)


@pytest.mark.parametrize("method", ["equal", "dst", "dst-all", "rlw"])
def test_the_other_methods_run_under_torchrun(method: str) -> None:
    check_methods([method], distributed=True)


def test_the_finished_checkpoint_holds_the_tested_weights(tmp_path: Path) -> None:
    result = study.run_method("equal", tiny_model, batches, TRAIN_LABELS, settings(tmp_path))
    assert result["selected_epoch"] < 2  # so the last epoch's weights would be the wrong ones
    state = torch.load(tmp_path / "equal.pt", weights_only=True)
    trainer = study.Trainer("equal", tiny_model, TRAIN_LABELS, settings(tmp_path))
    trainer.model.load_state_dict(state["model"])
    counts = study.evaluate(trainer, SPLITS["test"])
    assert study.scores(counts, TASKS) == result["test"]


def without_task_c(split: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """The split with task c unlabelled in every other batch."""
    return [
        (images, torch.where(torch.arange(3) == 2, float("nan"), labels) if i % 2 else labels)
        for i, (images, labels) in enumerate(split)
    ]


@pytest.mark.parametrize("method", CELEBA_METHODS)
def test_every_method_trains_with_a_task_absent_from_some_batches(
    method: str, tmp_path: Path
) -> None:
    if method in ("upgrad", "mgda", "pcgrad", "dst+upgrad"):
        pytest.importorskip("torchjd")
    trainer = study.Trainer(method, tiny_model, TRAIN_LABELS, settings(tmp_path))
    flips = torch.Generator().manual_seed(0)
    for _ in range(3):
        for images, labels in without_task_c(SPLITS["train"]):
            trainer.step(images, labels, flips)
        trainer.method.end_epoch()
    weighting = [] if trainer.method.weighting is None else [trainer.method.weighting]
    for module in (trainer.model, *weighting):
        for name, value in module.state_dict().items():
            if isinstance(value, Tensor) and value.is_floating_point() and name != "means":
                assert value.isfinite().all(), f"{method}: {name}"
    assert all(math.isfinite(loss) for loss in trainer.method.scheduler.epoch_losses.values())


@pytest.mark.parametrize("method", CELEBA_METHODS)
def test_a_batch_without_one_task_still_trains_the_others(method: str) -> None:
    """FAMO's log(0 + 1e-8) shrank the whole update to about 1e-8 of itself, and MGDA's
    minimum-norm combination with the absent task's zero gradient was 0."""
    if method in ("upgrad", "mgda", "pcgrad", "dst+upgrad"):
        pytest.importorskip("torchjd")
    torch.manual_seed(0)
    model = tiny_model()
    loss_fn = MaskedMultiTaskLoss(dict.fromkeys(TASKS, "binary"))
    trained = Method(
        method,
        model,
        loss_fn,
        learning_rate=0.01,
        seed=0,
        train_labels=torch.from_numpy(TRAIN_LABELS),
    )
    images, labels = without_task_c(SPLITS["train"])[1]
    trained.step(images.float() / 255, labels)  # the gradients stay until the next step
    assert loss_fn.label_counts[2] == 0
    gradients = [p.grad for p in model.backbone.parameters()]
    norm = torch.cat([g.flatten() for g in gradients if g is not None]).norm()
    assert norm > 1e-3
    head_c = model.heads["c"]
    assert isinstance(head_c, nn.Linear)
    assert head_c.weight.grad is None or not head_c.weight.grad.any()


def test_training_does_not_import_matplotlib() -> None:
    code = "import sys; sys.modules['matplotlib'] = None; import study; print('ok')"
    completed = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(study.__file__).parent,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert completed.stdout.strip() == "ok", completed.stderr[-2000:]
