"""The timing loop both benchmarks share: warm-up, then interleaved timed repetitions."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch


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


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
