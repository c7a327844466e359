"""Two gloo processes on the CPU: shared epoch statistics, identical gates, uneven data and
DistributedDataParallel with attached heads."""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.multiprocessing.spawn import spawn
from torch.nn.parallel import DistributedDataParallel

from dstmtl import MaskedMultiTaskLoss, MultiHeadNet, TaskDropScheduler
from dstmtl.metrics import Constant, EpochStatistics, Metric, TaskIncompleteness

TASKS = ["a", "b", "c", "d", "e", "f"]


def _worker(rank: int, world_size: int, directory: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{directory}/store", rank=rank, world_size=world_size
    )
    try:
        # Different seeds on purpose: the gates must still agree.
        scheduler = TaskDropScheduler(
            TASKS, [TaskIncompleteness(), Constant()], min_active_tasks=0, generator=rank
        )
        record = []
        for epoch in range(8):
            for step in range(3):
                # Rank 1 sees larger losses: the epoch means must pool both ranks.
                base = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) / (1 + epoch) ** (
                    torch.arange(6) / 3
                )
                scheduler(base * (1 + rank) + step, torch.tensor([1, 2, 3, 4, 5, 6]) + rank)
            scheduler.step()
            record.append(
                {
                    "losses": scheduler.epoch_losses,
                    "gates": scheduler.gates,
                    "p": scheduler.keep_probabilities,
                    "counts": scheduler.label_counts,
                }
            )
        (Path(directory) / f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_statistics_and_gates(tmp_path: Path) -> None:
    spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    first_epoch = ranks[0][0]["losses"]
    # mean over both ranks and the 3 steps of (base * (1 + rank) + step): 1.5 base + 1
    assert list(first_epoch.values()) == pytest.approx([2.5, 4.0, 5.5, 7.0, 8.5, 10.0])
    # label counts summed over 3 steps and both ranks: 3 * ((j + 1) + (j + 2))
    assert list(ranks[0][0]["counts"].values()) == [9.0, 15.0, 21.0, 27.0, 33.0, 39.0]
    gate_patterns = {tuple(epoch["gates"].values()) for epoch in ranks[0]}
    assert len(gate_patterns) > 1  # tasks were actually dropped and redrawn


def _spawn_with_timeout(worker: Callable[..., None], directory: Path, seconds: float) -> None:
    """Run ``worker(rank, 2, directory)`` on two processes; a hang fails the test."""
    context = spawn(worker, args=(2, str(directory)), nprocs=2, join=False)
    deadline = time.monotonic() + seconds
    while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two ranks did not finish within {seconds} s: a hang")


def _init(rank: int, world_size: int, directory: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{directory}/store",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=30),
    )


class _Half(Metric):
    name = "half"

    def __call__(self, stats: EpochStatistics) -> Tensor:
        return torch.full((len(stats.task_names),), 0.5, dtype=torch.float64)


def _redraw_worker(rank: int, world_size: int, directory: str) -> None:
    _init(rank, world_size, directory)
    try:
        # No seed: each rank seeds from the operating system; step() shares rank 0's state.
        scheduler = TaskDropScheduler(TASKS, [_Half()], redraw_every=1, min_active_tasks=0)
        seen = []
        for _ in range(4):  # epochs
            for _ in range(5):
                scheduler(torch.ones(6))
                seen.append(scheduler.gates)
            scheduler.step()
        # Uneven data: rank 1 has one batch more.
        for _ in range(5 + rank):
            scheduler(torch.ones(6))
        try:
            scheduler.step()
            error = ""
        except RuntimeError as raised:
            error = str(raised)
        (Path(directory) / f"rank{rank}.json").write_text(json.dumps([seen, error]))
    finally:
        dist.destroy_process_group()


def test_per_step_redraws_agree_without_collectives_and_uneven_calls_raise(
    tmp_path: Path,
) -> None:
    _spawn_with_timeout(_redraw_worker, tmp_path, seconds=120)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0][0] == ranks[1][0]  # the same gates at every call
    assert len({tuple(gates.values()) for gates in ranks[0][0]}) > 3  # and they did change
    for _, error in ranks:
        assert "same number of scheduler calls per epoch" in error
        assert "from 5 to 6" in error
        assert "DistributedSampler with drop_last=True" in error


def _ddp_worker(rank: int, world_size: int, directory: str) -> None:
    _init(rank, world_size, directory)
    try:
        torch.manual_seed(0)
        tasks = ["a", "b", "c"]
        model = MultiHeadNet(
            nn.Sequential(nn.Linear(4, 8), nn.ReLU()), {t: nn.Linear(8, 1) for t in tasks}
        )
        ddp_model = DistributedDataParallel(model)
        optimizer = torch.optim.Adam(ddp_model.parameters(), lr=1e-2)
        scheduler = TaskDropScheduler(tasks, [_KeepAAndC()], generator=rank)
        scheduler.attach(model, optimizer)
        loss_fn = MaskedMultiTaskLoss(dict.fromkeys(tasks, "binary"))
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(rank))
        y = (x[:, :3] > 0).float()
        weights = {t: model.heads[t].get_parameter("weight") for t in tasks}
        moved = {}
        for _ in range(3):  # epochs; b is dropped in the third
            before = {t: weights[t].detach().clone() for t in tasks}
            for _ in range(3):
                optimizer.zero_grad()
                scheduler(loss_fn(ddp_model(x), y), loss_fn.label_counts).backward()
                optimizer.step()
            moved = {t: float((weights[t] - before[t]).abs().sum()) for t in tasks}
            scheduler.step()
        (Path(directory) / f"rank{rank}.json").write_text(json.dumps(moved))
    finally:
        dist.destroy_process_group()


def test_under_ddp_an_attached_dropped_head_does_not_move(tmp_path: Path) -> None:
    _spawn_with_timeout(_ddp_worker, tmp_path, seconds=120)
    for rank in range(2):
        moved = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert moved["b"] == 0.0  # dropped in the third epoch
        assert moved["a"] > 0.0
        assert moved["c"] > 0.0


class _KeepAAndC(Metric):
    name = "keep_a_and_c"

    def __call__(self, stats: EpochStatistics) -> Tensor:
        return torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
