"""Three small tasks on generated data, shared by the integration examples.

Two binary tasks and a regression task read 8 random features; a fifth of task ``b``'s
labels are missing (NaN), so the masked loss and the label counts have something to do.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dstmtl import MaskedMultiTaskLoss, MultiHeadNet, TaskDropScheduler, TaskKind
from dstmtl.metrics import Constant, TaskIncompleteness

TASKS: dict[str, TaskKind] = {"a": "binary", "b": "binary", "c": "regression"}
FEATURES = 8


def make_data(samples: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Features ``[samples, 8]`` and labels ``[samples, 3]`` in the order of ``TASKS``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, FEATURES, generator=generator)
    labels = torch.stack(
        [
            (x[:, 0] + x[:, 1] > 0).float(),
            (x[:, 2] > 0).float(),
            2 * x[:, 3] + 0.1 * torch.randn(samples, generator=generator),
        ],
        dim=1,
    )
    missing = torch.rand(samples, generator=generator) < 0.2
    labels[missing, 1] = float("nan")
    return x, labels


def make_net() -> MultiHeadNet:
    backbone = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU())
    return MultiHeadNet(backbone, {name: nn.Linear(16, 1) for name in TASKS})


def make_loss() -> MaskedMultiTaskLoss:
    return MaskedMultiTaskLoss(TASKS)


def make_scheduler(seed: int = 0) -> TaskDropScheduler:
    return TaskDropScheduler(TASKS, [TaskIncompleteness(), Constant()], generator=seed)
