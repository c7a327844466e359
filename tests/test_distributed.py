"""Two gloo processes on the CPU: shared epoch statistics and identical gates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import spawn

from dstmtl import TaskDropScheduler
from dstmtl.metrics import Constant, TaskIncompleteness

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
