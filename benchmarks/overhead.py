"""What dstmtl adds to a training step, against the same step written by hand.

Times one training step through ``MultiHeadNet`` + ``MaskedMultiTaskLoss`` +
``TaskDropScheduler`` and the same step in plain PyTorch (same backbone, head weights,
optimizer and batch). The backbone is a small CNN (three convolutions, 64 pooled
features), so that what the library adds around it is not lost in the noise of a large
backbone; each binary task has a linear head on the 64 features. The library runs its
default: the heads as one ``FusedLinearHeads`` (what ``MultiHeadNet.from_torchvision``
builds), and, for comparison, one ``nn.Linear(64, 1)`` per task (``fuse_heads=False``).
The hand-written steps: one ``Linear(64, K)`` and one fused loss over the ``[B, K]``
logits, and one ``Linear(64, 1)`` and one loss call per task in a loop. The variants run
interleaved in one process (warm-up, then repetitions of ``--steps`` steps each, every
variant once per repetition) so that drift in clock speed or load hits them alike; the
medians are compared. Each task count is timed twice: the whole step, and the heads and
losses alone (the backbone replaced by random features).

    PYTHONPATH=src python benchmarks/overhead.py --device cpu --threads 1
    PYTHONPATH=src python benchmarks/overhead.py --device cuda

The last lines give, per device and task count, the library's time per step divided by
each hand-written one, with the targets (<= 1.03x the fused step, and no slower than the
loop) marked PASS or MISS; nothing is asserted.

A last measurement is what skipping the heads of dropped tasks saves
(``model(x, tasks=scheduler.active_tasks)``, docs/howto.md (g)): ``--decoder-tasks`` dense
tasks, each with a convolutional decoder that upsamples the encoder's map back to the
input size, half of them dropped, every head run against the kept heads only.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from _timing import add_settings_options, device_conditions, time_interleaved, with_overrides
from torch import Tensor, nn

from dstmtl import FusedLinearHeads, MaskedMultiTaskLoss, MultiHeadNet, TaskDropScheduler
from dstmtl.metrics import Constant, EpochStatistics, Metric, TaskIncompleteness

_FEATURES = 64  # the small CNN's pooled feature width
_MISSING_FRACTION = 0.3
_LIBRARY = "library (fused heads)"
_SEPARATE = "library, nn.Linear per task"
_FUSED = "hand-written, fused"
_LOOP = "hand-written, loss per task"
_MISSING = f"library, {_MISSING_FRACTION:.0%} missing labels"
_TARGET = 1.03  # library / hand-written fused step


@dataclass(frozen=True)
class _Settings:
    image_size: int
    batch_size: int
    steps: int
    repeats: int
    warmup: int


# CPU: about two minutes on 2 cores; many short repetitions, so that a burst of load
# from other jobs spoils few of them and the median stays sound. CUDA: the CelebA study's
# resolution and batch.
_DEFAULTS = {
    "cpu": _Settings(image_size=64, batch_size=32, steps=8, repeats=25, warmup=5),
    "cuda": _Settings(image_size=128, batch_size=256, steps=50, repeats=9, warmup=10),
}


# Dense decoders are far heavier per step than the linear heads: their own, small sizes.
_DECODER_DEFAULTS = {
    "cpu": _Settings(image_size=32, batch_size=8, steps=2, repeats=7, warmup=1),
    "cuda": _Settings(image_size=128, batch_size=64, steps=10, repeats=7, warmup=3),
}
_EVERY_HEAD = "every head (the paper's)"
_KEPT_HEADS = "kept heads only"


# The backbone replaced by its features: only what the variants differ in (heads, losses,
# backward through them, Adam on the heads). Steps of a few milliseconds, so many more.
_HEADS_ONLY_STEPS, _HEADS_ONLY_WARMUP = 50, 5


@dataclass(frozen=True)
class _Result:
    device: str
    num_tasks: int
    heads_only: bool
    seconds: dict[str, list[float]]  # per variant, seconds per step of each repetition

    def median(self, variant: str) -> float:
        return statistics.median(self.seconds[variant])

    def ratio(self, variant: str, baseline: str) -> float:
        return self.median(variant) / self.median(baseline)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    devices = [torch.device(name) for name in args.device.split(",")]
    if any(device.type == "cuda" for device in devices) and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    task_counts = [int(count) for count in args.tasks.split(",")]
    results: list[_Result] = []
    details: list[_Result] = []
    for device in devices:
        settings = with_overrides(_DEFAULTS["cuda" if device.type == "cuda" else "cpu"], args)
        print(_header(device, settings))
        heads_only = dataclasses.replace(
            settings, steps=_HEADS_ONLY_STEPS, warmup=_HEADS_ONLY_WARMUP
        )
        for num_tasks in task_counts:
            result = _benchmark(device, num_tasks, settings, heads_only=False)
            print(_table(result, settings.batch_size))
            parts = _benchmark(device, num_tasks, heads_only, heads_only=True)
            print(_table(parts, settings.batch_size))
            results.append(result)
            details.append(parts)
    print()
    for parts in details:
        print(
            f"overhead {parts.device} K={parts.num_tasks}, heads and losses only: library "
            f"{parts.median(_LIBRARY) * 1e3:.2f} ms, fused {parts.median(_FUSED) * 1e3:.2f} ms, "
            f"loop {parts.median(_LOOP) * 1e3:.2f} ms per step"
        )
    for result in results:
        print(
            f"overhead {result.device} K={result.num_tasks}, nn.Linear per task: "
            f"{result.ratio(_SEPARATE, _FUSED):.3f}x fused (the library with fuse_heads=False)"
        )
    for result in results:
        print(
            f"overhead {result.device} K={result.num_tasks}, {_MISSING_FRACTION:.0%} missing "
            f"labels: {result.ratio(_MISSING, _FUSED):.3f}x fused, "
            f"{result.ratio(_MISSING, _LOOP):.3f}x loop (not a target: the baselines have "
            "every label)"
        )
    for device in devices if args.decoder_tasks else ():
        saving = _decoder_saving(device, args.decoder_tasks)
        print(_table(saving, _DECODER_DEFAULTS[device.type].batch_size, baseline=_EVERY_HEAD))
        print(
            f"overhead {device.type} {args.decoder_tasks} dense decoders, half dropped: kept "
            f"heads only {saving.ratio(_KEPT_HEADS, _EVERY_HEAD):.3f}x every head"
        )
    for result in results:
        print(_summary(result))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Time a training step through MultiHeadNet + MaskedMultiTaskLoss + "
            "TaskDropScheduler against the same step written by hand (a loss per task in a "
            "loop, and one fused head and loss), for a small CNN with one binary head per "
            "task."
        ),
    )
    parser.add_argument(
        "--device",
        default="cpu,cuda" if torch.cuda.is_available() else "cpu",
        help="comma-separated devices to measure on [%(default)s]",
    )
    parser.add_argument(
        "--tasks", default="8,40", help="comma-separated numbers of tasks [%(default)s]"
    )
    parser.add_argument(
        "--decoder-tasks",
        type=int,
        default=4,
        help="dense tasks for the saving of skipped heads, 0 to leave it out [%(default)s]",
    )
    add_settings_options(parser, _DEFAULTS)
    return parser


def _benchmark(
    device: torch.device, num_tasks: int, settings: _Settings, *, heads_only: bool
) -> _Result:
    tasks = [f"task{j}" for j in range(num_tasks)]
    generator = torch.Generator().manual_seed(0)
    size = settings.image_size
    shape = (_FEATURES,) if heads_only else (3, size, size)
    images = torch.randn(settings.batch_size, *shape, generator=generator)
    # Every label present, so that the hand-written steps, which know nothing of missing
    # labels, compute the same objective as the library.
    targets = torch.randint(0, 2, (settings.batch_size, num_tasks), generator=generator).float()
    missing = torch.rand(targets.shape, generator=generator) < _MISSING_FRACTION
    incomplete = targets.masked_fill(missing, float("nan"))
    images = images.to(device)
    if not heads_only:
        images = images.contiguous(memory_format=torch.channels_last)
    targets, incomplete = targets.to(device), incomplete.to(device)

    backbone, linears = _network(num_tasks, heads_only)
    separate = dict(zip(tasks, linears, strict=True))
    fused = FusedLinearHeads.from_linears(separate)
    heads = nn.ModuleList(linears)
    variants = {
        _LIBRARY: _library_step(backbone, fused.heads(), images, targets),
        _SEPARATE: _library_step(backbone, separate, images, targets),
        _FUSED: _hand_written_step(
            backbone, _one_linear(linears), images, _fused_objective(targets)
        ),
        _LOOP: _hand_written_step(backbone, heads, images, _loop_objective(targets)),
        _MISSING: _library_step(backbone, fused.heads(), images, incomplete),
    }
    return _Result(
        device.type,
        num_tasks,
        heads_only,
        time_interleaved(
            variants, device, warmup=settings.warmup, repeats=settings.repeats, steps=settings.steps
        ),
    )


class _DropOdd(Metric):
    """Keeps the even tasks for sure and drops the odd ones: half the decoders idle."""

    name = "drop_odd"

    def __call__(self, stats: EpochStatistics) -> Tensor:
        return (torch.arange(len(stats.task_names)) % 2 == 0).double()


def _decoder_saving(device: torch.device, num_tasks: int) -> _Result:
    settings = _DECODER_DEFAULTS[device.type]
    tasks = [f"map{j}" for j in range(num_tasks)]
    generator = torch.Generator().manual_seed(0)
    size, batch = settings.image_size, settings.batch_size
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    targets = {t: torch.randn(batch, 1, size, size, generator=generator).to(device) for t in tasks}
    torch.manual_seed(0)
    encoder = nn.Sequential(
        nn.Conv2d(3, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
    )
    decoders = {
        t: nn.Sequential(
            nn.Upsample(scale_factor=4, mode="bilinear"),
            nn.Conv2d(64, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, 1),
        )
        for t in tasks
    }
    net = MultiHeadNet(encoder, decoders)

    def step(skip: bool) -> Callable[[], None]:
        model = _copy_to(net, device)
        loss_fn = MaskedMultiTaskLoss(dict.fromkeys(tasks, "regression"))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        scheduler = TaskDropScheduler(tasks, [_DropOdd()], min_active_tasks=0, generator=0)
        scheduler.attach(model, optimizer)
        scheduler.step([1.0] * num_tasks)
        scheduler.step([1.0] * num_tasks)  # the draw: the odd tasks are dropped

        def run() -> None:
            with _autocast(device):
                outputs = model(images, tasks=scheduler.active_tasks if skip else None)
                losses = loss_fn(outputs, targets)
            optimizer.zero_grad(set_to_none=True)
            scheduler(losses, loss_fn.label_counts).backward()
            optimizer.step()

        return run

    variants = {_EVERY_HEAD: step(skip=False), _KEPT_HEADS: step(skip=True)}
    seconds = time_interleaved(
        variants, device, warmup=settings.warmup, repeats=settings.repeats, steps=settings.steps
    )
    return _Result(device.type, num_tasks, heads_only=False, seconds=seconds)


def _network(num_tasks: int, heads_only: bool) -> tuple[nn.Module, list[nn.Linear]]:
    torch.manual_seed(0)
    backbone: nn.Module = nn.Identity()
    if not heads_only:
        layers: list[nn.Module] = []
        for channels_in, channels_out in ((3, 32), (32, 64), (64, _FEATURES)):
            layers += [
                nn.Conv2d(channels_in, channels_out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels_out),
                nn.ReLU(inplace=True),
            ]
        backbone = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return backbone, [nn.Linear(_FEATURES, 1) for _ in range(num_tasks)]


def _one_linear(heads: list[nn.Linear]) -> nn.ModuleList:
    """The per-task heads as the single ``Linear(64, K)`` one would write by hand."""
    fused = nn.Linear(_FEATURES, len(heads))
    with torch.no_grad():
        fused.weight.copy_(torch.cat([head.weight for head in heads]))
        fused.bias.copy_(torch.cat([head.bias for head in heads]))
    return nn.ModuleList([fused])


def _copy_to(module: nn.Module, device: torch.device) -> nn.Module:
    # Each variant trains its own copy from the same initial weights, with its own Adam.
    copied = copy.deepcopy(module).to(device).to(memory_format=torch.channels_last)
    return copied


def _autocast(device: torch.device) -> torch.autocast:
    # bf16 on CUDA as in the CelebA example; the CPU runs in float32.
    return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")


def _library_step(
    backbone: nn.Module,
    heads: Mapping[str, nn.Module],
    images: Tensor,
    targets: Tensor,
) -> Callable[[], None]:
    device = images.device
    tasks = list(heads)
    model = _copy_to(MultiHeadNet(backbone, heads), device)
    loss_fn = MaskedMultiTaskLoss(dict.fromkeys(tasks, "binary"))
    scheduler = TaskDropScheduler(tasks, [TaskIncompleteness(), Constant()], generator=0)
    # Two made-up epochs (a baseline, then tasks that improved by different amounts) so
    # that the keep probabilities fall below 1 and some gates are off, as after warm-up.
    scheduler.step([1.0] * len(tasks))
    scheduler.step(torch.linspace(0.2, 1.0, len(tasks)).tolist())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        with _autocast(device):
            losses = loss_fn(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        scheduler(losses, loss_fn.label_counts).backward()
        optimizer.step()

    return step


def _hand_written_step(
    backbone: nn.Module,
    heads: nn.ModuleList,
    images: Tensor,
    objective: Callable[[Tensor, nn.ModuleList], Tensor],
) -> Callable[[], None]:
    """A plain PyTorch step: ``objective(features, heads)`` is the loss to minimise."""
    device = images.device
    shared, branches = _copy_to(backbone, device), _copy_to(heads, device)
    assert isinstance(branches, nn.ModuleList)
    optimizer = torch.optim.Adam([*shared.parameters(), *branches.parameters()], lr=1e-3)

    def step() -> None:
        with _autocast(device):
            loss = objective(shared(images), branches)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _fused_objective(targets: Tensor) -> Callable[[Tensor, nn.ModuleList], Tensor]:
    def objective(features: Tensor, heads: nn.ModuleList) -> Tensor:
        logits = heads[0](features)  # one Linear(64, K)
        # Summed over [B, K] and divided by B: the sum of the per-task means, the objective
        # of the other steps.
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
        return loss / targets.shape[0]

    return objective


def _loop_objective(targets: Tensor) -> Callable[[Tensor, nn.ModuleList], Tensor]:
    def objective(features: Tensor, heads: nn.ModuleList) -> Tensor:
        losses = [
            F.binary_cross_entropy_with_logits(head(features).squeeze(1), targets[:, j])
            for j, head in enumerate(heads)
        ]
        return sum(losses[1:], losses[0])

    return objective


def _header(device: torch.device, settings: _Settings) -> str:
    return (
        f"\n{device.type} ({device_conditions(device)}), torch {torch.__version__}, "
        "small CNN channels_last, "
        f"{settings.image_size} px, batch {settings.batch_size}, Adam; median of "
        f"{settings.repeats} repetitions of {settings.steps} steps after {settings.warmup} "
        f"warm-up steps ({_HEADS_ONLY_STEPS} after {_HEADS_ONLY_WARMUP} for the heads and "
        "losses only)"
    )


def _table(result: _Result, batch_size: int, baseline: str = _FUSED) -> str:
    # Each variant's median over the baseline's (the hand-written fused step, or every
    # head for the decoders), and the ratio of the fastest repetitions beside it: on a
    # shared machine the noise only ever adds time, so the two agreeing is a sign the
    # figure is sound.
    fastest = min(result.seconds[baseline])
    title = "heads and losses only" if result.heads_only else "whole step"
    rows = [
        f"  K={result.num_tasks:<3} {title:<32} {'ms/step':>8} {'min':>8} {'max':>8} "
        f"{'img/s':>7}  {'ratio':>7} {'(min)':>6}"
    ]
    for name, seconds in result.seconds.items():
        median = statistics.median(seconds)
        # Images per second mean nothing without the backbone.
        rate = "" if result.heads_only else f"{batch_size / median:7.1f}"
        rows.append(
            f"  {'':5} {name:<32} {median * 1e3:8.2f} {min(seconds) * 1e3:8.2f} "
            f"{max(seconds) * 1e3:8.2f} {rate:>7}  {result.ratio(name, baseline):7.3f} "
            f"{min(seconds) / fastest:6.3f}"
        )
    return "\n".join(rows)


def _summary(result: _Result) -> str:
    fused, loop = result.ratio(_LIBRARY, _FUSED), result.ratio(_LIBRARY, _LOOP)
    return (
        f"overhead {result.device} K={result.num_tasks}: {fused:.3f}x fused "
        f"[{_mark(fused, _TARGET)} <= {_TARGET:.2f}], {loop:.3f}x loop "
        f"[{_mark(loop, 1.0)} <= 1.00]"
    )


def _mark(ratio: float, target: float) -> str:
    return "PASS" if ratio <= target else "MISS"


if __name__ == "__main__":
    raise SystemExit(main())
