"""What both integrations share: the logged read-out, the layering, the missing-extra error."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

from dstmtl import TaskDropScheduler
from dstmtl.integrations._values import _framework_log_values
from dstmtl.metrics import Constant, TaskIncompleteness


def test_frameworks_log_the_read_out_without_the_epoch() -> None:
    scheduler = TaskDropScheduler(["a", "b"], [TaskIncompleteness(), Constant()], generator=0)
    scheduler(torch.tensor([0.75, 0.25]), torch.tensor([4.0, 3.0]))
    scheduler.step()
    scheduler.step([0.375, 0.25])
    values = scheduler.log_dict()
    assert values["epoch"] == 2.0
    assert values["keep_probability/a"] == pytest.approx(5 / 6)
    assert _framework_log_values(scheduler) == {
        key: value for key, value in values.items() if key != "epoch"
    }


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
