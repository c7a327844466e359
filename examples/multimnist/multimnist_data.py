"""MultiMNIST (Sener and Koltun, NeurIPS 2018) built from the four MNIST files.

Each sample puts one digit at the top-left of a 36x36 canvas (rows and columns 0-27) and a
second at the bottom-right (rows and columns 8-35); where they overlap the brighter pixel
wins (the maximum, so the canvas stays a valid 0-255 image), and the canvas is resized to
28x28. The tasks are the left (top-left) digit and the right (bottom-right) digit.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor

__all__ = [
    "CANVAS",
    "MNIST_FILES",
    "SIZE",
    "Mnist",
    "MnistDataError",
    "build",
    "canvas",
    "download",
    "read_mnist",
]

CANVAS = 36
"""The canvas side, in pixels, before the resize."""
SIZE = 28
"""The side of a MultiMNIST image (and of an MNIST digit)."""
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
"""The four files of torchvision's ``MNIST/raw`` folder (each may also be ``.gz``)."""


class MnistDataError(Exception):
    """The MNIST files cannot be read or fetched; the message names the file and the fix."""


@dataclass(frozen=True)
class Mnist:
    """The MNIST digits: ``uint8 [N, 28, 28]`` images and ``int64 [N]`` labels per split."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def download(root: Path) -> None:
    """Fetch MNIST into ``root/MNIST/raw`` with torchvision; :class:`MnistDataError` offline."""
    try:
        torchvision.datasets.MNIST(str(root), train=True, download=True)
    except (RuntimeError, OSError) as error:
        lines = str(error).strip().splitlines()
        first = lines[0].rstrip(":") if lines else type(error).__name__
        raise MnistDataError(
            f"--download could not fetch MNIST into {root} ({first}); connect to the network, "
            f"or copy the four MNIST files into {root / 'MNIST' / 'raw'} and drop --download"
        ) from None


def read_mnist(root: Path) -> Mnist:
    """Read ``root/MNIST/raw/*-ubyte`` (or ``*-ubyte.gz``) with torchvision's MNIST reader."""
    raw = root / "MNIST" / "raw"
    fix = (
        f"put the four MNIST files ({', '.join(MNIST_FILES)}, optionally .gz) in {raw}, "
        "or add --download"
    )
    with tempfile.TemporaryDirectory() as extracted:
        target_dir = Path(extracted) / "MNIST" / "raw"
        target_dir.mkdir(parents=True)
        for name in MNIST_FILES:
            _extract(raw, name, target_dir / name, fix)
        splits = []
        for train in (True, False):
            try:
                dataset = torchvision.datasets.MNIST(extracted, train=train, download=False)
                images, labels = dataset.data, dataset.targets
            except (AssertionError, RuntimeError, ValueError, IndexError) as error:
                # torchvision asserts the element count against the header: a short file.
                prefix = "train" if train else "t10k"
                raise MnistDataError(
                    f"the MNIST {prefix} files in {raw} are truncated or not IDX files "
                    f"({type(error).__name__}); {fix}"
                ) from None
            if images.shape[1:] != (SIZE, SIZE) or len(images) != len(labels):
                raise MnistDataError(
                    f"the MNIST {'train' if train else 't10k'} files in {raw} hold "
                    f"{len(images)} images of {tuple(images.shape[1:])} and {len(labels)} "
                    f"labels; expected as many 28x28 images as labels: {fix}"
                )
            splits.append((images, labels.long()))
    (train_images, train_labels), (test_images, test_labels) = splits
    return Mnist(train_images, train_labels, test_images, test_labels)


def _extract(raw: Path, name: str, target: Path, fix: str) -> None:
    if (raw / name).is_file():
        shutil.copyfile(raw / name, target)
        return
    packed = raw / f"{name}.gz"
    if not packed.is_file():
        raise MnistDataError(f"{raw / name} (or .gz) is missing; {fix}")
    try:
        with gzip.open(packed) as source, target.open("wb") as out:
            shutil.copyfileobj(source, out)
    except (EOFError, OSError, zlib.error) as error:
        raise MnistDataError(f"{packed} is truncated or not gzip ({error}); {fix}") from None


def canvas(left: Tensor, right: Tensor) -> Tensor:
    """The 36x36 canvases of ``uint8 [N, 28, 28]`` digit pairs: ``left`` at the top-left,
    ``right`` at the bottom-right, the maximum where they overlap.

    Example:
        >>> import torch
        >>> ones = torch.ones(1, 28, 28, dtype=torch.uint8)
        >>> board = canvas(ones, 2 * ones)
        >>> board.shape, int(board[0, 0, 0]), int(board[0, 20, 20]), int(board[0, 35, 35])
        (torch.Size([1, 36, 36]), 1, 2, 2)
    """
    offset = CANVAS - SIZE
    board = torch.zeros(len(left), CANVAS, CANVAS, dtype=left.dtype)
    board[:, :SIZE, :SIZE] = left
    board[:, offset:, offset:] = torch.maximum(board[:, offset:, offset:], right)
    return board


def build(
    images: Tensor, labels: Tensor, pool: Tensor, seed: int, channels: int = 1
) -> tuple[Tensor, Tensor]:
    """MultiMNIST samples whose left digits are ``images[pool]`` in order, each paired with
    a right digit drawn uniformly from ``pool`` by ``seed``.

    Returns ``float [N, channels, 28, 28]`` images in [0, 1] (the canvas resized with
    antialiasing; ``channels`` > 1 repeats the grey channel, for 3-channel models) and
    ``float [N, 2]`` targets: the left digit's class, then the right digit's.
    """
    generator = torch.Generator().manual_seed(seed)
    right = pool[torch.randint(len(pool), (len(pool),), generator=generator)]
    boards = canvas(images[pool], images[right]).unsqueeze(1).float() / 255
    small = F.interpolate(boards, size=(SIZE, SIZE), mode="bilinear", antialias=True)
    targets = torch.stack([labels[pool], labels[right]], dim=1).float()
    return small.clamp(0, 1).expand(-1, channels, -1, -1), targets
