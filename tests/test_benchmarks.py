"""The benchmark scripts run end to end on the CPU, at a size that says nothing about speed.

They are run for real only on a GPU machine, where device time is short: these runs catch a
broken script before it gets there. The ratios they print are checked against the rates
printed above them, not against targets.
"""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path
from types import ModuleType

import forgetting
import overhead
import pytest
import throughput
import torch

TINY = ["--device", "cpu", "--repeats", "1", "--steps", "1", "--warmup", "0", "--threads", "1"]


def test_overhead_prints_its_ratios_last(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*TINY, "--tasks", "2,3", "--image-size", "32", "--batch-size", "4"]
    assert overhead.main(argv) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    for num_tasks, line in zip((2, 3), lines[-2:], strict=True):
        match = re.fullmatch(
            rf"overhead cpu K={num_tasks}: ([\d.]+)x fused \[(PASS|MISS) <= 1\.03\], "
            r"([\d.]+)x loop \[(PASS|MISS) <= 1\.00\]",
            line,
        )
        assert match, line
        fused, loop = float(match[1]), float(match[3])
        assert fused > 0
        assert loop > 0
    saving = re.search(
        r"overhead cpu 4 dense decoders, half dropped: kept heads only ([\d.]+)x every head", out
    )
    assert saving, out
    assert float(saving[1]) > 0


def test_throughput_prints_its_ratio_last(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*TINY, "--images", "60", "--image-size", "32", "--batch-size", "8"]
    assert throughput.main([*argv, "--workers", "1", "--data", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    pipeline, bound = (rate(f"training, {name}", out) for name in ("pipeline", "bound"))
    match = re.fullmatch(
        r"throughput cpu: pipeline/bound = ([\d.]+) \[(PASS|MISS) >= 0\.9\]",
        out.strip().splitlines()[-1],
    )
    assert match, out
    assert float(match[1]) == pytest.approx(pipeline / bound, rel=0.01)


def rate(label: str, out: str) -> float:
    match = re.search(rf"{label}: +([\d.]+) img/s", out)
    assert match, f"no {label!r} in {out}"
    return float(match[1])


@pytest.mark.parametrize("script", [overhead, throughput])
@pytest.mark.parametrize("option", ["--steps", "--repeats", "--batch-size"])
def test_a_count_below_one_is_refused(
    script: ModuleType, option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        script.main([option, "0"])
    assert f"argument {option}: must be at least 1, got 0" in capsys.readouterr().err


def write_mnist(root: Path, train: int, test: int) -> None:
    """Random digits in MNIST's IDX files (gzipped), in torchvision's folder layout."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for prefix, count in (("train", train), ("t10k", test)):
        images = torch.randint(0, 256, (count, 28, 28), generator=generator, dtype=torch.uint8)
        labels = torch.arange(count, dtype=torch.uint8) % 10
        header = struct.pack(">IIII", 2051, count, 28, 28)
        (raw / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(header + images.numpy().tobytes())
        )
        (raw / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">II", 2049, count) + labels.numpy().tobytes())
        )


def test_forgetting_compares_the_schedules_on_mnist_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_mnist(tmp_path, train=64, test=32)
    argv = ["--root", str(tmp_path), "--images", "64", "--epochs", "3", "--seeds", "0,1"]
    assert forgetting.main([*argv, "--batch-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "64 training and 32 test images, 3 epochs" in out
    rows = [line for line in out.splitlines() if line.startswith(("digit |", "ink |"))]
    assert len(rows) == 2
    assert re.search(r"ink: predicting the test mean gives MAE [\d.]+", out)


def test_forgetting_names_a_missing_mnist_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_mnist(tmp_path, train=8, test=8)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    assert forgetting.main(["--root", str(tmp_path)]) == 2
    assert "t10k-labels-idx1-ubyte(.gz) is missing" in capsys.readouterr().err
