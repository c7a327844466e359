"""The Lightning callback, trained for real with `lightning` on the CPU."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import pytest
import torch
from lightning_example import main, train
from toy_tasks import make_data

from dstmtl.integrations._values import _framework_log_values
from dstmtl.integrations.lightning import TaskDropCallback

# The toy data lives in memory; Lightning's advice to add loader workers is noise here.
warnings.filterwarnings("ignore", ".*does not have many workers.*")


def _epoch_rows(log_dir: str) -> list[dict[str, str]]:
    """The rows of Lightning's CSV log written at epoch ends (those with the read-out)."""
    with open(Path(log_dir) / "metrics.csv", newline="") as file:
        return [row for row in csv.DictReader(file) if row["keep_probability/a"]]


def test_callback_steps_and_logs_once_per_epoch(tmp_path: Path) -> None:
    module, trainer = train(tmp_path, 3)
    scheduler = module.scheduler
    assert scheduler.epoch == 3
    # Lightning's own epoch (from 0) stays in the `epoch` column, one row per epoch.
    rows = _epoch_rows(trainer.log_dir or "")
    assert [row["epoch"] for row in rows] == ["0", "1", "2"]
    last = rows[-1]
    expected = _framework_log_values(scheduler)
    # Before the second step() there are no terms: only the last row has every key.
    assert set(expected) <= set(last)
    for key, value in expected.items():  # Lightning logs in float32
        assert math.isclose(float(last[key]), value, rel_tol=1e-6), key
    _, labels = make_data(256)
    assert float(rows[0]["label_count/b"]) == 256 - labels[:, 1].isnan().sum().item()


def test_resume_from_checkpoint_file_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    whole, _ = train(tmp_path / "whole", 4, shuffle=False)
    train(tmp_path / "cut", 2, shuffle=False)
    checkpoint = tmp_path / "cut" / "checkpoints" / "epoch=1-step=16.ckpt"
    saved = torch.load(checkpoint, weights_only=False)["callbacks"]["TaskDropCallback"]
    assert saved["epoch"] == 2
    resumed, _ = train(tmp_path / "cut", 4, ckpt_path=checkpoint, shuffle=False)

    assert resumed.scheduler.epoch == 4
    expected, found = whole.scheduler.state_dict(), resumed.scheduler.state_dict()
    assert torch.equal(found["generator"], expected["generator"])
    assert torch.equal(found["gates"], expected["gates"])
    torch.testing.assert_close(found["probabilities"], expected["probabilities"])
    torch.testing.assert_close(found["baseline"], expected["baseline"])
    torch.testing.assert_close(resumed.net.state_dict(), whole.net.state_dict())


def test_example_runs_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--output", str(tmp_path), "--epochs", "2"])
    assert "after epoch 2" in capsys.readouterr().out
    main(["--output", str(tmp_path), "--epochs", "3", "--resume"])
    assert "after epoch 3" in capsys.readouterr().out


def test_callback_rejects_a_learning_rate_scheduler() -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    with pytest.raises(TypeError, match=r"expects a dstmtl\.TaskDropScheduler, got StepLR"):
        TaskDropCallback(lr_scheduler)  # type: ignore[arg-type]
