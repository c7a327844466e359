"""Each DST term against values worked out by hand from dst-algorithm.md."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from dstmtl import MultiHeadNet, TaskDropScheduler
from dstmtl.metrics import (
    Constant,
    EpochStatistics,
    LabelCount,
    Metric,
    NetworkDepth,
    TaskIncompleteness,
    TaskStagnancy,
)

TASKS = ["a", "b", "c"]
# Three epochs of mean losses; task b gets worse in epoch 2 (negative progress).
HISTORY = [[1.0, 2.0, 4.0], [0.5, 1.8, 2.0], [0.25, 1.9, 1.5]]
STAT_TENSORS = ("losses", "previous_losses", "baseline_losses", "label_counts")


def run(metrics: list[Metric], history: list[list[float]], **kwargs: object) -> TaskDropScheduler:
    scheduler = TaskDropScheduler(TASKS[: len(history[0])], metrics, generator=0, **kwargs)  # type: ignore[arg-type]
    for losses in history:
        scheduler.step(losses)
    return scheduler


def values(scheduler: TaskDropScheduler, term: str) -> list[float]:
    return list(scheduler.terms[term].values())


def test_incompleteness_by_hand() -> None:
    scheduler = run([TaskIncompleteness()], HISTORY[:2])
    # A = [0.5, 0.9, 0.5], mean 19/30, u = min(1, A / mean)
    assert values(scheduler, "task_incompleteness") == pytest.approx([15 / 19, 1.0, 15 / 19])
    scheduler.step(HISTORY[2])
    # A = [0.25, 0.95, 0.375], mean 0.525
    assert values(scheduler, "task_incompleteness") == pytest.approx(
        [0.25 / 0.525, 1.0, 0.375 / 0.525]
    )
    assert scheduler.keep_probabilities == scheduler.terms["task_incompleteness"]


def test_stagnancy_by_hand_with_negative_progress() -> None:
    scheduler = run([TaskStagnancy(alpha=0.1)], HISTORY[:2])
    u1 = [15 / 19, 1.0, 15 / 19]
    r1 = [0.5 / u1[0], 0.1, 0.5 / u1[2]]  # (prev - cur) / prev / u; first update R = |r|
    mean_r1 = sum(r1) / 3
    assert values(scheduler, "task_stagnancy") == pytest.approx(
        [mean_r1 / r1[0], 1.0, mean_r1 / r1[2]]
    )
    scheduler.step(HISTORY[2])
    u2 = [0.25 / 0.525, 1.0, 0.375 / 0.525]
    r2 = [0.5 / u2[0], -0.1 / 1.8, 0.25 / u2[2]]
    assert r2 == pytest.approx([1.05, -1 / 18, 0.35])
    # r > 0: R <- 0.1 r + 0.9 R; task b went backwards, its R stays 0.1.
    rates = [0.1 * r2[0] + 0.9 * r1[0], r1[1], 0.1 * r2[2] + 0.9 * r1[2]]
    assert rates == pytest.approx([0.675, 0.1, 0.605])
    mean_r2 = sum(rates) / 3
    assert values(scheduler, "task_stagnancy") == pytest.approx([0.46 / 0.675, 1.0, 0.46 / 0.605])
    assert mean_r2 == pytest.approx(0.46)


def test_constant_terms_and_the_combined_probability() -> None:
    metrics: list[Metric] = [
        Constant(),
        NetworkDepth([17, 17, 26]),
        LabelCount({"a": 100, "b": 50, "c": 200}),
        TaskIncompleteness(),
        TaskStagnancy(),
    ]
    scheduler = run(metrics, HISTORY)
    assert values(scheduler, "constant") == [1.0, 1.0, 1.0]
    assert values(scheduler, "network_depth") == pytest.approx([17 / 26, 17 / 26, 1.0])
    assert values(scheduler, "label_count") == pytest.approx([0.5, 0.25, 1.0])
    u = [0.25 / 0.525, 1.0, 0.375 / 0.525]
    s = [0.46 / 0.675, 1.0, 0.46 / 0.605]
    expected = [
        (1 + 17 / 26 + 0.5 + u[0] + s[0]) / 5,
        (1 + 17 / 26 + 0.25 + u[1] + s[1]) / 5,
        (1 + 1 + 1 + u[2] + s[2]) / 5,
    ]
    assert list(scheduler.keep_probabilities.values()) == pytest.approx(expected)


def test_metric_weights_weight_the_mean() -> None:
    scheduler = run([Constant(), TaskIncompleteness()], HISTORY[:2], metric_weights=[1.0, 3.0])
    u = [15 / 19, 1.0, 15 / 19]
    assert list(scheduler.keep_probabilities.values()) == pytest.approx(
        [(1 + 3 * x) / 4 for x in u]
    )


def test_network_depth_from_a_multihead_net() -> None:
    backbone = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    deep_head = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    example = torch.zeros(1, 4)
    net = MultiHeadNet(backbone, {"a": nn.Linear(4, 1), "b": deep_head}, example_input=example)
    assert net.depths() == {"a": 3, "b": 4}
    scheduler = TaskDropScheduler(["a", "b"], [NetworkDepth(net)], generator=0)
    scheduler.step([1.0, 1.0])
    scheduler.step([1.0, 1.0])
    assert scheduler.terms["network_depth"] == {"a": 0.75, "b": 1.0}


def test_label_count_from_labels_with_missing_entries() -> None:
    floats = torch.tensor([[1.0, math.nan], [0.0, math.nan], [1.0, 0.0], [math.nan, 1.0]])
    classes = torch.tensor([[2, -1], [0, -1], [1, -1], [-1, 3]])
    for labels, expected in ((floats, [1.0, 2 / 3]), (classes, [1.0, 1 / 3])):
        scheduler = TaskDropScheduler(["a", "b"], [LabelCount(labels)], generator=0)
        scheduler.step([1.0, 1.0])
        scheduler.step([1.0, 1.0])
        assert list(scheduler.terms["label_count"].values()) == pytest.approx(expected)


# ------------------------------------------------------------------ edge cases (documented)


def test_zero_baseline_keeps_the_task_until_a_positive_loss_is_seen() -> None:
    scheduler = run([TaskIncompleteness()], [[0.0, 1.0], [0.0, 0.5]])
    assert scheduler.terms["task_incompleteness"] == {"a": 1.0, "b": 1.0}
    assert math.isnan(scheduler.baseline_losses["a"])
    scheduler.step([0.4, 0.5])  # a's first positive loss becomes its baseline
    scheduler.step([0.2, 0.5])  # A = [0.5, 0.5]
    assert scheduler.baseline_losses == {"a": 0.4, "b": 1.0}
    assert scheduler.terms["task_incompleteness"] == {"a": 1.0, "b": 1.0}


def test_zero_mean_ratio_keeps_every_task() -> None:
    scheduler = run([TaskIncompleteness(), TaskStagnancy()], [[1.0, 2.0], [0.0, 0.0]])
    assert scheduler.terms["task_incompleteness"] == {"a": 1.0, "b": 1.0}
    assert scheduler.terms["task_stagnancy"] == {"a": 1.0, "b": 1.0}


def test_zero_mean_rate_keeps_every_task() -> None:
    scheduler = run([TaskStagnancy()], [[1.0, 2.0], [1.0, 2.0]])  # r = R = [0, 0]
    assert scheduler.terms["task_stagnancy"] == {"a": 1.0, "b": 1.0}


def test_a_negative_epoch_mean_leaves_the_ratios_undefined() -> None:
    # A loss that can go below 0 (e.g. a Gaussian negative log-likelihood): the ratios
    # assume losses >= 0, so task a is handled as not measured while its mean is negative.
    history = [[1.0, 1.0, 1.0], [-0.5, 0.5, 0.25]]
    scheduler = run([TaskIncompleteness(), TaskStagnancy(alpha=0.1)], history)
    u1 = [1.0, 1.0, 0.25 / 0.375]  # A = [-, 0.5, 0.25], mean over b and c
    r1 = [0.5, 0.75 / u1[2]]  # b and c; a has no rate
    assert values(scheduler, "task_incompleteness") == pytest.approx(u1)
    assert values(scheduler, "task_stagnancy") == pytest.approx([1.0, 1.0, sum(r1) / 2 / r1[1]])
    scheduler.step([0.5, 0.25, 0.2])
    # A = [0.5, 0.25, 0.2] is defined again; a's rate is not (its previous mean is < 0).
    mean_a = 0.95 / 3
    u2 = [1.0, 0.25 / mean_a, 0.2 / mean_a]
    assert values(scheduler, "task_incompleteness") == pytest.approx(u2)
    rates = [0.1 * 0.5 / u2[1] + 0.9 * r1[0], 0.1 * 0.2 / u2[2] + 0.9 * r1[1]]
    mean_r = sum(rates) / 2
    assert values(scheduler, "task_stagnancy") == pytest.approx(
        [1.0, min(1.0, mean_r / rates[0]), mean_r / rates[1]]
    )


def test_zero_rate_gives_full_stagnancy() -> None:
    scheduler = run([TaskStagnancy()], [[1.0, 1.0], [1.0, 0.5]])
    # u = [1, 2/3]; r = [0, 0.5 / (2/3)] = [0, 0.75]; R = 0 -> s = 1; mean R 0.375
    assert list(scheduler.terms["task_stagnancy"].values()) == pytest.approx([1.0, 0.5])


def test_non_finite_and_unlabelled_epochs_keep_the_task() -> None:
    history = [[1.0, 1.0, 1.0], [math.nan, 0.5, math.inf], [0.5, 0.25, 0.5]]
    scheduler = run([TaskIncompleteness(), TaskStagnancy()], history[:2])
    assert math.isnan(scheduler.epoch_losses["a"])
    assert math.isnan(scheduler.epoch_losses["c"])  # inf is treated as not measured
    assert scheduler.terms["task_incompleteness"] == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert scheduler.terms["task_stagnancy"] == {"a": 1.0, "b": 1.0, "c": 1.0}
    scheduler.step(history[2])
    # a and c compare with their last finite loss (epoch 0): A = [0.5, 0.25, 0.5]
    assert list(scheduler.terms["task_incompleteness"].values()) == pytest.approx(
        [1.0, 0.25 / (1.25 / 3), 1.0]
    )


def test_single_task_is_always_kept() -> None:
    scheduler = run(
        [TaskIncompleteness(), TaskStagnancy(), NetworkDepth([5]), LabelCount([3])],
        [[2.0], [1.0], [0.9], [0.95]],
    )
    assert scheduler.keep_probabilities == {"a": 1.0}
    assert scheduler.gates == {"a": True}


def test_stagnancy_state_round_trips() -> None:
    metric = TaskStagnancy(alpha=0.3)
    run([metric], HISTORY[:2])
    restored = TaskStagnancy()
    restored.load_state_dict(metric.state_dict())
    stats = EpochStatistics(
        task_names=tuple(TASKS),
        epoch=2,
        losses=torch.tensor(HISTORY[2], dtype=torch.float64),
        previous_losses=torch.tensor(HISTORY[1], dtype=torch.float64),
        baseline_losses=torch.tensor(HISTORY[0], dtype=torch.float64),
        label_counts=torch.zeros(3, dtype=torch.float64),
    )
    assert torch.equal(restored(stats), metric(stats))
    two_tasks = dataclasses.replace(
        stats, task_names=("a", "b"), **{f: getattr(stats, f)[:2] for f in STAT_TENSORS}
    )
    with pytest.raises(ValueError, match="rates for 3 tasks but got statistics for 2 tasks"):
        restored(two_tasks)


# ---------------------------------------------------------------------------- bad input


def test_bad_metric_arguments() -> None:
    with pytest.raises(ValueError, match="alpha must be in"):
        TaskStagnancy(alpha=0.0)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\], got 5.0"):
        TaskStagnancy().load_state_dict({"alpha": 5.0, "rates": None})
    with pytest.raises(ValueError, match="rates in the state must be None or a 1-D tensor"):
        TaskStagnancy().load_state_dict({"alpha": 0.1, "rates": [0.5]})
    for depths in ([17, 0], [math.inf, 3], [math.nan, 3]):
        with pytest.raises(ValueError, match="depths must be positive and finite"):
            NetworkDepth(depths)
    with pytest.raises(ValueError, match="at least one positive"):
        LabelCount([0, 0])
    for counts in ([-1, 3], [math.inf, 3], [math.nan, 3]):
        with pytest.raises(ValueError, match="counts must be finite and non-negative"):
            LabelCount(counts)
    with pytest.raises(ValueError, match=r"shape \[N, K\]"):
        LabelCount(torch.ones(5))
    with pytest.raises(ValueError, match="infinite value; mark a missing label with NaN"):
        LabelCount(torch.tensor([[1.0, math.inf], [0.0, 1.0]]))
    scheduler = TaskDropScheduler(TASKS, [NetworkDepth({"a": 1, "b": 2, "x": 3})])
    scheduler.step([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"missing \['c'\], unexpected \['x'\]"):
        scheduler.step([1.0, 1.0, 1.0])
    scheduler = TaskDropScheduler(TASKS, [LabelCount([1, 2])])
    scheduler.step([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="has 2 values for 3 tasks"):
        scheduler.step([1.0, 1.0, 1.0])
