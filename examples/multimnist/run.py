"""MultiMNIST study: every method x every seed on two-digit images (left and right digit).

    python examples/multimnist/run.py --root /data            # MNIST/raw under /data
    python examples/multimnist/run.py --root /data --download # fetch it first
    python examples/multimnist/run.py --root /data --methods equal,dst --seeds 3

The images follow Sener and Koltun (NeurIPS 2018), see multimnist_data.py; the model is the
LeNet-style encoder of that line of work (``--model resnet18`` for ResNet18). The study is
``dstmtl.study.run_study``: ``--out`` receives study.json, sessions.json, metrics.json,
results.md and the figures (docs/study.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import torch
from multimnist_data import SIZE, Mnist, MnistDataError, build, download, read_mnist
from torch import nn
from torch.utils.data import TensorDataset

from dstmtl import MultiHeadNet
from dstmtl.study import StudyConfig, StudyError, StudyTask, parse_seeds, run_study
from dstmtl.study.methods import METHOD_NAMES

TASKS = ("left", "right")
"""The two tasks: the top-left digit and the bottom-right digit."""


def lenet(tasks: Sequence[str] = TASKS) -> MultiHeadNet:
    """The shared LeNet-style encoder (two 5x5 convolutions, 320 -> 50) with a 50 -> 10
    linear head per task."""
    encoder = nn.Sequential(
        nn.Conv2d(1, 10, kernel_size=5),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Conv2d(10, 20, kernel_size=5),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(320, 50),
        nn.ReLU(),
    )
    heads = {task: nn.Linear(50, 10) for task in tasks}
    return MultiHeadNet(encoder, heads, example_input=torch.zeros(1, 1, SIZE, SIZE))


def resnet18(tasks: Sequence[str] = TASKS) -> MultiHeadNet:
    """torchvision's ResNet18 (random weights) with a 10-class head per task; the images
    repeat their grey channel three times."""
    return MultiHeadNet.from_torchvision("resnet18", dict.fromkeys(tasks, 10), weights=None)


MODELS = {"lenet": lenet, "resnet18": resnet18}


class _OneLineErrors(argparse.ArgumentParser):
    """argparse's parser, but a bad option is one line (the problem and the choices or
    bounds, then where the options are), not the usage block first; exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see --help\n")


def parser() -> argparse.ArgumentParser:
    """The command line (``--help`` lists every option and its default)."""
    command = _OneLineErrors(description=__doc__.split("\n\n")[0])
    command.add_argument("--root", required=True, help="folder holding MNIST/raw/")
    command.add_argument(
        "--download", action="store_true", help="fetch MNIST into --root with torchvision"
    )
    command.add_argument(
        "--methods",
        default=",".join(METHOD_NAMES),
        help="comma-separated methods (docs/methods.md) [every one, stl included]",
    )
    command.add_argument("--seeds", default="5", help="a count or a list such as 0,1,2 [5]")
    command.add_argument("--epochs", type=int, default=10, help="epochs per run [10]")
    command.add_argument("--images", type=int, default=10_000, help="training images [10000]")
    command.add_argument("--valid-images", type=int, default=2_000, help="validation [2000]")
    command.add_argument("--test-images", type=int, default=10_000, help="test images [10000]")
    command.add_argument("--batch-size", type=int, default=256, help="[256]")
    command.add_argument("--learning-rate", type=float, default=1e-3, help="Adam's [0.001]")
    command.add_argument("--model", choices=sorted(MODELS), default="lenet", help="[lenet]")
    command.add_argument("--data-seed", type=int, default=0, help="builds the images [0]")
    command.add_argument("--out", default="multimnist-study", help="[%(default)s]")
    command.add_argument("--resume", action="store_true", help="continue the study in --out")
    command.add_argument("--threads", type=int, help="torch CPU threads [torch's default]")
    command.add_argument("--device", help="cpu, cuda, ... [cuda when available]")
    command.add_argument("--no-progress", dest="progress", action="store_false")
    return command


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study; 2 with one line on stderr for bad input, before anything is written."""
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = _config(args)
        root = Path(args.root)
        if args.download:
            download(root)
        mnist = read_mnist(root)
        train, valid, test = _splits(mnist, args)  # the data are checked before --out exists
    except (StudyError, MnistDataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        results = run_study(
            config,
            MODELS[args.model],
            train,
            valid,
            test,
            args.out,
            device=args.device,
            resume=args.resume,
            progress=args.progress,
        )
    except StudyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    methods = results["statistics"]["methods"]
    for method in config.methods:
        scores = ", ".join(f"{task} {methods[method]['tasks'][task]['mean']:.4f}" for task in TASKS)
        print(f"{method}: test accuracy {scores}")
    print(f"{Path(args.out) / 'results.md'} ({time.perf_counter() - started:.0f} s)")
    return 0


def _config(args: argparse.Namespace) -> StudyConfig:
    for name in ("epochs", "images", "valid_images", "test_images", "batch_size"):
        if getattr(args, name) < 1:
            raise StudyError(f"--{name.replace('_', '-')} must be at least 1")
    methods = tuple(name.strip() for name in args.methods.split(",") if name.strip())
    return StudyConfig(
        tasks={task: StudyTask("multiclass", outputs=10, metric="accuracy") for task in TASKS},
        methods=methods,
        seeds=parse_seeds(args.seeds),
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        extra={
            "dataset": "MultiMNIST (max overlap, 36x36 canvas resized to 28x28)",
            "model": args.model,
            "images": args.images,
            "valid_images": args.valid_images,
            "test_images": args.test_images,
            "data_seed": args.data_seed,
        },
    )


def _splits(
    mnist: Mnist, args: argparse.Namespace
) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    train_images, train_labels = mnist.train_images, mnist.train_labels
    test_images, test_labels = mnist.test_images, mnist.test_labels
    wanted = args.images + args.valid_images
    if wanted > len(train_images) or args.test_images > len(test_images):
        raise MnistDataError(
            f"--images {args.images} + --valid-images {args.valid_images} and --test-images "
            f"{args.test_images} ask for more than the {len(train_images)} training and "
            f"{len(test_images)} test digits in the files; ask for fewer"
        )
    generator = torch.Generator().manual_seed(args.data_seed)
    order = torch.randperm(len(train_images), generator=generator)
    pools = [
        (train_images, train_labels, order[: args.images]),
        (train_images, train_labels, order[args.images : wanted]),
        (test_images, test_labels, torch.arange(args.test_images)),
    ]
    channels = 3 if args.model == "resnet18" else 1
    train, valid, test = (
        TensorDataset(*build(images, labels, pool, args.data_seed + index, channels))
        for index, (images, labels, pool) in enumerate(pools)
    )
    return train, valid, test


if __name__ == "__main__":
    sys.exit(main())
