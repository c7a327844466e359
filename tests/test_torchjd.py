"""DST composed with TorchJD: dropped tasks leave the loss vector before TorchJD sees it."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from dstmtl import MaskedMultiTaskLoss, MultiHeadNet, TaskDropScheduler
from dstmtl.metrics import EpochStatistics, Metric

torchjd = pytest.importorskip("torchjd")
from torchjd.aggregation import Mean as MeanAggregator  # noqa: E402
from torchjd.aggregation import UPGrad  # noqa: E402
from torchjd.autojac import backward, jac_to_grad, mtl_backward  # noqa: E402
from torchjd.scalarization import Mean  # noqa: E402

TASKS = ["a", "b", "c"]


class KeepAAndC(Metric):
    name = "keep_a_and_c"

    def __call__(self, stats: EpochStatistics) -> Tensor:
        return torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)


def setup() -> tuple[MultiHeadNet, MaskedMultiTaskLoss, TaskDropScheduler, Tensor, Tensor]:
    torch.manual_seed(0)
    model = MultiHeadNet(
        nn.Sequential(nn.Linear(5, 8), nn.ReLU()), {name: nn.Linear(8, 1) for name in TASKS}
    )
    loss_fn = MaskedMultiTaskLoss(dict.fromkeys(TASKS, "binary"))
    scheduler = TaskDropScheduler(TASKS, [KeepAAndC()], generator=0)
    scheduler.step([1.0, 1.0, 1.0])
    scheduler.step([1.0, 1.0, 1.0])
    x = torch.randn(16, 5)
    y = (torch.rand(16, 3) < 0.5).float()
    y[:4, 0] = math.nan
    return model, loss_fn, scheduler, x, y


def test_kept_losses_are_the_gated_subset() -> None:
    model, loss_fn, scheduler, x, y = setup()
    losses = loss_fn(model(x), y)
    kept = scheduler.kept_losses(losses, loss_fn.label_counts)
    assert torch.equal(kept, losses[[0, 2]])


def test_dst_then_an_aggregator_updates_only_kept_heads() -> None:
    model, loss_fn, scheduler, x, y = setup()
    features = model.forward_features(x)
    assert isinstance(features, Tensor)
    losses = loss_fn(model.forward_heads(features), y)
    kept = scheduler.kept_losses(losses, loss_fn.label_counts)
    # The binary losses come from one vectorised call, so they share graph nodes above the
    # features: keep the graph for the per-task backward passes.
    heads = [list(model.heads[name].parameters()) for name in scheduler.active_tasks]
    mtl_backward(list(kept), features=features, tasks_params=heads, retain_graph=True)
    jac_to_grad(list(model.backbone.parameters()), UPGrad())
    assert all(p.grad is not None for p in model.backbone.parameters())
    for name in TASKS:
        head = model.heads[name]
        assert isinstance(head, nn.Linear)
        assert (head.weight.grad is None) == (name == "b")

    # UPGrad with two tasks: the update does not conflict with either kept task's gradient.
    update = torch.cat([p.grad.flatten() for p in model.backbone.parameters()])  # type: ignore[union-attr]
    for j in range(2):
        grads = torch.autograd.grad(
            loss_fn(model(x), y)[[0, 2]][j], list(model.backbone.parameters())
        )
        assert torch.dot(update, torch.cat([g.flatten() for g in grads])) >= -1e-6


def test_dst_then_a_scalarizer_sees_only_kept_tasks() -> None:
    model, loss_fn, scheduler, x, y = setup()
    losses = loss_fn(model(x), y)
    total = Mean()(scheduler.kept_losses(losses, loss_fn.label_counts))
    assert total.item() == pytest.approx(((losses[0] + losses[2]) / 2).item())


class DropAll(Metric):
    name = "drop_all"

    def __call__(self, stats: EpochStatistics) -> Tensor:
        return torch.zeros(3, dtype=torch.float64)


def test_with_every_task_dropped_the_recipe_skips_the_update() -> None:
    torch.manual_seed(0)
    model = MultiHeadNet(
        nn.Sequential(nn.Linear(5, 8), nn.ReLU()), {name: nn.Linear(8, 1) for name in TASKS}
    )
    loss_fn = MaskedMultiTaskLoss(dict.fromkeys(TASKS, "binary"))
    scheduler = TaskDropScheduler(TASKS, [DropAll()], min_active_tasks=0, generator=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler.attach(model, optimizer)
    scheduler.step([1.0, 1.0, 1.0])
    scheduler.step([1.0, 1.0, 1.0])
    assert scheduler.active_tasks == ()
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(16, 5), (torch.rand(16, 3) < 0.5).float()
    features = model.forward_features(x)
    assert isinstance(features, Tensor)
    kept = scheduler.kept_losses(loss_fn(model.forward_heads(features), y), loss_fn.label_counts)
    assert kept.shape == (0,)
    with pytest.raises(ValueError, match="cannot be empty"):  # why the recipe has the guard
        mtl_backward(list(kept), features=features, retain_graph=True)
    optimizer.zero_grad()
    assert not scheduler.active_tasks  # the guard of docs/methods.md skips the backward
    optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    scheduler.step()
    assert scheduler.epoch_losses["a"] > 0  # the losses were still recorded


def test_with_branches_the_recipe_aggregates_the_right_gradients() -> None:
    # Head "a" reads an inner node ("1"), the others the output ("3"), so "1" is upstream of
    # "3": mtl_backward(features=[f1, f3]) would count the path through f3 twice.
    torch.manual_seed(0)
    model = MultiHeadNet(
        nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()),
        {name: nn.Linear(8, 1) for name in TASKS},
        branches={"a": "1"},
    )
    loss_fn = MaskedMultiTaskLoss(dict.fromkeys(TASKS, "binary"))
    scheduler = TaskDropScheduler(TASKS, [KeepAAndC()], generator=0)
    scheduler.step([1.0, 1.0, 1.0])
    scheduler.step([1.0, 1.0, 1.0])
    x, y = torch.randn(16, 5), (torch.rand(16, 3) < 0.5).float()
    shared = list(model.backbone.parameters())

    features = model.forward_features(x)
    assert isinstance(features, dict)
    kept = scheduler.kept_losses(loss_fn(model.forward_heads(features), y), loss_fn.label_counts)
    heads = [p for name in scheduler.active_tasks for p in model.heads[name].parameters()]
    backward(list(kept), inputs=shared, retain_graph=True)  # the recipe for branches
    kept.sum().backward(inputs=heads)
    jac_to_grad(shared, MeanAggregator())
    recipe = [p.grad for p in shared]
    head_b = model.heads["b"]
    assert isinstance(head_b, nn.Linear)
    assert head_b.weight.grad is None

    # With the mean aggregator, the update is the gradient of the kept losses' mean.
    losses = loss_fn(model(x), y)
    expected = torch.autograd.grad(losses[[0, 2]].mean(), shared)
    for got, want in zip(recipe, expected, strict=True):
        assert got is not None
        assert torch.allclose(got, want, atol=1e-6)
