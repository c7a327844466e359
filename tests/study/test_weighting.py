"""The loss weightings of dstmtl.study.weighting: the published formulas when every task is
labelled, and a task without labels in a batch treated as absent, never as a zero loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from dstmtl.study.weighting import FAMO, DynamicWeightAverage, RandomWeighting, UncertaintyWeighting

ALL = torch.tensor([4.0, 4.0, 4.0])
NO_B = torch.tensor([4.0, 0.0, 4.0])  # task b has no labelled sample in the batch
NONE = torch.zeros(3)


def losses(*values: float) -> Tensor:
    return torch.tensor(values, requires_grad=True)


def test_uw_matches_the_formula_and_torchjd_when_every_task_is_labelled() -> None:
    uw = UncertaintyWeighting(3)
    with torch.no_grad():
        uw.log_var.copy_(torch.tensor([0.0, 1.0, -1.0]))
    value = uw(torch.tensor([1.0, 2.0, 3.0]), ALL)
    by_hand = sum(0.5 * math.exp(-s) * x + 0.5 * s for s, x in ((0, 1), (1, 2), (-1, 3)))
    assert value.item() == pytest.approx(by_hand)
    torchjd = pytest.importorskip("torchjd.scalarization")
    reference = torchjd.UW(3)
    reference.load_state_dict(uw.state_dict())
    assert reference(torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(value.item())


def test_uw_leaves_an_absent_tasks_log_variance_alone() -> None:
    uw = UncertaintyWeighting(3)
    batch = losses(0.5, 0.0, 2.0)
    uw(batch, NO_B).backward()
    assert uw.log_var.grad is not None
    # d/ds (e^-s L / 2 + s / 2) = (1 - L) / 2 at s = 0; the absent task's regulariser alone
    # would give it 1/2 and pull its log-variance down on every batch it misses.
    assert uw.log_var.grad.tolist() == pytest.approx([0.25, 0.0, -0.5])
    assert batch.grad is not None
    assert batch.grad.tolist() == pytest.approx([0.5, 0.0, 0.5])


def test_dwa_averages_only_the_batches_where_a_task_is_labelled() -> None:
    dwa = DynamicWeightAverage(2, temperature=1.0)
    # Epoch 0: b labelled in one batch of two; epoch 1: in both.
    for epoch_batches in (
        [([2.0, 4.0], [1.0, 1.0]), ([4.0, 0.0], [1.0, 0.0])],
        [([1.0, 4.0], [1.0, 1.0]), ([2.0, 2.0], [1.0, 1.0])],
    ):
        for values, counts in epoch_batches:
            dwa(torch.tensor(values), torch.tensor(counts))
        dwa.step()
    # a: means 3 then 1.5, rate 0.5; b: means 4 (not 2) then 3, rate 0.75.
    assert dwa.means.tolist() == [[3.0, 4.0], [1.5, 3.0]]
    assert dwa.rates.tolist() == pytest.approx([0.5, 0.75])
    weights = 2 * torch.softmax(torch.tensor([0.5, 0.75]), 0)
    value = dwa(losses(1.0, 1.0), torch.tensor([1.0, 1.0]))
    assert value.item() == pytest.approx(weights.sum().item())
    # With b absent, a alone takes the batch with weight |P| = 1.
    batch = losses(1.0, 0.0)
    dwa(batch, torch.tensor([1.0, 0.0])).backward()
    assert batch.grad is not None
    assert batch.grad.tolist() == pytest.approx([1.0, 0.0])


def test_dwa_uses_rate_one_for_a_task_without_labels_for_a_whole_epoch() -> None:
    dwa = DynamicWeightAverage(2)
    for values, counts in (([2.0, 0.0], [1.0, 0.0]), ([1.0, 5.0], [1.0, 1.0])):
        dwa(torch.tensor(values), torch.tensor(counts))
        dwa.step()
    assert torch.isnan(dwa.means[0, 1])
    assert dwa.rates.tolist() == pytest.approx([0.5, 1.0])
    assert not dwa(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])).isnan()


def test_dwa_matches_torchjd_when_every_task_is_labelled() -> None:
    torchjd = pytest.importorskip("torchjd.scalarization")
    ours, reference = DynamicWeightAverage(3), torchjd.DWA()
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        for _ in range(3):
            batch = torch.rand(3, generator=generator) + 0.1
            assert ours(batch, ALL).item() == pytest.approx(reference(batch).item())
        ours.step()
        reference.step()


def test_dwa_state_dict_carries_the_epoch_means() -> None:
    dwa = DynamicWeightAverage(2)
    for values in ([2.0, 1.0], [1.0, 1.0]):
        dwa(torch.tensor(values), torch.tensor([1.0, 1.0]))
        dwa.step()
    restored = DynamicWeightAverage(2)
    restored.load_state_dict(dwa.state_dict())
    assert restored.rates.tolist() == dwa.rates.tolist()


def test_rlw_weights_of_the_present_tasks_sum_to_one() -> None:
    torch.manual_seed(3)
    batch = losses(1.0, 0.0, 1.0)
    value = RandomWeighting(3)(batch, NO_B)
    assert batch.grad is None
    value.backward()
    assert batch.grad is not None
    assert batch.grad[1] == 0
    assert batch.grad.sum().item() == pytest.approx(1.0)
    assert value.item() == pytest.approx(1.0)  # both present losses are 1


def test_rlw_draws_as_torchjd_and_as_many_numbers_whatever_is_missing() -> None:
    torchjd = pytest.importorskip("torchjd.scalarization")
    batch = torch.tensor([0.3, 0.6, 0.9])
    torch.manual_seed(5)
    ours = RandomWeighting(3)(batch, ALL)
    torch.manual_seed(5)
    assert ours.item() == pytest.approx(torchjd.Random()(batch).item())
    torch.manual_seed(5)
    RandomWeighting(3)(batch, NO_B)
    after_missing = torch.rand(1)
    torch.manual_seed(5)
    RandomWeighting(3)(batch, ALL)
    assert torch.rand(1) == after_missing


def test_famo_gives_the_present_tasks_the_whole_update() -> None:
    famo = FAMO(3)
    batch = losses(0.5, 0.0, 2.0)
    famo(batch, NO_B).backward()
    # z = (1/2, 0, 1/2), c = 1 / (0.5/0.5 + 0.5/2) = 0.8, gradient c z_k / L_k. The published
    # formula takes log(0 + 1e-8) for b and shrinks every gradient to about 1e-8.
    assert batch.grad is not None
    assert batch.grad.tolist() == pytest.approx([0.8, 0.0, 0.2])


def test_famo_keeps_an_absent_tasks_logit_through_adam_momentum_and_decay() -> None:
    famo = FAMO(3, weight_decay=0.1)
    for before, after in (([1.0, 1.0, 1.0], [0.5, 0.9, 0.8]), ([0.5, 0.9, 0.8], [0.4, 0.7, 0.7])):
        famo(torch.tensor(before), ALL)
        famo.update(torch.tensor(after))
    moved = famo.logits.detach().clone()
    assert moved[1] != 0  # Adam has momentum for b now
    famo(torch.tensor([0.4, 0.0, 0.7]), NO_B)
    famo.update(torch.tensor([0.3, 0.0, 0.6]))
    assert famo.logits[1].item() == moved[1].item()
    assert famo.logits[0].item() != moved[0].item()
    assert famo.logits.isfinite().all()


def test_famo_with_no_labelled_task_changes_nothing() -> None:
    famo = FAMO(2)
    batch = losses(0.0, 0.0)
    value = famo(batch, torch.zeros(2))
    value.backward()
    assert value.item() == 0
    assert batch.grad is not None
    assert batch.grad.tolist() == [0.0, 0.0]
    famo.update(torch.zeros(2))
    assert famo.logits.tolist() == [0.0, 0.0]


def test_famo_matches_torchjd_when_every_task_is_labelled() -> None:
    torchjd = pytest.importorskip("torchjd.scalarization")
    ours, reference = FAMO(3), torchjd.FAMO(3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        before, after = torch.rand(3, generator=generator) + 0.5, torch.rand(3, generator=generator)
        assert ours(before, ALL).item() == pytest.approx(reference(before).item())
        ours.update(after)
        reference.update(after)
        assert ours.logits.tolist() == pytest.approx(reference._w.tolist())


def test_famo_state_dict_carries_its_adam() -> None:
    famo = FAMO(2)
    famo(torch.tensor([1.0, 1.0]), torch.ones(2))
    famo.update(torch.tensor([0.5, 0.9]))
    restored, uninterrupted = FAMO(2), famo
    restored.load_state_dict(famo.state_dict())
    for scalarizer in (restored, uninterrupted):
        scalarizer(torch.tensor([0.5, 0.9]), torch.ones(2))
        scalarizer.update(torch.tensor([0.4, 0.5]))
    assert restored.logits.tolist() == uninterrupted.logits.tolist()


def test_famo_update_needs_a_forward_first() -> None:
    with pytest.raises(RuntimeError, match="must follow a call of FAMO"):
        FAMO(2).update(torch.ones(2))


@pytest.mark.parametrize(
    "make", [UncertaintyWeighting, DynamicWeightAverage, RandomWeighting, FAMO]
)
def test_the_loss_vector_must_match_the_tasks(make: type[torch.nn.Module]) -> None:
    with pytest.raises(ValueError, match=r"shape \(3,\), got \(2,\) and \(3,\)"):
        make(3)(torch.ones(2), torch.ones(3))


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_the_number_of_tasks_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(ValueError, match="num_tasks must be a positive int"):
        UncertaintyWeighting(bad)  # type: ignore[arg-type]


def test_bad_hyperparameters_are_named() -> None:
    with pytest.raises(ValueError, match="temperature must be positive, got 0"):
        DynamicWeightAverage(2, temperature=0)
    with pytest.raises(ValueError, match="lr must be >= 0, got -1"):
        FAMO(2, lr=-1)
