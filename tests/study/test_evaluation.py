"""dstmtl.study.evaluation: per-kind metrics over labelled elements, checked by hand."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import Tensor, nn

from dstmtl import MaskedMultiTaskLoss, MultiHeadNet
from dstmtl.study import StudyTask
from dstmtl.study.config import METRICS, higher_is_better
from dstmtl.study.evaluation import evaluate

nan = math.nan


class _Slice(nn.Module):
    """A head that returns columns ``start:stop`` of its input, shaped ``[B, *shape]``."""

    def __init__(self, start: int, stop: int, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.start, self.stop, self.shape = start, stop, shape

    def forward(self, x: Tensor) -> Tensor:
        return x[:, self.start : self.stop].reshape(x.shape[0], *self.shape)


def fixed(outputs: dict[str, Tensor]) -> tuple[MultiHeadNet, Tensor]:
    """A net whose outputs on the returned input are exactly ``outputs``."""
    heads: dict[str, nn.Module] = {}
    start = 0
    for name, output in outputs.items():
        size = output[0].numel()
        heads[name] = _Slice(start, start + size, tuple(output.shape[1:]))
        start += size
    inputs = torch.cat([output.reshape(output.shape[0], -1) for output in outputs.values()], 1)
    return MultiHeadNet(nn.Identity(), heads), inputs


def run(
    outputs: dict[str, Tensor],
    targets: Tensor | dict[str, Tensor],
    tasks: dict[str, StudyTask],
) -> dict[str, dict[str, float]]:
    net, inputs = fixed(outputs)
    loss_fn = MaskedMultiTaskLoss({name: task.kind for name, task in tasks.items()})
    metrics, _ = evaluate(net, [(inputs, targets)], tasks, loss_fn)
    return metrics


def one_hot_logits(classes: Tensor, num_classes: int) -> Tensor:
    """Logits ``[B, C, *]`` whose arg-max is ``classes`` ``[B, *]``."""
    return 5.0 * torch.movedim(nn.functional.one_hot(classes, num_classes), -1, 1).float()


def test_metric_table() -> None:
    assert METRICS["multiclass"] == ("accuracy", "miou")  # accuracy stays the default
    assert StudyTask("multiclass", outputs=4).metric == "accuracy"
    assert StudyTask("multiclass", outputs=4, metric="miou").metric == "miou"
    assert higher_is_better("miou")
    assert not higher_is_better("mae")


def test_binary_with_missing_labels() -> None:
    logits = torch.tensor([2.0, -1.0, 3.0, -2.0, 1.0, -3.0, 0.5, 4.0])
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, nan, 1.0, nan])
    metrics = run({"flag": logits[:, None]}, labels[:, None], {"flag": StudyTask("binary")})
    # Labelled: TP 3 (0, 4, 6), FN 1 (1), FP 1 (2), TN 1 (3); samples 5 and 7 do not count.
    assert metrics["flag"] == pytest.approx(
        {"accuracy": 4 / 6, "balanced_accuracy": (3 / 4 + 1 / 2) / 2, "f1": 6 / 8}
    )


def test_binary_one_class_and_soft_labels() -> None:
    tasks = {"flag": StudyTask("binary")}
    # Only negatives: balanced accuracy is the one recall there is, F1 has no TP.
    only_negatives = run(
        {"flag": torch.tensor([[1.0], [-1.0], [-2.0], [-3.0]])}, torch.zeros(4, 1), tasks
    )
    assert only_negatives["flag"] == {"accuracy": 0.75, "balanced_accuracy": 0.75, "f1": 0.0}
    # A label above 0.5 is positive: 0.9 and 0.6 are, 0.4 and 0.5 are not.
    soft = run(
        {"flag": torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])},
        torch.tensor([[0.9], [0.6], [0.4], [0.5]]),
        tasks,
    )
    assert soft["flag"] == {"accuracy": 1.0, "balanced_accuracy": 1.0, "f1": 1.0}


def test_multiclass_per_sample_with_missing_classes() -> None:
    predicted = torch.tensor([0, 1, 2, 1, 0])
    labels = torch.tensor([0.0, 2.0, nan, 1.0, -1.0])  # NaN and -1 are missing
    metrics = run(
        {"kind": one_hot_logits(predicted, 3)},
        labels[:, None],
        {"kind": StudyTask("multiclass", outputs=3)},
    )
    # Labelled (label, prediction): (0, 0), (2, 1), (1, 1). Confusion: N00 = N21 = N11 = 1.
    # IoU: class 0 1/1, class 1 1/(1 + 2 - 1), class 2 0/1 (labelled, never predicted).
    # Sample 2's prediction of class 2 is unlabelled, so it adds nothing to class 2's union.
    assert metrics["kind"] == pytest.approx({"accuracy": 2 / 3, "miou": (1 + 1 / 2 + 0) / 3})


def segmentation() -> tuple[Tensor, Tensor]:
    """Predicted and labelled ``[2, 2, 2]`` maps of 4 classes, -1 in holes; class 3 never
    occurs in either."""
    predicted = torch.tensor([[[0, 1], [1, 2]], [[2, 2], [0, 0]]])
    labels = torch.tensor([[[0, 1], [2, -1]], [[2, -1], [0, 1]]])
    return predicted, labels


# Labelled (label, prediction): (0, 0), (1, 1), (2, 1), (2, 2), (0, 0), (1, 0): 4 of 6 right.
# Confusion (rows labels, columns predictions): N00 = 2, N10 = 1, N11 = 1, N21 = 1, N22 = 1;
# rows 2, 2, 2, 0 and columns 3, 2, 1, 0. IoU: 2/(2 + 3 - 2), 1/(2 + 2 - 1), 1/(2 + 1 - 1);
# class 3 has an empty union and is left out (with it as 0 the mean would be 1.5/4).
SEGMENTATION = {"accuracy": 4 / 6, "miou": (2 / 3 + 1 / 3 + 1 / 2) / 3}


@pytest.mark.parametrize("holes", ["int -1", "float NaN", "float -1", "channel"])
def test_dense_segmentation_with_holes(holes: str) -> None:
    predicted, labels = segmentation()
    if holes == "float NaN":
        target = torch.where(labels < 0, nan, labels.float())
    elif holes == "float -1":
        target = labels.float()
    elif holes == "channel":
        target = labels[:, None]  # [B, 1, H, W]
    else:
        target = labels
    metrics = run(
        {"seg": one_hot_logits(predicted, 4)},
        {"seg": target},
        {"seg": StudyTask("multiclass", outputs=4)},
    )
    assert metrics["seg"] == pytest.approx(SEGMENTATION)


def depth() -> tuple[Tensor, Tensor]:
    """A predicted ``[2, 2, 2]`` depth map and its labels, NaN in holes."""
    predicted = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[[1.5, nan], [1.0, 4.0]], [[nan, nan], [nan, 3.0]]])
    return predicted, labels


# Errors on the labelled pixels: -0.5, 2, 0, -3. |e| sums to 5.5, e^2 to 13.25, over 4.
DEPTH = {"mae": 5.5 / 4, "rmse": math.sqrt(13.25 / 4)}


@pytest.mark.parametrize("layout", ["[B,1,H,W] vs [B,H,W]", "[B,H,W] vs [B,1,H,W]", "same"])
def test_dense_depth_with_holes(layout: str) -> None:
    predicted, labels = depth()
    if layout == "[B,1,H,W] vs [B,H,W]":
        predicted = predicted[:, None]
    elif layout == "[B,H,W] vs [B,1,H,W]":
        labels = labels[:, None]
    metrics = run({"depth": predicted}, {"depth": labels}, {"depth": StudyTask("regression")})
    assert metrics["depth"] == pytest.approx(DEPTH)


def test_multi_output_tasks_pool_their_elements() -> None:
    # A 3-label binary task: 6 elements, 5 labelled; TP 2, FP 1, TN 1, FN 1.
    logits = torch.tensor([[1.0, -1.0, 2.0], [1.0, -1.0, -3.0]])
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, nan, 1.0]])
    metrics = run({"labels": logits}, {"labels": labels}, {"labels": StudyTask("binary")})
    assert metrics["labels"] == pytest.approx(
        {"accuracy": 3 / 5, "balanced_accuracy": (2 / 3 + 1 / 2) / 2, "f1": 4 / 6}
    )


def test_a_task_without_labels_gets_nan() -> None:
    tasks = {
        "flag": StudyTask("binary"),
        "seg": StudyTask("multiclass", outputs=3),
        "depth": StudyTask("regression"),
        "seen": StudyTask("regression"),
    }
    outputs = {
        "flag": torch.ones(2, 1),
        "seg": torch.ones(2, 3, 2, 2),
        "depth": torch.ones(2, 2, 2),
        "seen": torch.ones(2, 1),
    }
    targets = {
        "flag": torch.full((2,), nan),
        "seg": torch.full((2, 2, 2), -1),
        "depth": torch.full((2, 2, 2), nan),
        "seen": torch.tensor([3.0, nan]),
    }
    net, inputs = fixed(outputs)
    loss_fn = MaskedMultiTaskLoss(
        {"flag": "binary", "seg": "multiclass", "depth": "regression", "seen": "regression"}
    )
    metrics, losses = evaluate(net, [(inputs, targets)], tasks, loss_fn)
    for name in ("flag", "seg", "depth"):
        assert set(metrics[name]) == set(METRICS[tasks[name].kind])
        assert all(math.isnan(value) for value in metrics[name].values()), name
        assert math.isnan(losses[name])
    assert metrics["seen"] == {"mae": 2.0, "rmse": 2.0}
    assert losses["seen"] == 4.0


def test_no_batch_gives_nan() -> None:
    net, _ = fixed({"flag": torch.zeros(1, 1)})
    metrics, losses = evaluate(
        net, [], {"flag": StudyTask("binary")}, MaskedMultiTaskLoss({"flag": "binary"})
    )
    assert all(math.isnan(value) for value in metrics["flag"].values())
    assert math.isnan(losses["flag"])


TASKS = {
    "flag": StudyTask("binary"),
    "kind": StudyTask("multiclass", outputs=3),
    "size": StudyTask("regression"),
}


def per_sample_batch(seed: int, n: int) -> tuple[dict[str, Tensor], Tensor]:
    """Outputs and a ``[n, 3]`` target tensor with missing labels."""
    generator = torch.Generator().manual_seed(seed)
    outputs = {
        "flag": torch.randn(n, 1, generator=generator),
        "kind": torch.randn(n, 3, generator=generator),
        "size": torch.randn(n, 1, generator=generator),
    }
    targets = torch.stack(
        [
            torch.randint(0, 2, (n,), generator=generator).float(),
            torch.randint(0, 3, (n,), generator=generator).float(),
            torch.randn(n, generator=generator),
        ],
        dim=1,
    )
    targets[torch.rand(targets.shape, generator=generator) < 0.3] = nan
    return outputs, targets


def test_dict_targets_equal_the_tensor() -> None:
    outputs, targets = per_sample_batch(0, 20)
    net, inputs = fixed(outputs)
    loss_fn = MaskedMultiTaskLoss({name: task.kind for name, task in TASKS.items()})
    as_tensor = evaluate(net, [(inputs, targets)], TASKS, loss_fn)
    classes = torch.nan_to_num(targets[:, 1], nan=-1).long()  # int64, -1 missing
    as_dict = {"flag": targets[:, 0], "kind": classes, "size": targets[:, 2, None]}
    assert evaluate(net, [(inputs, as_dict)], TASKS, loss_fn) == as_tensor
    assert not math.isnan(as_tensor[0]["kind"]["miou"])


def test_two_batches_equal_one() -> None:
    predicted, labels = segmentation()
    depths, depth_labels = depth()
    outputs = {
        "seg": one_hot_logits(predicted, 4),
        "depth": depths[:, None],
        "flag": torch.tensor([[1.0], [-1.0]]),
    }
    targets = {"seg": labels, "depth": depth_labels, "flag": torch.tensor([1.0, 1.0])}
    tasks = {
        "seg": StudyTask("multiclass", outputs=4),
        "depth": StudyTask("regression"),
        "flag": StudyTask("binary"),
    }
    net, inputs = fixed(outputs)
    loss_fn = MaskedMultiTaskLoss({name: task.kind for name, task in tasks.items()})
    halves = [
        (inputs[i : i + 1], {name: target[i : i + 1] for name, target in targets.items()})
        for i in range(2)
    ]
    split, _ = evaluate(net, halves, tasks, loss_fn)
    whole, _ = evaluate(net, [(inputs, targets)], tasks, loss_fn)
    assert split == whole
    assert whole["seg"] == pytest.approx(SEGMENTATION)
    assert whole["depth"] == pytest.approx(DEPTH)


def test_per_sample_batches_equal_one_with_losses() -> None:
    first, first_targets = per_sample_batch(1, 7)
    second, second_targets = per_sample_batch(2, 9)
    both = {name: torch.cat([first[name], second[name]]) for name in first}
    net, inputs = fixed(both)
    loss_fn = MaskedMultiTaskLoss({name: task.kind for name, task in TASKS.items()})
    targets = torch.cat([first_targets, second_targets])
    split = evaluate(
        net, [(inputs[:7], first_targets), (inputs[7:], second_targets)], TASKS, loss_fn
    )
    whole = evaluate(net, [(inputs, targets)], TASKS, loss_fn)
    for name in TASKS:
        assert split[0][name] == pytest.approx(whole[0][name])
    assert split[1] == pytest.approx(whole[1])  # per-sample losses: a mean over samples


def test_the_model_gets_its_mode_back() -> None:
    net, inputs = fixed({"flag": torch.zeros(2, 1)})
    loss_fn = MaskedMultiTaskLoss({"flag": "binary"})
    batch = [(inputs, torch.tensor([[1.0], [0.0]]))]
    for training in (True, False):
        net.train(training)
        evaluate(net, batch, {"flag": StudyTask("binary")}, loss_fn)
        assert net.training is training


def test_tasks_that_differ_from_the_loss_are_refused() -> None:
    net, inputs = fixed({"a": torch.zeros(2, 1), "b": torch.zeros(2, 1)})
    tasks = {"a": StudyTask("binary"), "b": StudyTask("binary")}
    swapped = MaskedMultiTaskLoss({"b": "binary", "a": "binary"})
    with pytest.raises(ValueError, match=r"differ from the loss's tasks \['b', 'a'\]"):
        evaluate(net, [(inputs, torch.zeros(2, 2))], tasks, swapped)


def test_an_output_without_the_target_elements_is_refused() -> None:
    # A callable loss does not check element shapes; evaluate does.
    net, inputs = fixed({"depth": torch.zeros(2, 4)})
    loss_fn = MaskedMultiTaskLoss({"depth": lambda output, target: output.sum(dim=1)})
    with pytest.raises(ValueError, match=r"task 'depth' gives elements of shape \(2, 4\)"):
        evaluate(
            net,
            [(inputs, {"depth": torch.zeros(2, 2, 2)})],
            {"depth": StudyTask("regression")},
            loss_fn,
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to see synchronisations")
def test_no_synchronisation_per_batch_on_cuda() -> None:
    predicted, labels = segmentation()
    depths, depth_labels = depth()
    outputs = {"seg": one_hot_logits(predicted, 4), "depth": depths[:, None]}
    tasks = {"seg": StudyTask("multiclass", outputs=4), "depth": StudyTask("regression")}
    net, inputs = fixed(outputs)
    device = torch.device("cuda")
    batch = (inputs.to(device), {"seg": labels.to(device), "depth": depth_labels.to(device)})
    loss_fn = MaskedMultiTaskLoss({name: task.kind for name, task in tasks.items()})

    def synchronisations(batches: int) -> int:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                evaluate(net, [batch] * batches, tasks, loss_fn)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert synchronisations(4) == synchronisations(1)
