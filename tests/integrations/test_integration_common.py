"""What both integrations share: the logged read-out, the layering, the missing-extra error."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

from dstmtl import TaskDropScheduler
from dstmtl.integrations._values import _framework_log_values, _log_values
from dstmtl.metrics import Constant, TaskIncompleteness


def test_log_values_holds_every_read_out_by_hand() -> None:
    scheduler = TaskDropScheduler(["a", "b"], [TaskIncompleteness(), Constant()], generator=0)
    scheduler(torch.tensor([0.75, 0.25]), torch.tensor([4.0, 3.0]))
    scheduler.step()  # baseline [0.75, 0.25], 4 and 3 labels
    # Incompleteness [0.375 / 0.75, 1.0] = [0.5, 1.0], over its mean 0.75: [2/3, 1];
    # with the constant term, p = [5/6, 1].
    scheduler.step([0.375, 0.25])
    gates = scheduler.gates
    assert _log_values(scheduler) == pytest.approx(
        {
            "keep_probability/a": 5 / 6,
            "keep_probability/b": 1.0,
            "gate/a": float(gates["a"]),
            "gate/b": 1.0,
            "term/task_incompleteness/a": 2 / 3,
            "term/task_incompleteness/b": 1.0,
            "term/constant/a": 1.0,
            "term/constant/b": 1.0,
            "epoch_loss/a": 0.375,
            "epoch_loss/b": 0.25,
            "label_count/a": 0.0,  # explicit means carry no counts
            "label_count/b": 0.0,
            "loss_weight/a": 1.0,
            "loss_weight/b": 1.0,
            "epoch": 2.0,
        }
    )
    assert _framework_log_values(scheduler) == {
        key: value for key, value in _log_values(scheduler).items() if key != "epoch"
    }


def test_log_values_before_any_step() -> None:
    scheduler = TaskDropScheduler(["a"], [Constant()])
    values = _log_values(scheduler)
    assert values["keep_probability/a"] == 1.0
    assert values["gate/a"] == 1.0
    assert values["epoch"] == 0.0
    assert not any(key.startswith("term/") for key in values)  # no terms before step 2


def test_core_package_imports_no_framework() -> None:
    code = (
        "import sys, dstmtl, dstmtl.integrations; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'lightning', 'pytorch_lightning', 'transformers', 'accelerate'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("lightning", "lightning.pytorch", "lightning"),
        ("huggingface", "transformers", "huggingface"),
    ],
)
def test_missing_framework_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, blocked: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, blocked, None)  # as if not installed
    monkeypatch.delitem(sys.modules, f"dstmtl.integrations.{module}", raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'dstmtl\[{extra}\]'"):
        importlib.import_module(f"dstmtl.integrations.{module}")
