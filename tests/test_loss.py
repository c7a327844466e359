"""MaskedMultiTaskLoss: masking, gradients, vectorisation and input checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dstmtl import MaskedMultiTaskLoss

NAN = math.nan


def test_binary_mean_over_labelled_samples_by_hand() -> None:
    loss = MaskedMultiTaskLoss({"a": "binary", "b": "binary"})
    logits = {"a": torch.tensor([0.0, 2.0, -1.0]), "b": torch.tensor([[1.0], [0.5], [3.0]])}
    targets = torch.tensor([[1.0, NAN], [NAN, 0.0], [0.0, 1.0]])
    expected_a = (math.log(2) + math.log1p(math.exp(-1.0))) / 2  # samples 0 and 2
    expected_b = (math.log1p(math.exp(0.5)) + math.log1p(math.exp(-3.0))) / 2
    assert loss(logits, targets).tolist() == pytest.approx([expected_a, expected_b])
    assert loss.label_counts.tolist() == [2.0, 2.0]


def test_mixed_kinds_and_a_callable() -> None:
    def absolute(output: Tensor, target: Tensor) -> Tensor:
        return (output - target).abs().sum(dim=1)

    loss = MaskedMultiTaskLoss(
        {"bin": "binary", "cls": "multiclass", "reg": "regression", "abs": absolute}
    )
    outputs = {
        "bin": torch.tensor([0.0, 0.0]),
        "cls": torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]),
        "reg": torch.tensor([[1.0], [3.0]]),
        "abs": torch.tensor([[1.0, 2.0], [0.0, 0.0]]),
    }
    targets = {
        "bin": torch.tensor([1.0, 0.0]),
        "cls": torch.tensor([-1, 0]),
        "reg": torch.tensor([NAN, 1.0]),
        "abs": torch.tensor([[0.0, 0.0], [NAN, NAN]]),
    }
    result = loss(outputs, targets)
    expected_cls = -math.log(math.exp(2.0) / (math.exp(2.0) + 2))
    assert result.tolist() == pytest.approx([math.log(2), expected_cls, 4.0, 3.0])
    assert loss.label_counts.tolist() == [2.0, 1.0, 1.0, 1.0]


def test_multiclass_targets_inside_a_float_tensor() -> None:
    loss = MaskedMultiTaskLoss({"bin": "binary", "cls": "multiclass"})
    outputs = {"bin": torch.zeros(3), "cls": torch.zeros(3, 4)}
    targets = torch.tensor([[1.0, 3.0], [0.0, NAN], [NAN, -1.0]])
    assert loss(outputs, targets).tolist() == pytest.approx([math.log(2), math.log(4)])
    assert loss.label_counts.tolist() == [2.0, 1.0]


def test_count_labels_knows_the_kinds_where_the_raw_tensor_cannot() -> None:
    def absolute(output: Tensor, target: Tensor) -> Tensor:
        return (output - target).abs().sum(dim=1)

    loss = MaskedMultiTaskLoss({"bin": "binary", "cls": "multiclass", "reg": "regression"})
    # -1 is a missing class in "cls" but a value in "reg"; NaN is missing everywhere.
    labels = torch.tensor([[1.0, 3.0, -1.0], [0.0, -1.0, -1.0], [NAN, NAN, 2.0], [0.0, 0.0, NAN]])
    assert loss.count_labels(labels) == {"bin": 3, "cls": 2, "reg": 3}
    outputs = {"bin": torch.zeros(4), "cls": torch.zeros(4, 4), "reg": torch.zeros(4)}
    loss(outputs, labels)
    assert loss.label_counts.tolist() == [3.0, 2.0, 3.0]

    by_name = MaskedMultiTaskLoss({"cls": "multiclass", "abs": absolute})
    targets = {"cls": torch.tensor([-1, 2, 0]), "abs": torch.tensor([[0.0, NAN], [1.0, 2.0]] * 2)}
    with pytest.raises(ValueError, match=r"'abs' must have the batch size 3 first, got shape"):
        by_name.count_labels(targets)
    targets["abs"] = targets["abs"][:3]
    assert by_name.count_labels(targets) == {"cls": 2, "abs": 1}
    with pytest.raises(ValueError, match=r"shape \[B, 3\] .* got \(4, 2\)"):
        loss.count_labels(labels[:, :2])


def test_count_labels_refuses_values_the_loss_cannot_use() -> None:
    loss = MaskedMultiTaskLoss({"bin": "binary", "cls": "multiclass", "reg": "regression"})
    good = torch.tensor([[1.0, 2.0, -3.5], [0.0, -1.0, 7.0], [NAN, NAN, NAN], [0.25, 0.0, 0.0]])
    assert loss.count_labels(good) == {"bin": 3, "cls": 2, "reg": 3}
    bad_values = [
        (0, -1.0, r"binary target of task 'bin' holds \[-1.0\] outside \[0, 1\]; .*\+ 1\) / 2"),
        (0, 2.0, r"'bin' holds \[2.0\] outside"),
        (1, 1.5, r"multiclass target of task 'cls' holds \[1.5\], which are not class indices"),
        (1, -2.0, r"'cls' holds \[-2.0\]"),
        (1, math.inf, r"'cls' holds \[inf\]"),
        (2, -math.inf, r"task 'reg' holds an infinite value"),
    ]
    for column, value, message in bad_values:
        labels = good.clone()
        labels[1, column] = value
        with pytest.raises(ValueError, match=message):
            loss.count_labels(labels)
    integer = MaskedMultiTaskLoss({"cls": "multiclass"})
    assert integer.count_labels({"cls": torch.tensor([-1, 0, 3])}) == {"cls": 2}
    with pytest.raises(ValueError, match=r"'cls' holds \[-100\]"):
        integer.count_labels({"cls": torch.tensor([-100, 0, 3])})


def test_a_task_without_labels_is_zero_with_a_gradient_path() -> None:
    loss = MaskedMultiTaskLoss({"a": "binary", "b": "regression", "c": "multiclass"})
    outputs = {
        "a": torch.randn(4, requires_grad=True),
        "b": torch.randn(4, requires_grad=True),
        "c": torch.randn(4, 3, requires_grad=True),
    }
    targets = {"a": torch.full((4,), NAN), "b": torch.full((4,), NAN), "c": torch.full((4,), -1)}
    result = loss(outputs, targets)
    assert result.tolist() == [0.0, 0.0, 0.0]
    result.sum().backward()
    for name, output in outputs.items():
        assert output.grad is not None, name
        assert torch.equal(output.grad, torch.zeros_like(output)), name


def test_missing_labels_never_leak_nan_into_gradients() -> None:
    loss = MaskedMultiTaskLoss({"a": "binary", "b": "regression"})
    outputs = {"a": torch.randn(5, requires_grad=True), "b": torch.randn(5, requires_grad=True)}
    targets = torch.tensor([[1.0, NAN], [NAN, 2.0], [0.0, NAN], [NAN, NAN], [1.0, 0.5]])
    loss(outputs, targets).sum().backward()
    for output in outputs.values():
        assert output.grad is not None
        assert torch.isfinite(output.grad).all()
        assert output.grad[3] == 0  # sample 3 has no label at all


def test_binary_tasks_are_computed_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    original = F.binary_cross_entropy_with_logits

    def counting(input: Tensor, target: Tensor, **kwargs: object) -> Tensor:
        calls.append(tuple(input.shape))
        return original(input, target, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(F, "binary_cross_entropy_with_logits", counting)
    names = [f"t{j}" for j in range(40)]
    loss = MaskedMultiTaskLoss(dict.fromkeys(names, "binary"))
    loss({name: torch.zeros(8, 1) for name in names}, torch.ones(8, 40))
    assert calls == [(8, 40)]


def test_bfloat16_autocast_is_close_to_float32() -> None:
    loss = MaskedMultiTaskLoss({"a": "binary", "b": "multiclass"})
    layer = torch.nn.Linear(4, 4)
    inputs = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    targets = {
        "a": torch.tensor([1.0, 0.0, 1.0, math.nan, 0.0, 1.0]),
        "b": torch.tensor([0, 1, 2, -1, 0, 1]),
    }

    def losses_and_grad(autocast: bool) -> tuple[Tensor, Tensor]:
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            features = layer(inputs)
            result = loss({"a": features[:, 0], "b": features[:, 1:]}, targets)
        result.sum().backward()
        assert layer.weight.grad is not None
        return result.float(), layer.weight.grad.clone()

    (low, low_grad), (full, full_grad) = losses_and_grad(True), losses_and_grad(False)
    torch.testing.assert_close(low, full, atol=0.02, rtol=0.02)
    torch.testing.assert_close(low_grad, full_grad, atol=0.02, rtol=0.05)
    assert loss.label_counts.tolist() == [5.0, 5.0]


def test_bfloat16_outputs_are_counted_and_averaged_in_float32() -> None:
    # bfloat16 holds integers exactly only up to 256: 301 labels must not become 300.
    loss = MaskedMultiTaskLoss({"a": "regression"})
    outputs = {"a": torch.zeros(301, dtype=torch.bfloat16)}
    result = loss(outputs, torch.ones(301, 1))
    assert loss.label_counts.tolist() == [301.0]
    assert loss.label_counts.dtype == torch.float32
    assert result.tolist() == [1.0]


def test_a_module_loss_is_a_submodule() -> None:
    weighted = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0]), reduction="none")
    loss = MaskedMultiTaskLoss({"a": "binary", "b": weighted}).double()
    assert weighted.weight is not None
    assert weighted.weight.dtype == torch.float64  # moved with the loss
    assert "loss_modules.b.weight" in loss.state_dict()
    outputs = {
        "a": torch.zeros(3, dtype=torch.float64),
        "b": torch.zeros(3, 2, dtype=torch.float64),
    }
    result = loss(outputs, {"a": torch.ones(3), "b": torch.tensor([0, 1, -1])})
    # b: equal logits, so log 2 per sample times its class weight: (1 + 3) / 2 labelled.
    assert result.tolist() == pytest.approx([math.log(2), 2 * math.log(2)])


# ---------------------------------------------------------------------------- bad input


def test_task_names_that_differ_are_named() -> None:
    loss = MaskedMultiTaskLoss({"a": "binary", "b": "binary"})
    with pytest.raises(ValueError, match=r"model outputs .* missing \['b'\], unexpected \['z'\]"):
        loss({"a": torch.zeros(2), "z": torch.zeros(2)}, torch.zeros(2, 2))
    outputs = {"a": torch.zeros(2), "b": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"targets .* unexpected \['c'\]"):
        loss(outputs, {"a": torch.zeros(2), "b": torch.zeros(2), "c": torch.zeros(2)})


def test_wrong_shapes_and_dtypes() -> None:
    loss = MaskedMultiTaskLoss({"a": "binary", "c": "multiclass"})
    good = {"a": torch.zeros(3), "c": torch.zeros(3, 2)}
    labels = {"a": torch.zeros(3), "c": torch.zeros(3, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"shape \[B, 2\] .* got \(3, 3\)"):
        loss(good, torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"output of task 'a' must have shape \[3\] or \[3, 1\]"):
        loss({**good, "a": torch.zeros(3, 2)}, labels)
    with pytest.raises(
        TypeError, match=r"target of task 'a' must be floating point .* torch.int64"
    ):
        loss(good, {**labels, "a": torch.zeros(3, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"target of task 'a' must have shape \[3\]"):
        loss(good, {**labels, "a": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"multiclass task 'c' must be logits of shape \[3, C\]"):
        loss({**good, "c": torch.zeros(3)}, labels)
    with pytest.raises(TypeError, match="class indices"):
        loss(good, {**labels, "c": torch.zeros(3, dtype=torch.bool)})


def test_bad_task_specs() -> None:
    with pytest.raises(ValueError, match="task list is empty"):
        MaskedMultiTaskLoss({})
    with pytest.raises(ValueError, match=r"task 'a' has kind 'binay'; use one of"):
        MaskedMultiTaskLoss({"a": "binay"})  # type: ignore[dict-item]
    loss = MaskedMultiTaskLoss({"a": lambda output, target: (output - target).abs()})
    with pytest.raises(ValueError, match=r"one value per sample, shape \(2,\)"):
        loss({"a": torch.zeros(2, 3)}, {"a": torch.zeros(2, 3)})
    with pytest.raises(
        ValueError, match=r"task 'a' must have the batch size 2 first, got shape \(3,\)"
    ):
        loss({"a": torch.zeros(2)}, {"a": torch.zeros(3)})
    with pytest.raises(RuntimeError, match="after the first call"):
        _ = MaskedMultiTaskLoss({"a": "binary"}).label_counts


def test_negative_class_indices_other_than_minus_one_are_rejected() -> None:
    loss = MaskedMultiTaskLoss({"c": "multiclass"})
    with pytest.raises((IndexError, RuntimeError), match="-100"):
        loss({"c": torch.zeros(2, 3)}, {"c": torch.tensor([-100, 1])})


def test_a_list_of_tasks_names_the_expected_mapping() -> None:
    for tasks in (["a", "b"], ["binary", "binary"]):
        with pytest.raises(TypeError, match=r"tasks must be a mapping .*, got list; e\.g\. .*"):
            MaskedMultiTaskLoss(tasks)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"dict\.fromkeys\(names, 'binary'\)"):
        MaskedMultiTaskLoss(["a", "b"])  # type: ignore[arg-type]


def test_a_module_dict_of_losses_is_a_mapping() -> None:
    losses = nn.ModuleDict({"c": nn.CrossEntropyLoss(reduction="none")})
    loss = MaskedMultiTaskLoss(losses)  # type: ignore[arg-type]
    result = loss({"c": torch.zeros(2, 3)}, {"c": torch.tensor([0, -1])})
    assert result.tolist() == pytest.approx([math.log(3)])


def test_outputs_and_targets_that_are_not_mappings_are_named() -> None:
    loss = MaskedMultiTaskLoss({"a": "binary", "b": "binary"})
    out, y = torch.zeros(4, 2), torch.zeros(4, 2)
    with pytest.raises(
        TypeError, match=r"outputs must be .*, got a tensor of shape \(4, 2\); .*out\[:, j\]"
    ):
        loss(out, y)
    with pytest.raises(TypeError, match=r"outputs must be .*, got list; .*dict\(zip"):
        loss([out[:, 0], out[:, 1]], y)
    outputs = {"a": out[:, 0], "b": out[:, 1]}
    with pytest.raises(TypeError, match=r"targets must be .* \[B, K\] tensor, got list; .*zip"):
        loss(outputs, [y[:, 0], y[:, 1]])
