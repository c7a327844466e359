"""The dense-prediction example (docs/dense.md) learns every task with DST."""

from __future__ import annotations

import runpy
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "dense" / "train.py"


def test_dense_example_improves_every_score() -> None:
    main = runpy.run_path(str(SCRIPT))["main"]
    scores = main(["--images", "96", "--size", "48", "--epochs", "6", "--batch-size", "8"])
    before, after = scores["untrained"], scores["trained"]
    # Seed 0 reaches mean IoU 0.67, pixel accuracy 0.95, depth error 0.12 and 2.5 degrees
    # from 0.20, 0.64, 2.4 and 119: the margins leave room for other torch builds.
    assert after["mean IoU"] > before["mean IoU"] + 0.25
    assert after["pixel accuracy"] > before["pixel accuracy"] + 0.2
    assert after["depth abs error"] < 0.25 * before["depth abs error"]
    assert after["normal angle error"] < 0.25 * before["normal angle error"]
