"""Property tests (hypothesis) of the terms, the probabilities and the masked loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dstmtl import MaskedMultiTaskLoss, Task, TaskDropScheduler
from dstmtl.metrics import (
    Constant,
    LabelCount,
    Metric,
    NetworkDepth,
    TaskIncompleteness,
    TaskStagnancy,
)

positive = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)


# Any epoch mean the scheduler can meet: 0, negative (a loss that can go below 0), not
# measured (NaN) or overflowed.
any_mean = st.one_of(
    positive,
    st.just(0.0),
    st.floats(min_value=-1e3, max_value=-1e-3),
    st.sampled_from([math.nan, math.inf]),
)


@st.composite
def loss_histories(
    draw: st.DrawFn, values: st.SearchStrategy[float] = positive
) -> list[list[float]]:
    tasks = draw(st.integers(min_value=1, max_value=6))
    epochs = draw(st.integers(min_value=2, max_value=6))
    return [[draw(values) for _ in range(tasks)] for _ in range(epochs)]


def all_metrics(tasks: int) -> list[Metric]:
    return [
        Constant(),
        NetworkDepth([float(j + 1) for j in range(tasks)]),
        LabelCount([float(10 * (j + 1)) for j in range(tasks)]),
        TaskIncompleteness(),
        TaskStagnancy(),
    ]


def drive(history: list[list[float]], metrics: list[Metric]) -> TaskDropScheduler:
    names = [f"t{j}" for j in range(len(history[0]))]
    scheduler = TaskDropScheduler(names, metrics, generator=0)
    for losses in history:
        scheduler.step(losses)
    return scheduler


@settings(max_examples=100, deadline=None)
@given(loss_histories(any_mean))
def test_probabilities_are_in_the_unit_interval(history: list[list[float]]) -> None:
    scheduler = drive(history, all_metrics(len(history[0])))
    probabilities = list(scheduler.keep_probabilities.values())
    assert all(0.0 <= p <= 1.0 for p in probabilities)
    assert all(p >= 0.2 - 1e-12 for p in probabilities)  # the constant term's floor, 1/5
    for term in scheduler.terms.values():
        assert all(0.0 <= value <= 1.0 for value in term.values())


@settings(max_examples=60, deadline=None)
@given(loss_histories(), st.randoms(use_true_random=False))
def test_permuting_tasks_permutes_the_outputs(history: list[list[float]], rng: object) -> None:
    tasks = len(history[0])
    order = list(range(tasks))
    rng.shuffle(order)  # type: ignore[attr-defined]
    depths = [float(j + 1) for j in range(tasks)]
    counts = [float(7 * j + 3) for j in range(tasks)]

    def metrics(permutation: list[int]) -> list[Metric]:
        return [
            NetworkDepth([depths[j] for j in permutation]),
            LabelCount([counts[j] for j in permutation]),
            TaskIncompleteness(),
            TaskStagnancy(),
        ]

    original = drive(history, metrics(list(range(tasks))))
    permuted = drive([[row[j] for j in order] for row in history], metrics(order))
    original_p = list(original.keep_probabilities.values())
    permuted_p = list(permuted.keep_probabilities.values())
    # Means sum in another order, so equal up to rounding.
    assert permuted_p == pytest.approx([original_p[j] for j in order], rel=1e-12, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(loss_histories(), st.data())
def test_scaling_a_task_changes_neither_incompleteness_nor_stagnancy(
    history: list[list[float]], data: st.DataObject
) -> None:
    task = data.draw(st.integers(min_value=0, max_value=len(history[0]) - 1))
    factor = data.draw(st.sampled_from([0.25, 0.5, 2.0, 8.0]))  # exact in binary floating point
    scaled = [
        [value * factor if j == task else value for j, value in enumerate(row)] for row in history
    ]
    original = drive(history, [TaskIncompleteness(), TaskStagnancy()])
    rescaled = drive(scaled, [TaskIncompleteness(), TaskStagnancy()])
    for name in ("task_incompleteness", "task_stagnancy"):
        for a, b in zip(original.terms[name].values(), rescaled.terms[name].values(), strict=True):
            assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@settings(max_examples=30, deadline=None)
@given(loss_histories())
def test_constant_alone_keeps_every_task(history: list[list[float]]) -> None:
    scheduler = drive(history, [Constant()])
    assert set(scheduler.keep_probabilities.values()) == {1.0}
    assert all(scheduler.gates.values())


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 5), st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_masked_loss_equals_the_plain_loss_over_labelled_samples(
    batch: int, tasks: int, seed: int, missing: float
) -> None:
    generator = torch.Generator().manual_seed(seed)
    names = [f"t{j}" for j in range(tasks)]
    logits = torch.randn(batch, tasks, generator=generator, dtype=torch.float64)
    targets = (torch.rand(batch, tasks, generator=generator) < 0.5).double()
    targets[torch.rand(batch, tasks, generator=generator) < missing] = math.nan
    loss = MaskedMultiTaskLoss(dict.fromkeys(names, "binary"))
    result = loss({name: logits[:, j] for j, name in enumerate(names)}, targets)
    for j in range(tasks):
        labelled = ~targets[:, j].isnan()
        if labelled.any():
            expected = F.binary_cross_entropy_with_logits(logits[labelled, j], targets[labelled, j])
            assert math.isclose(result[j].item(), expected.item(), rel_tol=1e-9, abs_tol=1e-12)
        else:
            assert result[j].item() == 0.0
        assert loss.label_counts[j].item() == labelled.sum().item()


@settings(max_examples=60, deadline=None)
@given(
    st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
    st.integers(2, 4),
    st.booleans(),
    st.sampled_from([0.0, 0.1, 0.5]),
    st.one_of(st.none(), st.floats(0.125, 10.0, width=32)),
    st.floats(0.0, 1.0),
    st.integers(0, 2**31 - 1),
)
def test_dense_masked_losses_equal_the_plain_losses_over_labelled_elements(
    maps: tuple[int, int, int],
    classes: int,
    weighted: bool,
    label_smoothing: float,
    pos_weight: float | None,
    missing: float,
    seed: int,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    # Option tensors hold the default dtype, float32: weights it represents exactly.
    weights = (torch.rand(classes, generator=generator) + 0.1).double()
    segmentation = Task(
        "multiclass",
        outputs=classes,
        class_weights=weights if weighted else None,
        label_smoothing=label_smoothing,
    )
    tasks = {
        "seg": segmentation,
        "seg2": segmentation,  # same shape and options: computed with "seg"
        "mask": Task("binary", pos_weight=pos_weight),
        "depth": Task("regression"),
        "depth2": Task("regression"),
    }
    batch, height, width = maps

    def outputs_of(channels: int) -> torch.Tensor:
        return torch.randn(batch, channels, height, width, generator=generator, dtype=torch.float64)

    def absent() -> torch.Tensor:
        return torch.rand(maps, generator=generator) < missing

    outputs = {name: outputs_of(classes if name.startswith("seg") else 1) for name in tasks}
    targets = {
        name: torch.randint(0, classes, maps, generator=generator).masked_fill(absent(), -1)
        for name in ("seg", "seg2")
    }
    targets["mask"] = (torch.rand(maps, generator=generator) < 0.5).double()
    targets["depth"] = torch.randn(maps, generator=generator, dtype=torch.float64)
    targets["depth2"] = torch.randn(maps, generator=generator, dtype=torch.float64)
    for name in ("mask", "depth", "depth2"):
        targets[name] = targets[name].masked_fill(absent(), math.nan)
    loss = MaskedMultiTaskLoss(tasks)
    result = loss(outputs, targets)

    for j, name in enumerate(tasks):
        target = targets[name]
        labelled = target != -1 if name.startswith("seg") else ~target.isnan()
        if not labelled.any():
            expected = torch.tensor(0.0)
        elif name.startswith("seg"):
            expected = F.cross_entropy(
                outputs[name].movedim(1, -1)[labelled],  # [labelled pixels, C]
                target[labelled],
                weight=weights if weighted else None,
                label_smoothing=label_smoothing,
            )
        elif name == "mask":
            expected = F.binary_cross_entropy_with_logits(
                outputs[name][:, 0][labelled],
                target[labelled],
                pos_weight=None if pos_weight is None else torch.tensor(pos_weight).double(),
            )
        else:
            expected = F.mse_loss(outputs[name][:, 0][labelled], target[labelled])
        assert math.isclose(result[j].item(), expected.item(), rel_tol=1e-9, abs_tol=1e-12), name
        samples = labelled.flatten(1).any(dim=1).sum().item()
        assert loss.label_counts[j].item() == samples, name
        assert loss.count_labels(targets)[name] == samples, name
