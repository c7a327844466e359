"""Skipping the heads of dropped tasks (how-to (g)): they do not run, and the statistics
come from a held-out pass handed to step()."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dstmtl import MaskedMultiTaskLoss, MultiHeadNet, TaskDropScheduler
from dstmtl.metrics import EpochStatistics, Metric

TASKS = ["a", "b", "c"]


class _DropB(Metric):
    """Keeps "a" and "c" for sure and never "b"."""

    name = "drop_b"

    def __call__(self, stats: EpochStatistics) -> Tensor:
        return torch.tensor([1.0, 0.0, 1.0])


def test_skipped_heads_do_not_run_and_get_no_gradient() -> None:
    torch.manual_seed(0)
    heads = {t: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)) for t in TASKS}
    calls = dict.fromkeys(TASKS, 0)
    for task, head in heads.items():
        head.register_forward_hook(lambda *_, task=task: calls.__setitem__(task, calls[task] + 1))
    model = MultiHeadNet(nn.Linear(3, 4), heads)
    loss_fn = MaskedMultiTaskLoss(dict.fromkeys(TASKS, "regression"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = TaskDropScheduler(TASKS, [_DropB()], min_active_tasks=0, generator=0)
    scheduler.attach(model, optimizer)
    x, y = torch.randn(16, 3), torch.randn(16, 3)
    for held_out in ([1.0, 2.0, 3.0], [0.5, 1.5, 2.5]):  # warm-up, then the first draw
        scheduler.step(held_out)
    assert scheduler.active_tasks == ("a", "c")

    b_before = [p.detach().clone() for p in heads["b"].parameters()]
    outputs = model(x, tasks=scheduler.active_tasks)
    assert calls == {"a": 1, "b": 0, "c": 1}
    losses = loss_fn(outputs, y)
    assert losses[1].isnan()
    assert loss_fn.label_counts.tolist() == [16.0, 0.0, 16.0]
    total = scheduler(losses, loss_fn.label_counts)
    expected = losses[0] + losses[2]
    torch.testing.assert_close(total, expected)
    optimizer.zero_grad()
    total.backward()
    assert all(p.grad is None for p in heads["b"].parameters())
    assert all(p.grad is not None and p.grad.isfinite().all() for p in heads["a"].parameters())
    optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(heads["b"].parameters(), b_before, strict=True))

    # The dropped task recorded nothing; the held-out means are the epoch's statistics.
    logged = scheduler.step([0.25, 1.25, 2.0])
    assert scheduler.epoch_losses == {"a": 0.25, "b": 1.25, "c": 2.0}
    assert logged["epoch_loss/b"] == 1.25
