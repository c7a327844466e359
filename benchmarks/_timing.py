"""What both benchmarks share: their settings from the command line, and the timing loop."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    _Settings = TypeVar("_Settings", bound=DataclassInstance)


def positive_int(text: str) -> int:
    """A count that must be at least 1 (an argparse type)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """A count that may be 0 (an argparse type)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def add_settings_options(
    parser: argparse.ArgumentParser, defaults: Mapping[str, DataclassInstance]
) -> None:
    """The options both benchmarks share, each with its default per device in the help."""

    def shown(field: str) -> str:
        return ", ".join(f"{device} {getattr(s, field)}" for device, s in defaults.items())

    parser.add_argument(
        "--image-size", type=positive_int, help=f"input resolution, pixels [{shown('image_size')}]"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, help=f"images per step [{shown('batch_size')}]"
    )
    parser.add_argument(
        "--steps", type=positive_int, help=f"timed steps per repetition [{shown('steps')}]"
    )
    parser.add_argument(
        "--repeats", type=positive_int, help=f"timed repetitions [{shown('repeats')}]"
    )
    parser.add_argument(
        "--warmup", type=non_negative_int, help=f"untimed steps first [{shown('warmup')}]"
    )
    parser.add_argument(
        "--threads", type=positive_int, help="torch intra-op threads [torch's default]"
    )


def with_overrides(defaults: _Settings, args: argparse.Namespace) -> _Settings:
    """``defaults`` with each field that the command line gave replaced by its value."""
    given = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(defaults)
        if getattr(args, field.name) is not None
    }
    return dataclasses.replace(defaults, **given)


def time_interleaved(
    variants: Mapping[str, Callable[[], None]],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    steps: int,
) -> dict[str, list[float]]:
    """Seconds per step of each variant, one entry per repetition.

    The variants take turns within each repetition (ABCABC...), so that drift in clock
    speed or load hits them alike. The device queue is drained before and after each timed
    block, and only there: a sync inside the block would stall the host-device overlap
    that the code under test must not break.
    """
    for step in variants.values():
        for _ in range(warmup):
            step()
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, step in variants.items():
            synchronize(device)
            started = time.perf_counter()
            for _ in range(steps):
                step()
            synchronize(device)
            seconds[name].append((time.perf_counter() - started) / steps)
    return seconds


def device_conditions(device: torch.device) -> str:
    """What a reader needs to compare a run: the GPU's name, or the CPU's threads and load."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, bf16 autocast"
    # The load average says how much else shared the cores while this ran.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"torch threads: {torch.get_num_threads()}, float32, load average {load:.1f} at start"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
