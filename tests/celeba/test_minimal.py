"""examples/celeba/minimal.py, the copyable DST example, on the generated stand-in."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "celeba" / "minimal.py"


@pytest.fixture(scope="module")
def minimal() -> dict[str, Any]:
    return runpy.run_path(str(SCRIPT))


def test_reads_the_splits_and_maps_labels_to_0_and_1(
    minimal: dict[str, Any], demo_root: Path
) -> None:
    splits = {
        split: minimal["CelebA"](demo_root, split, ["Male"], 32) for split in ("train", "test")
    }
    rows = (demo_root / "list_attr_celeba.txt").read_text().splitlines()
    column = rows[1].split().index("Male") + 1
    signs = {row.split()[0]: float(row.split()[column]) for row in rows[2:]}
    partition = dict(
        line.split() for line in (demo_root / "list_eval_partition.txt").read_text().splitlines()
    )
    for split, code in (("train", "0"), ("test", "2")):
        dataset = splits[split]
        assert [f.name for f in dataset.files] == [n for n, c in partition.items() if c == code]
        expected = [(signs[f.name] + 1) / 2 for f in dataset.files]
        assert dataset.labels.squeeze(1).tolist() == expected
    image, label = splits["test"][0]
    assert image.shape == (3, 32, 32)
    assert image.dtype == torch.float32
    assert label.tolist() == [expected[0]]


def test_learns_the_strongest_cue(minimal: dict[str, Any], demo_root: Path) -> None:
    argv = ["--root", str(demo_root), "--weights", "none", "--epochs", "4"]
    argv += ["--image-size", "64", "--batch-size", "16", "--workers", "0"]
    accuracy = minimal["main"](argv)
    assert list(accuracy) == minimal["ATTRIBUTES"]
    test = minimal["CelebA"](demo_root, "test", ["Male"], 32)
    majority = max(test.labels.mean().item(), 1 - test.labels.mean().item())
    # The stand-in draws "Male" as short hair and stubble: a few epochs learn it well past
    # the majority class.
    assert accuracy["Male"] > majority + 0.2


def test_a_missing_file_is_named(minimal: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"list_eval_partition\.txt is missing"):
        minimal["main"](["--root", str(tmp_path), "--workers", "0", "--weights", "none"])
