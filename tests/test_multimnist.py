"""The MultiMNIST example: the canvas by hand, the MNIST reader on generated IDX files, a
tiny study end to end, and each bad input (one line, exit status 2, nothing written)."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import multimnist_data
import pytest
import torch
import torchvision
from test_benchmarks import write_mnist


def _script() -> ModuleType:
    """examples/multimnist/run.py, loaded from its file: the CelebA example's run.py holds
    the module name ``run`` on the tests' path."""
    path = Path(__file__).resolve().parents[1] / "examples" / "multimnist" / "run.py"
    spec = importlib.util.spec_from_file_location("multimnist_run", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


multimnist = _script()


def _flat(value: int, count: int = 1) -> torch.Tensor:
    return torch.full((count, 28, 28), value, dtype=torch.uint8)


def test_canvas_puts_left_top_left_right_bottom_right_and_keeps_the_brighter_pixel() -> None:
    board = multimnist_data.canvas(_flat(150), _flat(100))[0]
    assert board.shape == (36, 36)
    assert (board[:8, :28] == 150).all()  # the left digit alone (rows 0-7)
    assert (board[:28, :8] == 150).all()  # the left digit alone (columns 0-7)
    assert (board[28:, 8:] == 100).all()  # the right digit alone (rows 28-35)
    assert (board[8:, 28:] == 100).all()  # the right digit alone (columns 28-35)
    assert (board[8:28, 8:28] == 150).all()  # the overlap: max(150, 100), not a sum
    assert (board[:8, 28:] == 0).all()  # top-right and bottom-left corners stay empty
    assert (board[28:, :8] == 0).all()
    brighter_right = multimnist_data.canvas(_flat(100), _flat(200))[0]
    assert (brighter_right[8:28, 8:28] == 200).all()
    saturated = multimnist_data.canvas(_flat(200), _flat(200))[0]
    assert int(saturated.max()) == 200  # a sum clipped at 255 would give 255


def test_build_labels_each_image_with_its_left_and_right_digit() -> None:
    # Digit k's image is flat at 10 * (k + 1): the corners of the resized canvas name the
    # left and the right digit.
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    images = torch.stack([_flat(10 * (int(label) + 1))[0] for label in labels])
    pool = torch.tensor([0, 2, 4, 5, 7])
    x, y = multimnist_data.build(images, labels, pool, seed=0)
    assert x.shape == (5, 1, 28, 28)
    assert y.shape == (5, 2)
    assert float(x.min()) >= 0
    assert float(x.max()) <= 1
    assert y[:, 0].tolist() == labels[pool].float().tolist()
    assert set(y[:, 1].tolist()) <= set(labels[pool].float().tolist())  # same pool
    torch.testing.assert_close(x[:, 0, 0, 0] * 255, 10 * (y[:, 0] + 1))
    torch.testing.assert_close(x[:, 0, -1, -1] * 255, 10 * (y[:, 1] + 1))
    again, y_again = multimnist_data.build(images, labels, pool, seed=0)
    assert torch.equal(x, again)
    assert torch.equal(y, y_again)
    other = multimnist_data.build(images, labels, torch.arange(8), seed=1)[1]
    assert not torch.equal(
        other[:, 1], multimnist_data.build(images, labels, torch.arange(8), 2)[1][:, 1]
    )
    assert multimnist_data.build(images, labels, pool, seed=0, channels=3)[0].shape == (
        5,
        3,
        28,
        28,
    )


@pytest.mark.parametrize("packed", [True, False])
def test_read_mnist_reads_gzipped_and_plain_idx_files(tmp_path: Path, packed: bool) -> None:
    write_mnist(tmp_path, train=20, test=10)
    raw = tmp_path / "MNIST" / "raw"
    if not packed:
        for name in multimnist_data.MNIST_FILES:
            (raw / name).write_bytes(gzip.decompress((raw / f"{name}.gz").read_bytes()))
            (raw / f"{name}.gz").unlink()
    mnist = multimnist_data.read_mnist(tmp_path)
    assert mnist.train_images.shape == (20, 28, 28)
    assert mnist.test_images.shape == (10, 28, 28)
    assert mnist.train_labels.tolist() == [i % 10 for i in range(20)]


def test_lenet_and_resnet18_give_ten_logits_per_task_and_depths() -> None:
    net = multimnist.lenet()
    outputs = net(torch.zeros(2, 1, 28, 28))
    assert {task: tuple(out.shape) for task, out in outputs.items()} == {
        "left": (2, 10),
        "right": (2, 10),
    }
    assert set(net.depths()) == {"left", "right"}  # DST's depth term needs them
    resnet = multimnist.resnet18()
    assert tuple(resnet(torch.zeros(2, 3, 28, 28))["right"].shape) == (2, 10)


def _argv(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--root",
        str(root),
        "--out",
        str(out),
        "--images",
        "48",
        "--valid-images",
        "16",
        "--test-images",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--seeds",
        "1",
        "--no-progress",
        *extra,
    ]


def test_a_tiny_study_runs_two_methods_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_mnist(tmp_path / "data", train=64, test=32)
    out = tmp_path / "study"
    assert multimnist.main(_argv(tmp_path / "data", out, "--methods", "equal,dst")) == 0
    printed = capsys.readouterr().out
    assert "equal: test accuracy left" in printed
    assert "dst: test accuracy left" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["runs"]) == {"equal/seed0", "dst/seed0"}
    assert metrics["config"]["extra"]["images"] == 48
    assert (out / "results.md").is_file()


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert multimnist.main(argv) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error
    return error


def test_a_missing_mnist_file_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_mnist(tmp_path, train=64, test=32)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    error = _fails(_argv(tmp_path, tmp_path / "study"), capsys)
    assert "t10k-labels-idx1-ubyte (or .gz) is missing" in error
    assert "--download" in error
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("packed", [True, False])
def test_a_truncated_mnist_file_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], packed: bool
) -> None:
    write_mnist(tmp_path, train=64, test=32)
    packed_file = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    if packed:
        packed_file.write_bytes(packed_file.read_bytes()[:-100])
    else:
        plain = gzip.decompress(packed_file.read_bytes())
        packed_file.unlink()
        packed_file.with_suffix("").write_bytes(plain[:-100])
    error = _fails(_argv(tmp_path, tmp_path / "study"), capsys)
    assert "truncated" in error
    assert "train" in error
    assert not (tmp_path / "study").exists()


def test_download_without_a_network_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(self: object) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried ...")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    error = _fails(_argv(tmp_path / "data", tmp_path / "study", "--download"), capsys)
    assert "--download could not fetch MNIST" in error
    assert "connect to the network" in error
    assert not (tmp_path / "study").exists()


def test_an_unknown_method_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_mnist(tmp_path, train=64, test=32)
    error = _fails(_argv(tmp_path, tmp_path / "study", "--methods", "equal,bogus"), capsys)
    assert "bogus" in error
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--epochs", "ten", "invalid int value: 'ten'"),
        ("--model", "vgg", "invalid choice: 'vgg' (choose from 'lenet', 'resnet18')"),
    ],
)
def test_a_bad_option_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        multimnist.main(_argv(tmp_path, tmp_path / "study", option, value))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.strip().splitlines() == [f"error: argument {option}: {message}; see --help"]
    assert not (tmp_path / "study").exists()
