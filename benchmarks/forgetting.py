"""Does a task forget while DST drops it? The paper's schedule against the cool-down.

Six tasks share a LeNet encoder on real MNIST digits: the digit (10 classes), three
binary attributes of it (odd, at least 5, has a closed loop) and two regressions (the
digit's value and the image's ink, both standardised). Each seed trains the same initial
weights in the same data order twice with ``TaskIncompleteness`` + ``Constant``: once
with the paper's schedule (``cooldown_epochs=0``: the last draw can drop a task for the
last epoch) and once with the library's default cool-down (every task kept for the last
``cooldown_epochs`` epochs). A task "forgot" in an epoch when it was dropped and its
training loss rose over that epoch.

    PYTHONPATH=src python benchmarks/forgetting.py --root ../shared/data/mnist

``--root`` is a folder in torchvision's MNIST layout (``MNIST/raw/*-ubyte`` or
``*-ubyte.gz``). The last lines compare the schedules per task over the seeds.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from dstmtl import MaskedMultiTaskLoss, MultiHeadNet, TaskDropScheduler, TaskKind
from dstmtl.metrics import Constant, TaskIncompleteness

_TASKS: dict[str, TaskKind] = {
    "digit": "multiclass",
    "odd": "binary",
    "large": "binary",
    "loop": "binary",
    "value": "regression",
    "ink": "regression",
}
_OUTPUTS = {"digit": 10}
_LOOPED_DIGITS = (0, 6, 8, 9)
_SCHEDULES = {"paper": 0, "cool-down": 1}
_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class _Split:
    images: Tensor  # [N, 1, 28, 28] in [0, 1]
    targets: dict[str, Tensor]


@dataclass(frozen=True)
class _Run:
    schedule: str
    seed: int
    scores: dict[str, float]  # test accuracy (classification) or MAE (regression)
    forgot: dict[str, int]  # dropped epochs in which the task's training loss rose
    dropped: dict[str, int]  # epochs in which the task was dropped
    seconds: float


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        train, test = _load(Path(args.root), args.images)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"forgetting: {len(train.images)} training and {len(test.images)} test images, "
        f"{args.epochs} epochs, seeds {args.seeds}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    runs = [
        _train(train, test, args, schedule=schedule, seed=seed)
        for seed in args.seeds
        for schedule in _SCHEDULES
    ]
    for run in runs:
        scores = ", ".join(f"{task} {score:.4f}" for task, score in run.scores.items())
        forgot = {task: count for task, count in run.forgot.items() if count}
        print(f"{run.schedule} seed {run.seed}: {scores}; forgot {forgot} ({run.seconds:.0f} s)")
    print(_summary(runs, test))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="folder holding MNIST/raw/")
    parser.add_argument("--images", type=int, default=20_000, help="training images [20000]")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run [6]")
    parser.add_argument(
        "--seeds",
        type=lambda text: [int(seed) for seed in text.split(",")],
        default=[0, 1, 2, 3, 4],
        help="comma-separated seeds [0,1,2,3,4]",
    )
    parser.add_argument("--batch-size", type=int, default=128, help="[128]")
    parser.add_argument("--threads", type=int, default=1, help="torch threads [1]")
    return parser


def _load(root: Path, images: int) -> tuple[_Split, _Split]:
    raw = root / "MNIST" / "raw"
    with tempfile.TemporaryDirectory() as extracted:
        for name in _MNIST_FILES:
            target = Path(extracted) / "MNIST" / "raw" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if (raw / name).exists():
                shutil.copyfile(raw / name, target)
            elif (raw / f"{name}.gz").exists():
                with gzip.open(raw / f"{name}.gz") as source, target.open("wb") as out:
                    shutil.copyfileobj(source, out)
            else:
                raise FileNotFoundError(
                    f"{raw / name}(.gz) is missing; pass --root a folder in torchvision's MNIST "
                    "layout, e.g. one where torchvision.datasets.MNIST(root, download=True) "
                    "has run"
                )
        train = torchvision.datasets.MNIST(extracted, train=True, download=False)
        test = torchvision.datasets.MNIST(extracted, train=False, download=False)
        train_images, train_digits = train.data[:images], train.targets[:images]
        stats = _ink(train_images)
        return (
            _split(train_images, train_digits, stats.mean(), stats.std()),
            _split(test.data, test.targets, stats.mean(), stats.std()),
        )


def _ink(images: Tensor) -> Tensor:
    return images.float().mean(dim=(1, 2)) / 255


def _split(images: Tensor, digits: Tensor, ink_mean: Tensor, ink_std: Tensor) -> _Split:
    value = digits.float()
    looped = torch.isin(digits, torch.tensor(_LOOPED_DIGITS))
    return _Split(
        images=images.float().unsqueeze(1) / 255,
        targets={
            "digit": digits,
            "odd": (digits % 2).float(),
            "large": (digits >= 5).float(),
            "loop": looped.float(),
            "value": (value - 4.5) / 2.87,  # the mean and std of a uniform digit
            "ink": (_ink(images) - ink_mean) / ink_std,
        },
    )


def _network() -> MultiHeadNet:
    encoder = nn.Sequential(
        nn.Conv2d(1, 10, 5),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Conv2d(10, 20, 5),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(320, 50),
        nn.ReLU(),
    )
    heads = {task: nn.Linear(50, _OUTPUTS.get(task, 1)) for task in _TASKS}
    return MultiHeadNet(encoder, heads)


def _train(
    train: _Split, test: _Split, args: argparse.Namespace, *, schedule: str, seed: int
) -> _Run:
    torch.manual_seed(seed)
    net = _network()
    order = torch.Generator().manual_seed(seed)
    loss_fn = MaskedMultiTaskLoss(_TASKS)
    scheduler = TaskDropScheduler(
        _TASKS,
        [TaskIncompleteness(), Constant()],
        epochs=args.epochs,
        cooldown_epochs=_SCHEDULES[schedule],
        generator=seed,
    )
    scheduler.attach(net)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    forgot = dict.fromkeys(_TASKS, 0)
    dropped = dict.fromkeys(_TASKS, 0)
    started = time.perf_counter()
    for _ in range(args.epochs):
        gates, before = scheduler.gates, scheduler.epoch_losses
        for batch in torch.randperm(len(train.images), generator=order).split(args.batch_size):
            targets = {task: target[batch] for task, target in train.targets.items()}
            losses = loss_fn(net(train.images[batch]), targets)
            optimizer.zero_grad()
            scheduler(losses, loss_fn.label_counts).backward()
            optimizer.step()
        scheduler.step()
        for task, kept in gates.items():
            if not kept:
                dropped[task] += 1
                forgot[task] += scheduler.epoch_losses[task] > before[task]
    return _Run(schedule, seed, _scores(net, test), forgot, dropped, time.perf_counter() - started)


@torch.no_grad()
def _scores(net: MultiHeadNet, test: _Split) -> dict[str, float]:
    outputs = net.eval()(test.images)
    scores = {}
    for task, kind in _TASKS.items():
        output, target = outputs[task], test.targets[task]
        if kind == "multiclass":
            scores[task] = (output.argmax(1) == target).float().mean().item()
        elif kind == "binary":
            scores[task] = ((output.squeeze(1) > 0).float() == target).float().mean().item()
        else:
            scores[task] = (output.squeeze(1) - target).abs().mean().item()
    return scores


def _summary(runs: Sequence[_Run], test: _Split) -> str:
    lines = [
        "",
        "task | measure | paper | cool-down | dropped epochs | runs that forgot "
        "(paper / cool-down)",
    ]
    by_schedule = {name: [run for run in runs if run.schedule == name] for name in _SCHEDULES}
    for task, kind in _TASKS.items():
        measure = "test MAE" if kind == "regression" else "test accuracy"
        cells = []
        for schedule in _SCHEDULES:
            scores = [run.scores[task] for run in by_schedule[schedule]]
            spread = statistics.stdev(scores) if len(scores) > 1 else float("nan")
            cells.append(f"{statistics.mean(scores):.4f} +- {spread:.4f}")
        dropped = [sum(run.dropped[task] for run in by_schedule[name]) for name in _SCHEDULES]
        forgot = [sum(run.forgot[task] > 0 for run in by_schedule[name]) for name in _SCHEDULES]
        lines.append(
            f"{task} | {measure} | {' | '.join(cells)} | {dropped[0]} / {dropped[1]} | "
            f"{forgot[0]} / {forgot[1]}"
        )
    for task, kind in _TASKS.items():
        if kind == "regression":
            target = test.targets[task]
            mae = (target - target.mean()).abs().mean().item()
            lines.append(f"{task}: predicting the test mean gives MAE {mae:.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
