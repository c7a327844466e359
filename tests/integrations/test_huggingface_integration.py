"""The Hugging Face Trainer integration, trained for real with `transformers` on the CPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may reach the Hub

from huggingface_example import ToyDataset, main, make_trainer
from toy_tasks import make_scheduler
from transformers import (
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from dstmtl.integrations._values import _framework_log_values
from dstmtl.integrations.huggingface import (
    SCHEDULER_STATE_FILE,
    TaskDropCallback,
    TaskDropTrainer,
)


class _StopAfter(TrainerCallback):
    """Interrupts training at the end of an epoch, as a crash after a checkpoint would."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.epoch is not None and state.epoch >= self.epochs:
            control.should_training_stop = True


def test_trainer_steps_logs_and_saves_once_per_epoch(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, 3)
    trainer.train()
    scheduler = trainer.task_drop_scheduler
    assert scheduler.epoch == 3
    logged = [entry for entry in trainer.state.log_history if "keep_probability/a" in entry]
    assert [entry["epoch"] for entry in logged] == [1.0, 2.0, 3.0]
    assert logged[-1] == {**_framework_log_values(scheduler), "epoch": 3.0, "step": 24}
    for step, epoch in ((8, 1), (16, 2), (24, 3)):
        saved = torch.load(tmp_path / f"checkpoint-{step}" / SCHEDULER_STATE_FILE)
        assert saved["epoch"] == epoch


def test_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    whole = make_trainer(tmp_path / "whole", 4)
    whole.train()
    cut = make_trainer(tmp_path / "cut", 4)
    cut.add_callback(_StopAfter(2))
    cut.train()
    assert cut.task_drop_scheduler.epoch == 2
    resumed = make_trainer(tmp_path / "cut", 4)
    resumed.train(resume_from_checkpoint=True)  # the last checkpoint: checkpoint-16

    assert resumed.task_drop_scheduler.epoch == 4
    expected = whole.task_drop_scheduler.state_dict()
    found = resumed.task_drop_scheduler.state_dict()
    assert torch.equal(found["generator"], expected["generator"])
    assert torch.equal(found["gates"], expected["gates"])
    torch.testing.assert_close(found["probabilities"], expected["probabilities"])
    torch.testing.assert_close(found["baseline"], expected["baseline"])
    assert resumed.model is not None
    assert whole.model is not None
    torch.testing.assert_close(resumed.model.state_dict(), whole.model.state_dict())


def test_resume_from_a_checkpoint_without_scheduler_state_raises(tmp_path: Path) -> None:
    make_trainer(tmp_path, 1).train()
    (tmp_path / "checkpoint-8" / SCHEDULER_STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="was not saved with dstmtl's TaskDropCallback"):
        make_trainer(tmp_path, 2).train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))


def test_callback_refuses_a_resume_that_skipped_the_scheduler(tmp_path: Path) -> None:
    make_trainer(tmp_path, 1).train()
    trainer = make_trainer(tmp_path, 2)
    with pytest.raises(RuntimeError, match="resumes at step 8 but the TaskDropScheduler was not"):
        # The plain Trainer.train, as with another Trainer and the callback alone.
        Trainer.train(trainer, resume_from_checkpoint=str(tmp_path / "checkpoint-8"))


def test_evaluation_returns_the_plain_sum_and_leaves_the_scheduler_alone(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, 1)
    data = ToyDataset(64, seed=1)
    metrics = trainer.evaluate(data)
    # Never called: the running sums are all 0 (they exist from construction on).
    assert not trainer.task_drop_scheduler.state_dict()["accumulator"].any()
    assert trainer.model is not None
    with torch.no_grad():
        batches = [
            trainer.loss_fn(trainer.model(data.x[i : i + 8]), data.labels[i : i + 8]).sum()
            for i in range(0, 64, 8)  # the Trainer's default evaluation batch: 8
        ]
    assert metrics["eval_loss"] == pytest.approx(torch.stack(batches).mean().item(), rel=1e-5)


def test_trainer_refuses_a_second_callback(tmp_path: Path) -> None:
    scheduler = make_scheduler()
    with pytest.raises(ValueError, match="adds its own TaskDropCallback"):
        TaskDropTrainer(
            model=torch.nn.Linear(1, 1),
            args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
            scheduler=scheduler,
            loss_fn=lambda outputs, labels: outputs,
            callbacks=[TaskDropCallback(scheduler)],
        )


def test_batch_without_labels_raises(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, 1)
    assert trainer.model is not None
    with pytest.raises(KeyError, match=r"needs the targets under 'labels'.*\['x'\]"):
        trainer.compute_loss(trainer.model, {"x": torch.randn(4, 8)})


def test_callback_rejects_a_learning_rate_scheduler() -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    with pytest.raises(TypeError, match=r"expects a dstmtl\.TaskDropScheduler, got StepLR"):
        TaskDropCallback(lr_scheduler)  # type: ignore[arg-type]


def test_example_runs_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--output", str(tmp_path), "--epochs", "2"])
    assert "after epoch 2" in capsys.readouterr().out
    main(["--output", str(tmp_path), "--epochs", "3", "--resume"])
    assert "after epoch 3" in capsys.readouterr().out
