"""Training throughput of the CelebA example's input pipeline against its compute bound.

Generates CelebA-format JPEGs at the real 178x218 size with the example's demo generator
(so no dataset is needed), builds the example's batch sources from them
(``celeba_batches``: the uint8 cache, ``DeviceBatches``, ``prepare_batch``), then times the
study's training step (:class:`dstmtl.study.methods.Method` "dst": channels_last ResNet18
``MultiHeadNet`` with 8 binary heads -> ``MaskedMultiTaskLoss`` -> ``TaskDropScheduler`` ->
Adam) twice, interleaved: fed by the training source, and fed one fixed batch already
prepared on the device (the compute bound: same model, step, resolution and batch, no data
movement). Also reports the one-time cache build, the
evaluation rate, the peak GPU memory, and the study time these rates imply.

    PYTHONPATH=src:examples/celeba python benchmarks/throughput.py --device cuda
    PYTHONPATH=src:examples/celeba python benchmarks/throughput.py --device cpu \\
        --images 600 --image-size 64 --batch-size 32 --steps 10

The last line is pipeline / bound (target >= 0.9 on one H100); nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from _timing import (
    add_settings_options,
    device_conditions,
    synchronize,
    time_interleaved,
    with_overrides,
)
from arguments import non_negative_int, positive_int
from celeba_batches import celeba_batches
from celeba_files import DEFAULT_ATTRIBUTES, load_splits, locate
from celeba_study import build_model
from demo_data import generate_demo_celeba
from image_cache import prepare_batch
from protocols import PROTOCOLS
from torch import Tensor

from dstmtl import MaskedMultiTaskLoss
from dstmtl.study import StudyTask
from dstmtl.study.evaluation import evaluate
from dstmtl.study.methods import Method

# The official CelebA splits and the study's schedule (2 methods x 5 epochs, a validation
# pass after every epoch and one test pass per method), for the study-time estimate.
_CELEBA_TRAIN, _CELEBA_VALID, _CELEBA_TEST = 162_770, 19_867, 19_962
_CELEBA_IMAGES = _CELEBA_TRAIN + _CELEBA_VALID + _CELEBA_TEST
_METHODS, _EPOCHS = 2, 5
_STUDY_TARGET_S = 300.0
_RATIO_TARGET = 0.9
_CROP = 178  # the study's centre crop


@dataclass(frozen=True)
class _Settings:
    images: int
    image_size: int
    batch_size: int
    steps: int
    repeats: int
    warmup: int


# CUDA: the study's resolution and batch. CPU: small enough for about a minute on 2 cores.
_DEFAULTS = {
    "cuda": _Settings(
        images=20_000, image_size=128, batch_size=256, steps=50, repeats=5, warmup=10
    ),
    "cpu": _Settings(images=1_000, image_size=64, batch_size=32, steps=10, repeats=5, warmup=2),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
            return 2
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = with_overrides(_DEFAULTS["cuda" if device.type == "cuda" else "cpu"], args)
    with tempfile.TemporaryDirectory(prefix="dstmtl-throughput-") as scratch:
        root = Path(args.data) if args.data else Path(scratch) / "celeba"
        _benchmark(device, settings, root, Path(scratch) / "cache", args)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Training images/s of the CelebA example's pipeline (generated CelebA-format "
            "JPEGs -> uint8 cache -> DeviceBatches -> prepare_batch -> ResNet18 with 8 heads) "
            "divided by the images/s of the same step on a batch already on the device."
        ),
    )
    parser.add_argument("--device", help="cuda, cpu, ... [cuda when available]")
    parser.add_argument(
        "--images",
        type=positive_int,
        help="demo images to generate, all splits "
        f"[cuda {_DEFAULTS['cuda'].images}, cpu {_DEFAULTS['cpu'].images}]",
    )
    add_settings_options(parser, _DEFAULTS)
    parser.add_argument(
        "--data",
        help="folder for the generated images, kept and reused by later runs with the same "
        "--images [a temporary folder]",
    )
    parser.add_argument(
        "--workers",
        type=non_negative_int,
        help="cache-building processes, 0 for this one [all cores]",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    return parser


def _benchmark(
    device: torch.device,
    settings: _Settings,
    root: Path,
    cache_dir: Path,
    args: argparse.Namespace,
) -> None:
    cuda = device.type == "cuda"
    print(_header(device, settings, args.compile))
    generated = _demo_data(root, settings.images)
    print(
        f"demo data: {settings.images} images in {root}"
        + (f", generated in {generated:.1f} s" if generated is not None else ", reused")
    )
    files = locate(root)
    splits = load_splits(files, DEFAULT_ATTRIBUTES)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    sources = celeba_batches(
        splits,
        files.image_dir,
        crop=_CROP,
        image_size=settings.image_size,
        batch_size=settings.batch_size,
        device=device,
        cache_dir=cache_dir,
        workers=args.workers,
        progress=False,
    )
    build_s = time.perf_counter() - started
    build_rate = settings.images / build_s
    print(
        f"cache build: {settings.images} images in {build_s:.1f} s ({build_rate:.0f} img/s); "
        f"all {_CELEBA_IMAGES:,} CelebA images at this rate: {_CELEBA_IMAGES / build_rate:.0f} s"
    )
    if len(splits["train"]) < settings.batch_size:
        raise SystemExit(
            f"error: {len(splits['train'])} training images make no batch of "
            f"{settings.batch_size}; generate more with --images"
        )

    torch.manual_seed(0)
    model = build_model(PROTOCOLS["study"], DEFAULT_ATTRIBUTES, None).to(device)
    network = torch.compile(model) if args.compile else model
    loss_fn = MaskedMultiTaskLoss(dict.fromkeys(DEFAULT_ATTRIBUTES, "binary"))
    method = Method(
        "dst",
        model,
        loss_fn,
        learning_rate=1e-3,
        seed=0,
        train_labels=torch.from_numpy(splits["train"].labels),
        network=network,  # type: ignore[arg-type]
        # As the study runs it: bf16 autocast on a GPU (its precision "bfloat16").
        autocast=lambda: torch.autocast(device.type, torch.bfloat16, enabled=cuda),
    ).to(device)
    pipeline = _endless(sources["train"], settings.batch_size, method.end_epoch)
    generator = torch.Generator(device).manual_seed(1)
    size = settings.image_size
    fixed_images = prepare_batch(
        torch.randint(
            0,
            256,
            (settings.batch_size, 3, size, size),
            dtype=torch.uint8,
            generator=generator,
            device=device,
        ),
        train=True,
        generator=generator,
    )
    fixed_labels = torch.randint(
        0, 2, (settings.batch_size, len(DEFAULT_ATTRIBUTES)), generator=generator, device=device
    ).float()
    tasks = dict.fromkeys(DEFAULT_ATTRIBUTES, StudyTask("binary"))

    def from_pipeline() -> None:
        method.step(*next(pipeline))

    def from_device() -> None:
        method.step(fixed_images, fixed_labels)

    def evaluation_seconds() -> float:
        synchronize(device)
        started = time.perf_counter()
        # Ends by reading the metrics back, as the study does.
        evaluate(model, sources["valid"](epoch=0, seed=0), tasks, loss_fn)
        return time.perf_counter() - started

    try:
        seconds = time_interleaved(
            {"pipeline": from_pipeline, "bound": from_device},
            device,
            warmup=settings.warmup,
            repeats=settings.repeats,
            steps=settings.steps,
        )
    finally:
        pipeline.close()
    pipeline_rate = settings.batch_size / statistics.median(seconds["pipeline"])
    bound_rate = settings.batch_size / statistics.median(seconds["bound"])
    evaluation_seconds()  # warm-up: eval mode compiles anew with --compile
    evaluation = [evaluation_seconds() for _ in range(settings.repeats)]
    eval_rate = len(splits["valid"]) / statistics.median(evaluation)

    print(
        f"training, pipeline: {pipeline_rate:8.1f} img/s  (median of {settings.repeats} x "
        f"{settings.steps} steps; min {settings.batch_size / max(seconds['pipeline']):.1f}, "
        f"max {settings.batch_size / min(seconds['pipeline']):.1f})"
    )
    print(
        f"training, bound:    {bound_rate:8.1f} img/s  (min "
        f"{settings.batch_size / max(seconds['bound']):.1f}, "
        f"max {settings.batch_size / min(seconds['bound']):.1f})"
    )
    print(f"evaluation:         {eval_rate:8.1f} img/s  ({len(splits['valid'])} images per pass)")
    if cuda:
        print(
            f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB "
            "(with the preloaded images, when they fit)"
        )
    study_s = _study_seconds(pipeline_rate, eval_rate)
    print(
        f"study estimate at these rates ({_METHODS} methods x {_EPOCHS} epochs of "
        f"{_CELEBA_TRAIN:,} images, a validation pass of {_CELEBA_VALID:,} after each epoch, "
        f"a test pass of {_CELEBA_TEST:,} per method; cache build not included): "
        f"{study_s:.0f} s [{'PASS' if study_s <= _STUDY_TARGET_S else 'MISS'} <= "
        f"{_STUDY_TARGET_S:.0f} s]"
    )
    ratio = pipeline_rate / bound_rate
    print(
        f"throughput {device.type}: pipeline/bound = {ratio:.3f} "
        f"[{'PASS' if ratio >= _RATIO_TARGET else 'MISS'} >= {_RATIO_TARGET}]"
    )


def _endless(
    source: Callable[..., Iterable[tuple[Tensor, Tensor]]],
    batch_size: int,
    end_epoch: Callable[[], None],
) -> Generator[tuple[Tensor, Tensor], None, None]:
    """Training batches epoch after epoch, ending each epoch as the study does.

    Full batches only: a short last batch would add a shape (and, compiled, a
    recompilation) that the steady state of a 636-step CelebA epoch never sees.
    """
    epoch = 0
    while True:
        for inputs, targets in source(epoch=epoch, seed=0):
            if len(inputs) == batch_size:
                yield inputs, targets
        end_epoch()
        epoch += 1


def _demo_data(root: Path, images: int) -> float | None:
    """Generate the demo data unless ``root`` holds a complete set of ``images``; seconds."""
    partition = root / "list_eval_partition.txt"
    if partition.is_file() and len(partition.read_text().splitlines()) == images:
        return None
    started = time.perf_counter()
    generate_demo_celeba(root, n_images=images, seed=0, progress=False)
    return time.perf_counter() - started


def _study_seconds(train_rate: float, eval_rate: float) -> float:
    training = _METHODS * _EPOCHS * _CELEBA_TRAIN / train_rate
    evaluation = _METHODS * (_EPOCHS * _CELEBA_VALID + _CELEBA_TEST) / eval_rate
    return training + evaluation


def _header(device: torch.device, settings: _Settings, compiled: bool) -> str:
    return (
        f"{device.type} ({device_conditions(device)}), torch {torch.__version__}, "
        "ResNet18 channels_last"
        f"{', compiled' if compiled else ''}, {len(DEFAULT_ATTRIBUTES)} tasks, "
        f"{settings.image_size} px, batch {settings.batch_size}, {os.cpu_count()} CPU cores"
    )


if __name__ == "__main__":
    raise SystemExit(main())
