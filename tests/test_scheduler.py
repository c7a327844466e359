"""TaskDropScheduler: the schedule, the draws, the per-step path and checkpointing."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import Tensor

from dstmtl import TaskDropScheduler
from dstmtl.metrics import Constant, EpochStatistics, Metric, TaskIncompleteness


class Fixed(Metric):
    """A term with given values, to drive the draws directly."""

    name = "fixed"

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def __call__(self, stats: EpochStatistics) -> Tensor:
        return torch.tensor(self.values, dtype=torch.float64)


def test_warm_up_then_draws_from_the_probabilities() -> None:
    scheduler = TaskDropScheduler(["a", "b", "c"], [Fixed([0.3, 0.6, 0.9])], generator=7)
    assert scheduler.gates == {"a": True, "b": True, "c": True}
    scheduler.step([1.0, 1.0, 1.0])  # warm-up: baseline only, every gate stays on
    assert scheduler.gates == {"a": True, "b": True, "c": True}
    assert scheduler.terms == {}
    assert scheduler.keep_probabilities == {"a": 1.0, "b": 1.0, "c": 1.0}

    reference = torch.Generator().manual_seed(7)
    for _ in range(5):
        scheduler.step([1.0, 1.0, 1.0])
        draws = torch.rand(3, generator=reference, dtype=torch.float64)
        expected = (draws < torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)).tolist()
        if not any(expected):  # min_active_tasks=1 switches on the most probable task
            expected[2] = True
        assert list(scheduler.gates.values()) == expected


def test_keep_frequencies_match_the_probabilities() -> None:
    probabilities = [0.2, 0.5, 0.8]
    scheduler = TaskDropScheduler(
        ["a", "b", "c"], [Fixed(probabilities)], min_active_tasks=0, generator=1
    )
    kept = torch.zeros(3)
    draws = 4000
    scheduler.step([1.0, 1.0, 1.0])
    for _ in range(draws):
        scheduler.step([1.0, 1.0, 1.0])
        kept += torch.tensor(list(scheduler.gates.values()), dtype=torch.float32)
    # Binomial standard deviation at p = 0.5 is 0.0079; 4 sigma.
    assert (kept / draws).tolist() == pytest.approx(probabilities, abs=0.032)


def test_min_active_tasks_switches_on_the_most_probable() -> None:
    scheduler = TaskDropScheduler(
        ["a", "b", "c"], [Fixed([0.0, 0.02, 0.01])], min_active_tasks=2, generator=0
    )
    scheduler.step([1.0, 1.0, 1.0])
    for _ in range(20):
        scheduler.step([1.0, 1.0, 1.0])
        assert sum(scheduler.gates.values()) >= 2
        assert scheduler.gates["b"]
        assert scheduler.gates["c"]


def test_every_gate_off_gives_a_zero_loss_with_a_gradient_path() -> None:
    scheduler = TaskDropScheduler(["a", "b"], [Fixed([0.0, 0.0])], min_active_tasks=0)
    scheduler.step([1.0, 1.0])
    scheduler.step([1.0, 1.0])
    assert scheduler.active_tasks == ()
    losses = torch.tensor([0.5, math.nan], requires_grad=True)
    total = scheduler(losses)
    assert total.item() == 0.0
    total.backward()
    assert losses.grad is not None
    assert losses.grad.tolist() == [0.0, 0.0]


def test_the_loss_is_the_gated_weighted_sum() -> None:
    scheduler = TaskDropScheduler(
        ["a", "b", "c"], [Fixed([1.0, 0.0, 1.0])], loss_scaling=True, generator=0
    )
    losses = torch.tensor([2.0, 1.0, 0.5], requires_grad=True)
    assert scheduler(losses).item() == pytest.approx(3.5)  # before any step: plain sum
    scheduler.step()  # baseline [2, 1, 0.5]: w = mean / baseline = [7/12, 7/6, 7/3]
    assert list(scheduler.loss_weights.values()) == pytest.approx([7 / 12, 7 / 6, 7 / 3])
    scheduler.step([1.0, math.inf, 0.25])
    assert scheduler.gates == {"a": True, "b": False, "c": True}
    losses = torch.tensor([1.0, math.nan, 0.25], requires_grad=True)
    weighted = scheduler.weighted_losses(losses)
    assert weighted.tolist() == pytest.approx([7 / 12, 0.0, 7 / 12])
    weighted.sum().backward()
    assert losses.grad is not None
    assert losses.grad.tolist() == pytest.approx([7 / 12, 0.0, 7 / 3])


def test_epoch_means_skip_unlabelled_and_non_finite_steps() -> None:
    scheduler = TaskDropScheduler(["a", "b", "c"], [Constant()])
    scheduler(torch.tensor([1.0, 4.0, 0.0]), torch.tensor([2, 1, 0]))
    scheduler(torch.tensor([3.0, math.nan, 0.0]), torch.tensor([5, 1, 0]))
    scheduler(torch.tensor([2.0, 2.0, 0.0]), torch.tensor([1, 0, 0]))
    scheduler.step()
    losses = scheduler.epoch_losses
    assert losses["a"] == pytest.approx(2.0)
    assert losses["b"] == pytest.approx(4.0)  # the NaN step and the unlabelled step are out
    assert math.isnan(losses["c"])  # no labelled sample in the whole epoch
    assert math.isnan(scheduler.baseline_losses["c"])
    scheduler(torch.tensor([1.0, 1.0, 1.0]))
    scheduler.step()
    assert scheduler.epoch_losses == {"a": 1.0, "b": 1.0, "c": 1.0}  # accumulators were reset


def test_redraw_every_n_steps() -> None:
    scheduler = TaskDropScheduler(
        ["a", "b", "c", "d"], [Fixed([0.5] * 4)], redraw_every=3, min_active_tasks=0, generator=3
    )
    losses = torch.ones(4)
    scheduler.step([1.0] * 4)
    scheduler.step([1.0] * 4)
    seen = []
    for _ in range(30):
        scheduler(losses)
        seen.append(tuple(scheduler.gates.values()))
    blocks = [seen[i : i + 3] for i in range(0, 30, 3)]
    assert all(len(set(block)) == 1 for block in blocks)  # constant within a block of 3
    assert len(set(seen)) > 3  # and redrawn between blocks


def test_each_loss_keeps_the_gates_it_was_built_with() -> None:
    # Gradient accumulation: several losses built, then one backward, with a redraw between
    # them, or a step() before the backward.
    scheduler = TaskDropScheduler(
        ["a", "b", "c", "d"], [Fixed([0.5] * 4)], redraw_every=1, min_active_tasks=0, generator=5
    )
    scheduler.step([1.0] * 4)
    scheduler.step([1.0] * 4)
    losses = [torch.ones(4, requires_grad=True) for _ in range(6)]
    gates = []
    total = torch.zeros(())
    for step_losses in losses:
        total = total + scheduler(step_losses)
        gates.append([float(g) for g in scheduler.gates.values()])
    scheduler.step()
    total.backward()
    assert len({tuple(g) for g in gates}) > 1  # the draws did change
    for step_losses, step_gates in zip(losses, gates, strict=True):
        assert step_losses.grad is not None
        assert step_losses.grad.tolist() == step_gates


def test_state_dict_round_trip_mid_epoch_continues_identically() -> None:
    def make() -> TaskDropScheduler:
        return TaskDropScheduler(
            ["a", "b", "c"],
            [TaskIncompleteness(), Constant()],
            loss_scaling=True,
            redraw_every=2,
            generator=11,
        )

    # 6 epochs of 5 steps; the checkpoint falls in the middle of epoch 3.
    events = [(epoch, step) for epoch in range(6) for step in range(5)]

    def play(scheduler: TaskDropScheduler, part: list[tuple[int, int]]) -> list[object]:
        record: list[object] = []
        for epoch, step in part:
            losses = torch.tensor([1.0, 2.0, 3.0]) / (1 + epoch + step / 5)
            losses[epoch % 3] *= 0.5
            record.append(scheduler(losses).item())
            record.append(scheduler.gates)
            if step == 4:
                scheduler.step()
                record.append((scheduler.keep_probabilities, scheduler.epoch_losses))
        return record

    uninterrupted = play(make(), events)
    first = make()
    before = play(first, events[:17])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert before + play(resumed, events[17:]) == uninterrupted


def test_load_state_dict_rejects_other_tasks_or_metrics() -> None:
    state = TaskDropScheduler(["a", "b"], [Constant()]).state_dict()
    with pytest.raises(ValueError, match=r"for tasks \['a', 'b'\]"):
        TaskDropScheduler(["a", "c"], [Constant()]).load_state_dict(state)
    with pytest.raises(ValueError, match=r"for metrics \['constant'\]"):
        TaskDropScheduler(["a", "b"], [TaskIncompleteness()]).load_state_dict(state)


def test_load_state_dict_names_a_dict_of_something_else() -> None:
    scheduler = TaskDropScheduler(["a", "b"], [Constant()])
    checkpoint = {"model": {}, "optimizer": {}, "scheduler": scheduler.state_dict()}
    with pytest.raises(ValueError, match=r"not a TaskDropScheduler state_dict: it has the keys \["):
        scheduler.load_state_dict({})
    with pytest.raises(ValueError, match=r"keys \['model', 'optimizer', 'scheduler'\], where"):
        scheduler.load_state_dict(checkpoint)
    model_state = {f"layer{j}.weight": torch.ones(1) for j in range(25)}
    with pytest.raises(ValueError, match=r"'layer9\.weight'\] and 15 more, where the keys \['task"):
        scheduler.load_state_dict(model_state)
    scheduler.load_state_dict(checkpoint["scheduler"])


def test_mean_losses_by_name_sequence_or_tensor() -> None:
    for means in ({"b": 2.0, "a": 1.0}, [1.0, 2.0], torch.tensor([1.0, 2.0])):
        scheduler = TaskDropScheduler(["a", "b"], [Constant()])
        scheduler.step(means)
        assert scheduler.epoch_losses == {"a": 1.0, "b": 2.0}


# ---------------------------------------------------------------------------- bad input


class OutOfRange(Metric):
    name = "out_of_range"

    def __call__(self, stats: EpochStatistics) -> Tensor:
        return torch.tensor([0.5, 1.5], dtype=torch.float64)


class WrongLength(Metric):
    name = "wrong_length"

    def __call__(self, stats: EpochStatistics) -> Tensor:
        return torch.ones(3)


@pytest.mark.parametrize(
    ("metric", "message"),
    [
        (OutOfRange(), r"outside \[0, 1\]: \{'a': 0.5, 'b': 1.5\}"),
        (WrongLength(), r"shape \(2,\), one value per task, got \(3,\)"),
    ],
)
def test_bad_metric_values(metric: Metric, message: str) -> None:
    scheduler = TaskDropScheduler(["a", "b"], [metric])
    scheduler.step([1.0, 1.0])
    with pytest.raises(ValueError, match=message):
        scheduler.step([1.0, 1.0])


def test_bad_construction() -> None:
    with pytest.raises(ValueError, match="task list is empty"):
        TaskDropScheduler([], [Constant()])
    with pytest.raises(ValueError, match=r"duplicate task names \['a'\]"):
        TaskDropScheduler(["a", "a"], [Constant()])
    with pytest.raises(TypeError, match="got the string 'ab'"):
        TaskDropScheduler("ab", [Constant()])
    with pytest.raises(ValueError, match="at least one metric"):
        TaskDropScheduler(["a"], [])
    with pytest.raises(TypeError, match="Metric instances"):
        TaskDropScheduler(["a"], [lambda stats: stats])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"metric names must differ, \['constant'\]"):
        TaskDropScheduler(["a"], [Constant(), Constant()])
    with pytest.raises(ValueError, match="min_active_tasks must be between 0 and"):
        TaskDropScheduler(["a", "b"], [Constant()], min_active_tasks=3)
    with pytest.raises(ValueError, match="metric_weights has 2 values for 1 metrics"):
        TaskDropScheduler(["a"], [Constant()], metric_weights=[1.0, 1.0])
    for weights in ([math.inf, 1.0], [math.nan, 1.0], [-1.0, 2.0], [0.0, 0.0]):
        with pytest.raises(ValueError, match="finite and non-negative with a positive sum"):
            TaskDropScheduler(["a"], [Constant(), Fixed([1.0])], metric_weights=weights)
    with pytest.raises(ValueError, match="redraw_every must be"):
        TaskDropScheduler(["a"], [Constant()], redraw_every=0)


def test_one_metric_outside_a_list_is_refused() -> None:
    with pytest.raises(TypeError, match=r"got Constant; pass a list, e\.g\. \[Constant\(\)\]"):
        TaskDropScheduler(["a"], Constant())  # type: ignore[arg-type]


@pytest.mark.parametrize("generator", ["cuda", 1.5, True])
def test_a_generator_that_is_no_seed_is_refused(generator: object) -> None:
    with pytest.raises(TypeError, match=r"int seed, a CPU torch\.Generator or None .*, got"):
        TaskDropScheduler(["a"], [Constant()], generator=generator)  # type: ignore[arg-type]


def test_bad_step_input() -> None:
    scheduler = TaskDropScheduler(["a", "b"], [Constant()])
    with pytest.raises(ValueError, match=r"shape \(2,\) for tasks \['a', 'b'\], got shape \(3,\)"):
        scheduler(torch.ones(3))
    with pytest.raises(ValueError, match=r"label_counts must have shape \(2,\)"):
        scheduler(torch.ones(2), torch.ones(1))
    with pytest.raises(ValueError, match=r"mean_losses keys .* missing \['b'\]"):
        scheduler.step({"a": 1.0})
    with pytest.raises(ValueError, match=r"one scalar loss per task name; \{'b': \(3,\)\}"):
        scheduler({"a": torch.ones(()), "b": torch.ones(3)})
    with pytest.raises(TypeError, match=r"got list; .* torch.stack\(losses\)"):
        scheduler([torch.ones(()), torch.ones(())])  # type: ignore[arg-type]


def test_step_input_of_the_wrong_type() -> None:
    scheduler = TaskDropScheduler(["a", "b"], [Constant()])
    with pytest.raises(TypeError, match=r"label_counts must be a \[2\] tensor .*, got 5 \(int\)"):
        scheduler(torch.ones(2), 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"floating-point losses, got torch\.int64"):
        scheduler(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match=r"mean_losses must hold one value per task .*'a' \(str\)"):
        scheduler.step("a")  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"mean_losses must hold one value per task .*1\.0 \(float\)"
    ):
        scheduler.step(1.0)  # type: ignore[arg-type]


def test_a_step_with_nothing_recorded_warns() -> None:
    scheduler = TaskDropScheduler(["a", "b"], [Constant()])
    with pytest.warns(UserWarning, match=r"no call since the last step\(\) recorded"):
        scheduler.step()  # before any loss
    scheduler(torch.tensor([1.0, 2.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler.step()
    with pytest.warns(UserWarning, match="every task counts as not measured"):
        scheduler.step()  # twice in a row
    scheduler(torch.tensor([1.0, 2.0]), torch.tensor([0, 0]))
    with pytest.warns(UserWarning, match="belongs at the end of each epoch"):
        scheduler.step()  # calls that recorded no labelled loss


class Nameless(Metric):
    def __call__(self, stats: EpochStatistics) -> Tensor:
        return torch.ones(len(stats.task_names))


def test_a_metric_without_a_name_is_refused() -> None:
    with pytest.raises(TypeError, match="metric Nameless has no `name`"):
        TaskDropScheduler(["a"], [Nameless()])


def test_state_dict_carries_the_settings() -> None:
    original = TaskDropScheduler(
        ["a", "b"],
        [Constant(), TaskIncompleteness()],
        metric_weights=[1.0, 3.0],
        loss_scaling=True,
        min_active_tasks=2,
        redraw_every=4,
    )
    restored = TaskDropScheduler(["a", "b"], [Constant(), TaskIncompleteness()])
    restored.load_state_dict(original.state_dict())
    assert restored.loss_scaling
    assert restored.min_active_tasks == 2
    assert restored.redraw_every == 4
    restored.step([1.0, 2.0])
    restored.step([0.5, 2.0])  # u = [2/3, 1]
    assert list(restored.keep_probabilities.values()) == pytest.approx([(1 + 2) / 4, 1.0])


def test_losses_by_name_are_checked_and_ordered() -> None:
    scheduler = TaskDropScheduler(["a", "b"], [Constant()])
    total = scheduler({"b": torch.tensor(2.0), "a": torch.tensor(0.5)})
    assert total.item() == 2.5
    scheduler.step()
    assert scheduler.epoch_losses == {"a": 0.5, "b": 2.0}
    with pytest.raises(ValueError, match=r"loss names .* missing \['b'\], unexpected \['c'\]"):
        scheduler({"a": torch.tensor(1.0), "c": torch.tensor(1.0)})


def test_state_dict_is_a_snapshot() -> None:
    scheduler = TaskDropScheduler(["a", "b"], [Constant()])
    scheduler(torch.tensor([1.0, 2.0]))
    state = scheduler.state_dict()
    scheduler(torch.tensor([5.0, 5.0]))  # later calls must not reach the saved state
    restored = TaskDropScheduler(["a", "b"], [Constant()])
    restored.load_state_dict(state)
    restored.step()
    assert restored.epoch_losses == {"a": 1.0, "b": 2.0}


def test_label_counts_of_the_epoch() -> None:
    scheduler = TaskDropScheduler(["a", "b"], [Constant()])
    scheduler(torch.tensor([1.0, 2.0]), torch.tensor([3, 0]))
    scheduler(torch.tensor([1.0, 2.0]), torch.tensor([4, 2]))
    scheduler.step()
    assert scheduler.label_counts == {"a": 7.0, "b": 2.0}


def test_epoch_sums_stay_exact_where_float32_would_round() -> None:
    # float32 has 24 bits: 2**24 + 1 and 1e8 + 1 both round away their last unit there.
    scheduler = TaskDropScheduler(["a", "b"], [Constant()])
    scheduler(torch.tensor([1e8, 1.0], dtype=torch.float64), torch.tensor([2**24, 1]))
    scheduler(torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([1, 1]))
    scheduler.step()
    assert scheduler.label_counts == {"a": 2**24 + 1, "b": 2.0}
    assert scheduler.epoch_losses == {"a": 50_000_000.5, "b": 1.0}


def test_float64_losses_keep_their_loss_weights_exact() -> None:
    scheduler = TaskDropScheduler(["a", "b"], [Constant()], loss_scaling=True)
    scheduler(torch.tensor([1.0, 3.0], dtype=torch.float64))
    scheduler.step()
    # w = mean(1, 3) / (1, 3) = (2, 2/3); 2/3 is not a float32 value.
    weighted = scheduler.weighted_losses(torch.tensor([0.3, 0.3], dtype=torch.float64))
    assert weighted.dtype == torch.float64
    assert weighted.tolist() == [2 * 0.3, 2 / 3 * 0.3]


def test_a_state_dict_from_before_the_new_fields_still_loads() -> None:
    # Older states hold 3 rows of running sums and none of the newer record fields.
    def make() -> TaskDropScheduler:
        return TaskDropScheduler(
            ["a", "b", "c"], [TaskIncompleteness(), Constant()], redraw_every=2, generator=3
        )

    original = make()
    for epoch in range(3):
        for step in range(3):
            original(torch.tensor([1.0, 2.0, 3.0]) / (1 + epoch + step))
        original.step()
    original(torch.tensor([0.5, 0.5, 0.5]))
    old = original.state_dict()
    for key in ("epoch_mean", "epochs", "cooldown_epochs", "units_this_epoch"):
        del old[key]
    for key in ("dropped_all_epoch", "dropped_loss_rise"):
        del old[key]
    old["accumulator"] = old["accumulator"][:3]
    resumed = make()
    resumed.load_state_dict(old)
    for _ in range(5):
        losses = torch.rand(3)
        assert resumed(losses).item() == original(losses).item()
    assert resumed.step() == original.step()


def test_log_dict_is_flat_with_stable_keys_and_step_returns_it() -> None:
    scheduler = TaskDropScheduler(
        ["a", "b"], [TaskIncompleteness(), Constant()], loss_scaling=True, generator=0
    )
    scheduler(torch.tensor([1.0, 3.0]), torch.tensor([4, 2]))
    first = scheduler.step()
    assert first == scheduler.log_dict()
    assert first == {
        "epoch": 1.0,
        "keep_probability/a": 1.0,
        "keep_probability/b": 1.0,
        "gate/a": 1.0,
        "gate/b": 1.0,
        "epoch_loss/a": 1.0,
        "epoch_loss/b": 3.0,
        "label_count/a": 4.0,
        "label_count/b": 2.0,
        "loss_weight/a": 2.0,
        "loss_weight/b": 2 / 3,
    }
    second = scheduler.step([0.5, 3.0])  # A = [0.5, 1], mean 0.75: u = [2/3, 1]
    assert second["term/task_incompleteness/a"] == pytest.approx(2 / 3)
    assert second["term/constant/b"] == 1.0
    assert second["keep_probability/a"] == pytest.approx(5 / 6)
    assert second["epoch"] == 2.0
    assert second["gate/a"] in (0.0, 1.0)
    assert all(type(value) is float for value in second.values())


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"min_active_tasks": 1.5}, r"min_active_tasks must be an int, between 0 and .*got 1\.5"),
        ({"min_active_tasks": True}, r"min_active_tasks must be an int, .*got True \(bool\)"),
        ({"redraw_every": 1.5}, r"redraw_every must be an int, 1 or more, or None, got 1\.5"),
        ({"redraw_every": True}, r"redraw_every must be an int, .*got True \(bool\)"),
        ({"loss_scaling": "no"}, r"loss_scaling must be True or False, got 'no' \(str\)"),
        ({"loss_scaling": 1}, r"loss_scaling must be True or False, got 1 \(int\)"),
        ({"epochs": 2.0}, r"epochs must be an int, 1 or more, or None, got 2\.0"),
        ({"cooldown_epochs": None}, r"cooldown_epochs must be an int, 0 or more, got None"),
    ],
)
def test_settings_of_the_wrong_type_are_refused_at_construction(
    setting: dict[str, object], message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        TaskDropScheduler(["a", "b"], [Constant()], **setting)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"epochs": 0}, r"epochs must be 1 or more, got 0"),
        ({"cooldown_epochs": -1}, r"cooldown_epochs must be 0 or more, got -1"),
        ({"epoch_mean": "sample"}, r"epoch_mean must be one of \['step', 'label'\], got 'sample'"),
    ],
)
def test_settings_out_of_range_are_refused_at_construction(
    setting: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        TaskDropScheduler(["a", "b"], [Constant()], **setting)  # type: ignore[arg-type]


def test_a_scheduler_without_a_seed_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    first = TaskDropScheduler(["a", "b"], [Fixed([0.5, 0.5])])
    assert torch.equal(torch.rand(4), expected)  # the model's weights and data order
    second = TaskDropScheduler(["a", "b"], [Fixed([0.5, 0.5])])
    states = [s.state_dict()["generator"] for s in (first, second)]
    assert not torch.equal(*states)  # still a fresh seed each time


def test_attach_drops_a_shared_parameter_only_with_all_its_tasks() -> None:
    shared, own_a, own_b = (torch.nn.Parameter(torch.ones(2)) for _ in range(3))
    for gates, dropped in (([1.0, 0.0], {"b"}), ([0.0, 0.0], {"a", "b", "shared"})):
        scheduler = TaskDropScheduler(["a", "b"], [Fixed(gates)], min_active_tasks=0)
        scheduler.attach({"a": [shared, own_a], "b": [shared, own_b]})
        scheduler.step([1.0, 1.0])
        scheduler.step([1.0, 1.0])
        for parameter in (shared, own_a, own_b):
            parameter.grad = None
        losses = torch.stack([(shared * own_a).sum(), (shared * own_b).sum()])
        scheduler(losses).backward()
        grads = {"shared": shared.grad, "a": own_a.grad, "b": own_b.grad}
        assert {name for name, grad in grads.items() if grad is None} == dropped
        scheduler.detach()


def test_attach_follows_redraws_and_detach_restores_zero_gradients() -> None:
    head = torch.nn.Linear(1, 1)
    scheduler = TaskDropScheduler(["a", "b"], [Fixed([1.0, 0.0])], generator=0)
    scheduler.attach({"b": head})
    scheduler(torch.stack([torch.ones(()), head(torch.ones(1)).sum()])).backward()
    assert head.weight.grad is not None  # the warm-up keeps every task
    scheduler.step([1.0, 1.0])
    scheduler.step([1.0, 1.0])
    scheduler(torch.stack([torch.ones(()), head(torch.ones(1)).sum()])).backward()
    assert head.weight.grad is None
    scheduler.detach()
    scheduler(torch.stack([torch.ones(()), head(torch.ones(1)).sum()])).backward()
    assert head.weight.grad is not None
    assert head.weight.grad.abs().sum().item() == 0.0


def test_bad_attach() -> None:
    scheduler = TaskDropScheduler(["a", "b"], [Constant()])
    with pytest.raises(TypeError, match=r"MultiHeadNet or a mapping .*, got Linear"):
        scheduler.attach(torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match=r"\['c'\] are not tasks of this scheduler"):
        scheduler.attach({"c": torch.nn.Linear(1, 1)})
    with pytest.raises(TypeError, match=r"parameters of task 'a' must be .*, got str"):
        scheduler.attach({"a": "weights"})
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer, got Linear"):
        scheduler.attach(optimizer=torch.nn.Linear(1, 1))  # type: ignore[arg-type]


@pytest.mark.parametrize("redraw_every", [1, 2])
def test_with_an_attached_optimizer_redraws_wait_for_optimizer_steps(redraw_every: int) -> None:
    weights = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weights], lr=0.1)
    scheduler = TaskDropScheduler(
        ["a", "b", "c", "d"],
        [Fixed([0.5] * 4)],
        redraw_every=redraw_every,
        min_active_tasks=0,
        generator=5,
    )
    scheduler.attach(optimizer=optimizer)
    scheduler.step([1.0] * 4)
    scheduler.step([1.0] * 4)
    per_optimizer_step = []
    for _ in range(12):
        seen = set()
        for _ in range(4):  # gradient accumulation: 4 micro-batches per optimizer step
            scheduler(weights * 1.0).backward()
            seen.add(tuple(scheduler.gates.values()))
        optimizer.step()
        optimizer.zero_grad()
        assert len(seen) == 1  # one set of gates for every micro-batch of the step
        per_optimizer_step.append(seen.pop())
    pairs = per_optimizer_step[::redraw_every]
    assert len(set(pairs)) > 2  # redrawn between optimizer steps
    for start in range(0, 12, redraw_every):
        assert len(set(per_optimizer_step[start : start + redraw_every])) == 1


def test_epoch_means_by_labelled_samples() -> None:
    by_step = TaskDropScheduler(["a", "b"], [Constant()])
    by_label = TaskDropScheduler(["a", "b"], [Constant()], epoch_mean="label")
    for scheduler in (by_step, by_label):
        scheduler(torch.tensor([1.0, 4.0]), torch.tensor([2, 1]))
        scheduler(torch.tensor([3.0, math.nan]), torch.tensor([6, 1]))  # b's loss not finite
        scheduler(torch.tensor([2.0, 2.0]), torch.tensor([0, 0]))  # nothing labelled
        scheduler.step()
    assert by_step.epoch_losses == {"a": 2.0, "b": 4.0}
    assert by_label.epoch_losses == {"a": (1 * 2 + 3 * 6) / 8, "b": 4.0}
    assert by_label.label_counts == {"a": 8.0, "b": 2.0}


def test_epoch_means_by_label_need_the_label_counts() -> None:
    scheduler = TaskDropScheduler(["a", "b"], [Constant()], epoch_mean="label")
    with pytest.raises(ValueError, match=r"pass them with the losses, scheduler\(losses, loss_fn"):
        scheduler(torch.ones(2))


def test_record_false_gates_without_recording_or_counting() -> None:
    scheduler = TaskDropScheduler(
        ["a", "b"], [Fixed([1.0, 0.0])], redraw_every=1, min_active_tasks=0, generator=0
    )
    scheduler.step([1.0, 1.0])
    scheduler.step([1.0, 1.0])
    assert scheduler.gates == {"a": True, "b": False}
    state = scheduler.state_dict()
    for method in (scheduler, scheduler.weighted_losses, scheduler.kept_losses):
        validation = method(torch.tensor([5.0, 7.0]), torch.tensor([1, 1]), record=False)
        assert validation.sum().item() == 5.0  # gated: b is dropped
    after = scheduler.state_dict()
    assert torch.equal(after["accumulator"], state["accumulator"])
    assert after["calls_since_draw"] == state["calls_since_draw"]  # no redraw counted
    assert torch.equal(after["generator"], state["generator"])
    scheduler(torch.tensor([1.0, 2.0]))
    with pytest.warns(UserWarning, match=r"tasks \['b'\] were dropped for the whole epoch"):
        scheduler.step()  # b's mean rose from 1 to 2 while it was dropped
    assert scheduler.epoch_losses == {"a": 1.0, "b": 2.0}


@pytest.mark.parametrize(("cooldown_epochs", "kept_from"), [(0, None), (1, 4), (2, 3)])
def test_the_last_epochs_keep_every_task(cooldown_epochs: int, kept_from: int | None) -> None:
    scheduler = TaskDropScheduler(
        ["a", "b"],
        [Fixed([0.0, 0.0])],
        min_active_tasks=0,
        epochs=5,
        cooldown_epochs=cooldown_epochs,
        redraw_every=1,
    )
    assert scheduler.epochs == 5
    gates_of_epoch = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the losses given here do not change
        for epoch in range(5):
            scheduler(torch.ones(2))  # a redraw, once the draws have begun
            gates_of_epoch[epoch] = (scheduler.active_tasks, scheduler.cooling_down)
            scheduler.step([1.0, 1.0])
    for epoch in range(2, 5):
        in_cooldown = kept_from is not None and epoch >= kept_from
        expected = ("a", "b") if in_cooldown else ()
        assert gates_of_epoch[epoch] == (expected, in_cooldown), epoch


def test_a_dropped_task_whose_loss_rose_is_reported() -> None:
    scheduler = TaskDropScheduler(["a", "b"], [Fixed([1.0, 0.0])], generator=0)
    scheduler.step([1.0, 1.0])
    scheduler.step([0.5, 0.5])
    assert scheduler.gates == {"a": True, "b": False}
    with pytest.warns(UserWarning, match=r"\['b'\] were dropped .* rose by \{'b': 0\.25\}"):
        logged = scheduler.step([0.25, 0.75])
    assert scheduler.dropped_loss_rise["b"] == 0.25
    assert math.isnan(scheduler.dropped_loss_rise["a"])  # kept: not reported
    assert "epoch_loss/b" in logged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler.step([0.25, 0.5])  # b fell while dropped: no warning
    assert scheduler.dropped_loss_rise["b"] == -0.25
