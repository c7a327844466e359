"""The three pieces together: a model that learns, gradients of dropped tasks, resuming,
and a per-step path that never reads device values on the host."""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

from dstmtl import MaskedMultiTaskLoss, MultiHeadNet, TaskDropScheduler
from dstmtl.metrics import Constant, EpochStatistics, Metric, TaskIncompleteness, TaskStagnancy

TASKS = ["t0", "t1", "t2", "t3"]


def toy_data(samples: int, seed: int) -> tuple[Tensor, Tensor]:
    """Four binary tasks, each the sign of a fixed linear function; 30% of labels missing."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(samples, 16, generator=generator)
    y = (x @ directions > 0).float()
    y[torch.rand(samples, 4, generator=generator) < 0.3] = math.nan
    return x, y


def toy_model(seed: int = 0) -> MultiHeadNet:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    return MultiHeadNet(backbone, {name: nn.Linear(32, 1) for name in TASKS})


def batches(x: Tensor, y: Tensor, epoch: int, size: int = 64) -> Iterator[tuple[Tensor, Tensor]]:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
    for start in range(0, len(x), size):
        index = order[start : start + size]
        yield x[index], y[index]


def train(
    model: MultiHeadNet,
    optimizer: torch.optim.Optimizer,
    scheduler: TaskDropScheduler,
    epochs: range,
    data: tuple[Tensor, Tensor],
) -> None:
    loss_fn = MaskedMultiTaskLoss(dict.fromkeys(TASKS, "binary"))
    for epoch in epochs:
        for x, y in batches(*data, epoch):
            losses = loss_fn(model(x), y)
            optimizer.zero_grad()
            scheduler(losses, loss_fn.label_counts).backward()
            optimizer.step()
        scheduler.step()


def test_a_small_model_learns_every_task() -> None:
    model = toy_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scheduler = TaskDropScheduler(
        TASKS, [TaskIncompleteness(), TaskStagnancy(), Constant()], generator=0
    )
    train(model, optimizer, scheduler, range(15), toy_data(2048, seed=1))

    x, y = toy_data(1024, seed=2)
    with torch.no_grad():
        outputs = model(x)
    for j, name in enumerate(TASKS):
        labelled = ~y[:, j].isnan()
        predicted = (outputs[name].squeeze(1) > 0).float()
        accuracy = (predicted[labelled] == y[labelled, j]).float().mean().item()
        assert accuracy > 0.9, (name, accuracy)  # chance is about 0.5
    assert scheduler.epoch == 15
    assert len(scheduler.terms) == 3


class Fixed(Metric):
    name = "fixed"

    def __call__(self, stats: EpochStatistics) -> Tensor:
        return torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)


def test_dropped_heads_get_zero_gradient_and_kept_heads_do_not() -> None:
    model = toy_model()
    scheduler = TaskDropScheduler(TASKS, [Fixed()], generator=0)
    scheduler.step([1.0] * 4)
    scheduler.step([1.0] * 4)
    assert scheduler.active_tasks == ("t0", "t2")
    x, y = toy_data(32, seed=3)
    loss_fn = MaskedMultiTaskLoss(dict.fromkeys(TASKS, "binary"))
    scheduler(loss_fn(model(x), y), loss_fn.label_counts).backward()
    for name in TASKS:
        head = model.heads[name]
        assert isinstance(head, nn.Linear)
        grad = head.weight.grad
        assert grad is not None  # every parameter is reached, as DDP needs
        if scheduler.gates[name]:
            assert grad.abs().sum() > 0, name
        else:
            assert torch.equal(grad, torch.zeros_like(grad)), name


def test_resumed_training_equals_uninterrupted_training() -> None:
    data = toy_data(512, seed=4)

    def fresh() -> tuple[MultiHeadNet, torch.optim.Optimizer, TaskDropScheduler]:
        model = toy_model(seed=5)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        metrics: list[Metric] = [TaskIncompleteness(), TaskStagnancy()]
        return model, optimizer, TaskDropScheduler(TASKS, metrics, loss_scaling=True, generator=9)

    model, optimizer, scheduler = fresh()
    train(model, optimizer, scheduler, range(6), data)

    first_model, first_optimizer, first_scheduler = fresh()
    train(first_model, first_optimizer, first_scheduler, range(3), data)
    buffer = io.BytesIO()
    torch.save(
        {
            "model": first_model.state_dict(),
            "optimizer": first_optimizer.state_dict(),
            "scheduler": first_scheduler.state_dict(),
        },
        buffer,
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed_model, resumed_optimizer, resumed_scheduler = fresh()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed_scheduler.load_state_dict(checkpoint["scheduler"])
    train(resumed_model, resumed_optimizer, resumed_scheduler, range(3, 6), data)

    assert resumed_scheduler.state_dict().keys() == scheduler.state_dict().keys()
    assert resumed_scheduler.keep_probabilities == scheduler.keep_probabilities
    assert resumed_scheduler.gates == scheduler.gates
    for (name, value), resumed in zip(
        model.state_dict().items(), resumed_model.state_dict().values(), strict=True
    ):
        assert torch.equal(value, resumed), name


def test_the_per_step_path_never_reads_device_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a tensor's value on the host is what synchronises with a GPU; forbid it."""
    model = toy_model()
    loss_fn = MaskedMultiTaskLoss(dict.fromkeys(TASKS, "binary"))
    scheduler = TaskDropScheduler(TASKS, [Fixed()], generator=0)
    scheduler.attach(model)  # the gradient hooks run in the backward passes below
    x, y = toy_data(64, seed=6)
    scheduler(loss_fn(model(x), y), loss_fn.label_counts)
    scheduler.step()
    scheduler(loss_fn(model(x), y), loss_fn.label_counts)
    scheduler.step()
    assert scheduler.active_tasks == ("t0", "t2")

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("host read of a tensor value in the per-step path")

    for method in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "nonzero"):
        monkeypatch.setattr(Tensor, method, forbidden)
    for _ in range(3):
        total = scheduler(loss_fn(model(x), y), loss_fn.label_counts)
        total.backward()
    monkeypatch.undo()
    assert math.isfinite(total.item())
    assert model.heads["t1"].get_parameter("weight").grad is None


def test_the_per_step_path_compiles_as_one_graph_under_bfloat16_autocast() -> None:
    model = toy_model()
    loss_fn = MaskedMultiTaskLoss(dict.fromkeys(TASKS, "binary"))
    scheduler = TaskDropScheduler(TASKS, [TaskIncompleteness()], generator=0)
    reference = copy.deepcopy(scheduler)
    x, y = toy_data(64, seed=7)

    def step_loss(
        outputs: dict[str, Tensor], targets: Tensor, scheduler: TaskDropScheduler
    ) -> Tensor:
        losses = loss_fn(outputs, targets)
        return scheduler(losses, loss_fn.label_counts)

    compiled = torch.compile(step_loss, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(x)
        expected = step_loss(outputs, y, reference)
        total = compiled(outputs, y, scheduler)
    assert torch.allclose(total, expected)
    total.backward()
    scheduler.step()
    reference.step()
    assert scheduler.epoch_losses == pytest.approx(reference.epoch_losses)


def test_a_compiled_step_compiles_once() -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = toy_model()
    loss_fn = MaskedMultiTaskLoss(dict.fromkeys(TASKS, "binary"))
    scheduler = TaskDropScheduler(TASKS, [Fixed()], generator=0).to("cpu")
    counter = CompileCounter()

    @torch.compile(fullgraph=True, backend=counter)
    def training_loss(x: Tensor, y: Tensor) -> Tensor:
        losses = loss_fn(model(x), y)
        return scheduler(losses, loss_fn.label_counts)

    x, y = toy_data(64, seed=8)
    totals = []
    for _ in range(3):  # the warm-up, the second epoch, then the gates of Fixed
        for _ in range(2):
            totals.append(training_loss(x, y))
        scheduler.step()
    assert scheduler.active_tasks == ("t0", "t2")
    total = training_loss(x, y)
    assert counter.frame_count == 1
    losses = loss_fn(model(x), y)
    assert torch.allclose(total, losses[0] + losses[2])
    assert torch.allclose(totals[0], losses.sum())


def _dropped_heads_run(
    optimizer_class: Callable[..., torch.optim.Optimizer],
    options: dict[str, float],
    *,
    attach_model: bool,
    kept_losses: bool,
) -> tuple[dict[str, float], float]:
    """Train with t1 and t3 dropped from the third epoch on; return how far each head moved
    in that epoch (L1), and how far the backbone did."""
    model = toy_model()
    optimizer = optimizer_class(model.parameters(), **options)
    scheduler = TaskDropScheduler(TASKS, [Fixed()], generator=0)
    scheduler.attach(model if attach_model else None, optimizer)
    loss_fn = MaskedMultiTaskLoss(dict.fromkeys(TASKS, "binary"))
    data = toy_data(256, seed=10)

    def epoch(number: int) -> None:
        for x, y in batches(*data, number):
            losses = loss_fn(model(x), y)
            optimizer.zero_grad()
            if kept_losses:
                scheduler.kept_losses(losses, loss_fn.label_counts).sum().backward()
            else:
                scheduler(losses, loss_fn.label_counts).backward()
            for name in TASKS:
                dropped = attach_model and not scheduler.gates[name]
                head = model.heads[name]
                assert isinstance(head, nn.Linear)
                assert (head.weight.grad is None) == dropped, name
            optimizer.step()
        scheduler.step()

    epoch(0)
    epoch(1)  # every task trained so far: the optimizer has momentum for every head
    assert scheduler.active_tasks == ("t0", "t2")
    before = copy.deepcopy(model.state_dict())
    epoch(2)
    after = model.state_dict()

    def moved(prefix: str) -> float:
        return sum(
            float((after[key] - before[key]).abs().sum())
            for key in before
            if key.startswith(prefix)
        )

    return {name: moved(f"heads.{name}.") for name in TASKS}, moved("backbone.")


@pytest.mark.parametrize(
    ("optimizer_class", "options"),
    [
        (torch.optim.Adam, {"lr": 1e-2}),
        (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-2}),
    ],
)
@pytest.mark.parametrize("kept_losses", [False, True])
def test_attached_dropped_heads_do_not_move(
    optimizer_class: Callable[..., torch.optim.Optimizer],
    options: dict[str, float],
    kept_losses: bool,
) -> None:
    moved, backbone = _dropped_heads_run(
        optimizer_class, options, attach_model=True, kept_losses=kept_losses
    )
    assert moved["t1"] == moved["t3"] == 0.0
    assert moved["t0"] > 0.01
    assert moved["t2"] > 0.01
    assert backbone > 0.01


def test_without_the_model_attached_dropped_heads_move_by_momentum() -> None:
    moved, _ = _dropped_heads_run(
        torch.optim.Adam, {"lr": 1e-2}, attach_model=False, kept_losses=False
    )
    assert moved["t1"] > 0.01  # zero gradients, but Adam's momentum still moves them
