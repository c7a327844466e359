"""MaskedMultiTaskLoss: masking, gradients, vectorisation and input checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dstmtl import MaskedMultiTaskLoss, Task
from dstmtl.loss import TaskSpec

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


# ---------------------------------------------------------- dense and multi-output tasks


def segmentation_batch(seed: int, classes: int = 4) -> tuple[Tensor, Tensor]:
    """Logits ``[3, C, 5, 6]`` and class maps ``[3, 5, 6]`` with missing pixels; sample 2
    has no labelled pixel."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, classes, 5, 6, generator=generator, dtype=torch.float64)
    target = torch.randint(-1, classes, (3, 5, 6), generator=generator)
    target[2] = -1
    return logits, target


CROSS_ENTROPY_OPTIONS = [
    {},
    {"class_weights": (0.5, 2.0, 0.0, 3.0)},
    {"label_smoothing": 0.2},
    {"class_weights": (0.5, 2.0, 0.0, 3.0), "label_smoothing": 0.2},
]


@pytest.mark.parametrize("options", CROSS_ENTROPY_OPTIONS)
def test_dense_multiclass_is_torch_cross_entropy_with_ignore_index(
    options: dict[str, object],
) -> None:
    loss = MaskedMultiTaskLoss(
        {"seg": Task("multiclass", outputs=4, **options), "depth": "regression"}  # type: ignore[arg-type]
    )
    logits, target = segmentation_batch(0)
    outputs = {"seg": logits, "depth": torch.zeros(3, 5, 6)}
    result = loss(outputs, {"seg": target, "depth": torch.zeros(3, 5, 6)})
    weights = options.get("class_weights")
    expected = F.cross_entropy(
        logits,
        target,
        weight=None if weights is None else torch.tensor(weights, dtype=torch.float64),
        ignore_index=-1,
        label_smoothing=float(options.get("label_smoothing", 0.0)),  # type: ignore[arg-type]
        reduction="mean",
    )
    assert result[0].item() == pytest.approx(expected.item(), rel=1e-12)
    assert loss.label_counts.tolist() == [2.0, 3.0]  # sample 2 has no labelled pixel


def test_same_shaped_multiclass_tasks_with_the_same_options_share_one_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[int, ...]] = []
    original = F.cross_entropy

    def counting(input: Tensor, target: Tensor, **kwargs: object) -> Tensor:
        calls.append(tuple(input.shape))
        return original(input, target, **kwargs)  # type: ignore[arg-type]

    weighted = Task("multiclass", outputs=4, class_weights=[1.0, 2.0, 3.0, 4.0])
    loss = MaskedMultiTaskLoss(
        {"a": weighted, "b": "multiclass", "c": weighted, "d": "multiclass", "e": "multiclass"}
    )
    (logits_a, target_a), (logits_b, target_b) = segmentation_batch(1), segmentation_batch(2)
    outputs = {"a": logits_a, "b": logits_b, "c": logits_b, "d": logits_a, "e": torch.zeros(3, 4)}
    targets = {"a": target_a, "b": target_b, "c": target_b, "d": target_a, "e": torch.zeros(3)}
    monkeypatch.setattr(F, "cross_entropy", counting)
    result = loss(outputs, targets)
    assert sorted(calls) == [(3, 4, 1), (3, 4, 2, 5, 6), (3, 4, 2, 5, 6)]
    monkeypatch.undo()
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    expected = [
        F.cross_entropy(logits_a, target_a, weight=w, ignore_index=-1),
        F.cross_entropy(logits_b, target_b, ignore_index=-1),
        F.cross_entropy(logits_b, target_b, weight=w, ignore_index=-1),
        F.cross_entropy(logits_a, target_a, ignore_index=-1),
        torch.tensor(math.log(4)),
    ]
    assert result.tolist() == pytest.approx([e.item() for e in expected], rel=1e-12)


def test_labelled_elements_of_weight_zero_only_give_zero_where_torch_gives_nan() -> None:
    loss = MaskedMultiTaskLoss({"c": Task("multiclass", outputs=3, class_weights=[0.0, 1.0, 1.0])})
    logits = torch.randn(2, 3, 2, requires_grad=True)
    target = torch.tensor([[0, -1], [0, 0]])
    assert F.cross_entropy(
        logits, target, weight=loss.get_buffer("class_weights_0"), ignore_index=-1
    ).isnan()
    result = loss({"c": logits}, {"c": target})
    assert result.tolist() == [0.0]
    assert loss.label_counts.tolist() == [2.0]
    result.sum().backward()
    assert logits.grad is not None
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_multi_label_binary_with_pos_weight_by_hand() -> None:
    loss = MaskedMultiTaskLoss({"tags": Task("binary", outputs=3, pos_weight=[1.0, 2.0, 4.0])})
    logits = torch.tensor([[0.0, 1.0, -2.0], [3.0, 0.0, 0.5]], requires_grad=True)
    target = torch.tensor([[1.0, NAN, 0.0], [NAN, 1.0, 1.0]])

    def softplus(x: float) -> float:  # -log(sigmoid(-x))
        return math.log1p(math.exp(x))

    by_hand = [
        1.0 * softplus(-0.0),  # label 0, positive: pos_weight 1
        softplus(-2.0),  # label 2, negative: no pos_weight
        2.0 * softplus(-0.0),  # label 1, positive: pos_weight 2
        4.0 * softplus(-0.5),  # label 2, positive: pos_weight 4
    ]
    result = loss({"tags": logits}, {"tags": target})
    assert result.tolist() == pytest.approx([sum(by_hand) / 4])
    assert loss.label_counts.tolist() == [2.0]
    result.sum().backward()
    assert logits.grad is not None
    assert logits.grad[0, 1] == 0  # missing labels
    assert logits.grad[1, 0] == 0
    assert (logits.grad[~target.isnan()] != 0).all()


def test_per_pixel_binary_masks_and_depth_maps_by_hand() -> None:
    loss = MaskedMultiTaskLoss({"mask": Task("binary", pos_weight=3.0), "depth": "regression"})
    # One-channel heads [B, 1, H, W] against [B, H, W] targets.
    mask_logits = torch.tensor([[[[0.0, 1.0], [2.0, -1.0]]], [[[0.5, 0.0], [0.0, 0.0]]]])
    mask = torch.tensor([[[1.0, 0.0], [NAN, 1.0]], [[NAN, NAN], [NAN, NAN]]])
    depth_out = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 1.0], [1.0, 1.0]]]])
    depth = torch.tensor([[[1.5, NAN], [3.0, NAN]], [[NAN, 3.0], [NAN, NAN]]])
    result = loss({"mask": mask_logits, "depth": depth_out}, {"mask": mask, "depth": depth})
    bce = [
        3.0 * math.log1p(math.exp(-0.0)),
        math.log1p(math.exp(1.0)),
        3.0 * math.log1p(math.e),
    ]
    squared = [0.5**2, 0.0**2, 2.0**2]
    assert result.tolist() == pytest.approx([sum(bce) / 3, sum(squared) / 3])
    assert loss.label_counts.tolist() == [1.0, 2.0]  # sample 1 has no labelled mask pixel


def test_multi_output_regression_by_hand() -> None:
    loss = MaskedMultiTaskLoss({"pose": Task("regression", outputs=3), "age": "regression"})
    outputs = {"pose": torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), "age": torch.zeros(2, 1)}
    targets = {"pose": torch.tensor([[1.0, NAN, 1.0], [2.0, NAN, NAN]]), "age": torch.ones(2)}
    assert loss(outputs, targets).tolist() == pytest.approx([(0 + 4 + 4) / 3, 1.0])
    assert loss.label_counts.tolist() == [2.0, 2.0]


def test_same_shaped_dense_tasks_of_a_kind_share_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, tuple[int, ...]]] = []
    for function in ("binary_cross_entropy_with_logits", "mse_loss"):
        original = getattr(F, function)

        def counting(
            input: Tensor,
            target: Tensor,
            _name: str = function,
            _f: object = original,
            **kw: object,
        ) -> Tensor:
            calls.append((_name, tuple(input.shape)))
            return _f(input, target, **kw)  # type: ignore[operator, no-any-return]

        monkeypatch.setattr(F, function, counting)
    tasks: dict[str, TaskSpec] = {
        "edge": Task("binary", pos_weight=2.0),
        "a": "binary",
        "mask": "binary",
        "depth": "regression",
        "normals": Task("regression", outputs=3),
        "b": Task("binary", pos_weight=[4.0]),
        "height": "regression",
    }
    loss = MaskedMultiTaskLoss(tasks)
    generator = torch.Generator().manual_seed(3)
    maps = {
        name: torch.randn(2, 1, 4, 4, generator=generator)
        for name in ("edge", "mask", "depth", "height")
    }
    outputs = {
        **maps,
        "a": torch.randn(2, generator=generator),
        "b": torch.randn(2, 1, generator=generator),
    }
    outputs["normals"] = torch.randn(2, 3, 4, 4, generator=generator)
    targets = {name: (torch.rand(2, 4, 4, generator=generator) < 0.5).float() for name in maps}
    targets.update(
        a=torch.tensor([1.0, NAN]), b=torch.tensor([[0.0], [1.0]]), normals=torch.randn(2, 3, 4, 4)
    )
    result = loss(outputs, targets)
    assert sorted(calls) == [
        ("binary_cross_entropy_with_logits", (2, 2)),  # a and b
        ("binary_cross_entropy_with_logits", (2, 2, 4, 4)),  # edge and mask
        ("mse_loss", (2, 1, 3, 4, 4)),  # normals
        ("mse_loss", (2, 2, 4, 4)),  # depth and height
    ]
    monkeypatch.undo()
    for j, (name, task) in enumerate(tasks.items()):
        single = MaskedMultiTaskLoss({name: task})
        alone = single({name: outputs[name]}, {name: targets[name]})
        assert result[j].item() == pytest.approx(alone.item(), rel=1e-6), name
        assert loss.label_counts[j] == single.label_counts[0]


def test_dense_tasks_without_labels_are_zero_and_missing_elements_get_no_gradient() -> None:
    loss = MaskedMultiTaskLoss({"seg": "multiclass", "mask": "binary", "depth": "regression"})
    outputs = {
        "seg": torch.randn(2, 3, 4, 4, requires_grad=True),
        "mask": torch.randn(2, 4, 4, requires_grad=True),
        "depth": torch.full((2, 1, 4, 4), 1e30, requires_grad=True),
    }
    empty = {"seg": torch.full((2, 4, 4), -1), "mask": torch.full((2, 4, 4), NAN)}
    result = loss(outputs, {**empty, "depth": torch.full((2, 4, 4), NAN)})
    assert result.tolist() == [0.0, 0.0, 0.0]
    assert loss.label_counts.tolist() == [0.0, 0.0, 0.0]
    result.sum().backward()
    for name, output in outputs.items():
        assert output.grad is not None, name
        assert torch.equal(output.grad, torch.zeros_like(output)), name

    for output in outputs.values():
        output.grad = None
    seg, mask, depth = (
        torch.full((2, 4, 4), -1),
        torch.full((2, 4, 4), NAN),
        torch.full((2, 4, 4), NAN),
    )
    seg[0, 1, 2], mask[1, 0, 0], depth[0, 3, 3] = 2, 1.0, 0.0
    loss(outputs, {"seg": seg, "mask": mask, "depth": depth}).sum().backward()
    assert loss.label_counts.tolist() == [1.0, 1.0, 1.0]
    for name, output, labelled in (
        ("seg", outputs["seg"], (seg != -1).unsqueeze(1).expand(2, 3, 4, 4)),
        ("mask", outputs["mask"], ~mask.isnan()),
        ("depth", outputs["depth"], ~depth.isnan().unsqueeze(1)),
    ):
        assert output.grad is not None, name
        assert torch.isfinite(output.grad).all(), name
        assert (output.grad[~labelled] == 0).all(), name
        assert (output.grad[labelled] != 0).all(), name


@pytest.mark.parametrize(
    "dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8], ids=str
)
def test_class_targets_of_any_integer_dtype(dtype: torch.dtype) -> None:
    loss = MaskedMultiTaskLoss({"c": "multiclass", "seg": "multiclass"})
    logits, target = segmentation_batch(4)
    outputs = {"c": logits[:, :, 0, 0], "seg": logits}
    targets = {"c": torch.tensor([0, 3, 1]), "seg": target.clamp(min=0)}  # uint8 has no -1
    expected = loss(outputs, targets)
    result = loss(outputs, {name: t.to(dtype) for name, t in targets.items()})
    assert torch.equal(result, expected)
    assert loss.count_labels({name: t.to(dtype) for name, t in targets.items()}) == {
        "c": 3,
        "seg": 3,
    }


def test_dense_bfloat16_and_float16_outputs_are_close_to_float32() -> None:
    loss = MaskedMultiTaskLoss(
        {
            "seg": Task("multiclass", outputs=4, class_weights=[1, 2, 3, 4]),
            "mask": "binary",
            "depth": "regression",
        }
    )
    logits, seg = segmentation_batch(5)
    generator = torch.Generator().manual_seed(5)
    mask = (torch.rand(3, 5, 6, generator=generator) < 0.5).float()
    mask[0, 0] = NAN
    depth = torch.randn(3, 5, 6, generator=generator)
    depth[1] = NAN
    outputs = {"seg": logits.float(), "mask": logits[:, 0].float(), "depth": logits[:, 1:2].float()}
    targets = {"seg": seg, "mask": mask, "depth": depth}
    full = loss(outputs, targets)
    for dtype in (torch.bfloat16, torch.float16):
        low = loss({name: o.to(dtype) for name, o in outputs.items()}, targets)
        assert low.dtype == torch.float32
        torch.testing.assert_close(low, full, atol=0.03, rtol=0.02)


def test_option_tensors_follow_the_module_and_are_not_saved() -> None:
    loss = MaskedMultiTaskLoss(
        {
            "c": Task("multiclass", outputs=2, class_weights=[1.0, 3.0]),
            "b": Task("binary", outputs=2, pos_weight=[2.0, 5.0]),
            "a": "binary",
        }
    )
    assert {name for name, _ in loss.named_buffers()} == {
        "class_weights_0",
        "pos_weight_1",
        "pos_weight_2",
    }
    assert loss.state_dict() == {}  # constructor arguments, like the kinds
    loss.double()
    assert loss.get_buffer("class_weights_0").dtype == torch.float64
    assert loss.get_buffer("pos_weight_1").tolist() == [2.0, 5.0]
    assert loss.get_buffer("pos_weight_2").item() == 1.0
    moved = copy.deepcopy(loss).to("meta")
    assert moved.get_buffer("pos_weight_1").device == torch.device("meta")
    outputs = {"c": torch.zeros(2, 2), "b": torch.zeros(2, 2), "a": torch.zeros(2)}
    targets = {
        "c": torch.tensor([1, -1]),
        "b": torch.tensor([[1.0, 1.0], [NAN, 0.0]]),
        "a": torch.ones(2),
    }
    result = loss(outputs, targets)  # float32 outputs with float64 option tensors
    log2 = math.log(2)
    assert result.tolist() == pytest.approx([log2, (2 + 5 + 1) * log2 / 3, log2])


def test_the_loss_with_dense_tasks_compiles_as_one_graph() -> None:
    loss = MaskedMultiTaskLoss(
        {
            "seg": Task("multiclass", outputs=4, class_weights=[1, 2, 3, 4], label_smoothing=0.1),
            "mask": Task("binary", pos_weight=2.0),
            "depth": "regression",
            "b": "binary",
        }
    )
    logits, seg = segmentation_batch(6)
    outputs = {
        "seg": logits.float(),
        "mask": logits[:, :1].float(),
        "depth": logits[:, 1].float(),
        "b": logits[:, 0, 0, 0].float(),
    }
    targets = {
        "seg": seg.int(),
        "mask": (logits[:, 2] > 0).float(),
        "depth": torch.where(logits[:, 3] > 0, NAN, 1.0).float(),
        "b": torch.tensor([1.0, NAN, 0.0]),
    }
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(outputs, targets), loss(outputs, targets))
    torch.testing.assert_close(loss.label_counts, torch.tensor([2.0, 3.0, 3.0, 2.0]))


def test_dense_losses_never_read_device_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a tensor's value on the host is what synchronises with a GPU; forbid it."""
    loss = MaskedMultiTaskLoss(
        {
            "seg": Task("multiclass", outputs=4, class_weights=[1, 2, 3, 4], label_smoothing=0.1),
            "seg2": "multiclass",
            "mask": Task("binary", pos_weight=2.0),
            "tags": Task("binary", outputs=3, pos_weight=[1.0, 2.0, 3.0]),
            "depth": "regression",
            "age": "regression",
        }
    )
    logits, seg = segmentation_batch(8)
    outputs = {
        "seg": logits.float().requires_grad_(),
        "seg2": logits.float().requires_grad_(),
        "mask": logits[:, 0].float().requires_grad_(),
        "tags": logits[:, :3, 0, 0].float().requires_grad_(),
        "depth": logits[:, :1].float().requires_grad_(),
        "age": logits[:, 0, 0, 0].float().requires_grad_(),
    }
    targets = {
        "seg": seg.to(torch.int16),
        "seg2": torch.where(seg == 0, NAN, seg.double()),
        "mask": torch.where(seg == 1, NAN, 1.0),
        "tags": torch.tensor([[1.0, NAN, 0.0], [NAN] * 3, [0.0, 1.0, 1.0]]),
        "depth": torch.where(seg == 2, NAN, 0.5),
        "age": torch.tensor([NAN, 2.0, 3.0]),
    }

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("host read of a tensor value in the per-step path")

    for method in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "nonzero"):
        monkeypatch.setattr(Tensor, method, forbidden)
    result = loss(outputs, targets)
    result.sum().backward()
    counts = loss.label_counts
    monkeypatch.undo()
    assert torch.isfinite(result).all()
    assert counts.tolist() == [2.0, 2.0, 3.0, 2.0, 3.0, 2.0]


def test_count_labels_of_dense_tasks() -> None:
    loss = MaskedMultiTaskLoss(
        {"seg": Task("multiclass", outputs=4), "mask": "binary", "tags": Task("binary", outputs=2)}
    )
    _, seg = segmentation_batch(7)
    mask = torch.full((3, 5, 6), NAN)
    mask[0, 4, 5] = 1.0
    tags = torch.tensor([[NAN, 1.0], [NAN, NAN], [0.0, 0.0]])
    labels = {"seg": seg, "mask": mask, "tags": tags}
    assert loss.count_labels(labels) == {"seg": 2, "mask": 1, "tags": 2}
    for name, bad, message in (
        (
            "seg",
            4,
            r"'seg' holds \[4\], which are not class indices; use whole numbers in \[0, 4\)",
        ),
        ("seg", -3, r"'seg' holds \[-3\]"),
        ("mask", -1.0, r"binary target of task 'mask' holds \[-1.0\] outside \[0, 1\]"),
        ("tags", math.inf, r"task 'tags' holds an infinite value"),
    ):
        broken = {k: v.clone() for k, v in labels.items()}
        broken[name][1, 0] = bad
        with pytest.raises(ValueError, match=message):
            loss.count_labels(broken)


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
    with pytest.raises(
        ValueError, match=r"output \(3, 2\) and target \(3,\) of binary task 'a' must have the same"
    ):
        loss({**good, "a": torch.zeros(3, 2)}, labels)
    with pytest.raises(
        TypeError, match=r"target of task 'a' must be floating point .* torch.int64"
    ):
        loss(good, {**labels, "a": torch.zeros(3, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"target of task 'a' must have the batch size 3 first"):
        loss(good, {**labels, "a": torch.zeros(4)})
    with pytest.raises(
        ValueError, match=r"multiclass task 'c' must be logits of shape \[B, C, \*\]"
    ):
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


def test_wrong_shapes_per_kind() -> None:
    loss = MaskedMultiTaskLoss(
        {"seg": "multiclass", "depth": "regression", "tags": Task("binary", outputs=3)}
    )
    good_outputs = {
        "seg": torch.zeros(2, 4, 5, 6),
        "depth": torch.zeros(2, 5, 6),
        "tags": torch.zeros(2, 3),
    }
    good_targets = {
        "seg": torch.zeros(2, 5, 6, dtype=torch.long),
        "depth": torch.zeros(2, 1, 5, 6),
        "tags": torch.zeros(2, 3),
    }
    assert loss(good_outputs, good_targets).tolist() == pytest.approx(
        [math.log(4), 0.0, math.log(2)]
    )
    assert loss(good_outputs, {**good_targets, "seg": torch.zeros(2, 1, 5, 6)}).shape == (3,)
    cases = [
        (
            "depth",
            "output",
            torch.zeros(2, 5, 5),
            r"output \(2, 5, 5\) and target \(2, 1, 5, 6\) of regression task 'depth' must",
        ),
        (
            "depth",
            "target",
            torch.zeros(2, 2, 5, 6),
            r"output \(2, 5, 6\) and target \(2, 2, 5, 6\) of regression task 'depth'",
        ),
        (
            "depth",
            "output",
            torch.zeros(3, 5, 6),
            r"output of task 'depth' must have the batch size 2 first, got shape \(3, 5, 6\)",
        ),
        (
            "seg",
            "target",
            torch.zeros(2, 6, 5),
            r"'seg' must hold class indices of shape \[2, 5, 6\] .* \[2, 4, 5, 6\] .* \(2, 6, 5\)",
        ),
        (
            "seg",
            "target",
            torch.zeros(2, 4, 5, 6),
            r"class indices of shape \[2, 5, 6\] .* got \(2, 4, 5, 6\)",
        ),
        (
            "seg",
            "output",
            torch.zeros(2),
            r"multiclass task 'seg' must be logits of shape \[B, C, \*\], got \(2,\)",
        ),
        (
            "tags",
            "output",
            torch.zeros(2, 2),
            r"task 'tags' must have 3 values in dimension 1, as its Task\(outputs=3\) .* \(2, 2\)",
        ),
        ("tags", "output", torch.zeros(2), r"task 'tags' must have 3 values in dimension 1"),
    ]
    for name, which, value, message in cases:
        outputs, targets = dict(good_outputs), dict(good_targets)
        (outputs if which == "output" else targets)[name] = value
        with pytest.raises(ValueError, match=message):
            loss(outputs, targets)
    classes = MaskedMultiTaskLoss({"seg": Task("multiclass", outputs=5)})
    with pytest.raises(
        ValueError, match=r"task 'seg' must have 5 values in dimension 1, as its Task\(outputs=5\)"
    ):
        classes({"seg": torch.zeros(2, 4, 5, 6)}, {"seg": good_targets["seg"]})


def test_bool_and_complex_targets_are_refused_with_their_dtype() -> None:
    loss = MaskedMultiTaskLoss({"seg": "multiclass", "mask": "binary", "depth": "regression"})
    outputs = {"seg": torch.zeros(2, 3, 4), "mask": torch.zeros(2, 4), "depth": torch.zeros(2, 4)}
    targets = {
        "seg": torch.zeros(2, 4, dtype=torch.long),
        "mask": torch.zeros(2, 4),
        "depth": torch.zeros(2, 4),
    }
    cases = [
        ("seg", torch.bool, r"target of task 'seg' must hold class indices .* got torch.bool"),
        (
            "seg",
            torch.complex64,
            r"target of task 'seg' must hold class indices .* got torch.complex64",
        ),
        ("mask", torch.bool, r"target of task 'mask' must be floating point .* got torch.bool"),
        ("depth", torch.int32, r"target of task 'depth' must be floating point .* got torch.int32"),
    ]
    for name, dtype, message in cases:
        with pytest.raises(TypeError, match=message):
            loss(outputs, {**targets, name: targets[name].to(dtype)})
        with pytest.raises(TypeError, match=message):
            loss.count_labels({**targets, name: targets[name].to(dtype)})


def test_an_out_of_range_class_index_names_its_task_and_the_range() -> None:
    loss = MaskedMultiTaskLoss({"a": "multiclass", "b": "multiclass", "c": "multiclass"})
    outputs = {"a": torch.zeros(2, 3, 4), "b": torch.zeros(2, 3, 4), "c": torch.zeros(2, 3)}
    targets = {
        "a": torch.zeros(2, 4, dtype=torch.int32),
        "b": torch.zeros(2, 4),
        "c": torch.tensor([0, 2]),
    }
    loss(outputs, targets)
    cases = [
        (
            "b",
            (1, 2),
            3.0,
            r"task 'b' holds \[3\], outside the class indices \[0, 3\) of its 3 logits",
        ),
        ("a", (0, 0), 7, r"task 'a' holds \[7\], outside the class indices \[0, 3\)"),
        ("c", (1,), 3, r"task 'c' holds \[3\], outside"),
        ("c", (0,), -100, r"task 'c' holds \[-100\], outside .*mark a missing label with -1"),
    ]
    for name, index, value, message in cases:
        broken = {k: v.clone() for k, v in targets.items()}
        broken[name][index] = value
        with pytest.raises(IndexError, match=message):
            loss(outputs, broken)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        (
            {"kind": "segmentation"},
            ValueError,
            r"kind 'segmentation' is not one of \['binary', 'multiclass', 'regression'\]",
        ),
        (
            {"kind": "multiclass"},
            ValueError,
            r"a multiclass task needs outputs >= 2, got 1; .*outputs=10",
        ),
        ({"kind": "binary", "outputs": 0}, ValueError, r"a binary task needs outputs >= 1, got 0"),
        ({"kind": "regression", "outputs": 2.0}, TypeError, r"outputs must be an int .* got 2.0"),
        (
            {"kind": "binary", "class_weights": [1.0]},
            ValueError,
            r"class_weights applies to multiclass tasks only, not to a binary task",
        ),
        (
            {"kind": "regression", "label_smoothing": 0.1},
            ValueError,
            r"label_smoothing applies to multiclass tasks only",
        ),
        (
            {"kind": "multiclass", "outputs": 3, "pos_weight": 2.0},
            ValueError,
            r"pos_weight applies to binary tasks only, not to a multiclass task",
        ),
        (
            {"kind": "multiclass", "outputs": 3, "class_weights": [1.0, 2.0]},
            ValueError,
            r"class_weights has 2 values for 3 classes",
        ),
        (
            {"kind": "multiclass", "outputs": 2, "class_weights": [1.0, -0.5]},
            ValueError,
            r"class_weights must be finite, non-negative and not all 0, got \[1.0, -0.5\]",
        ),
        (
            {"kind": "multiclass", "outputs": 2, "class_weights": [0, 0]},
            ValueError,
            r"not all 0, got \[0.0, 0.0\]",
        ),
        (
            {"kind": "multiclass", "outputs": 2, "class_weights": [1.0, math.nan]},
            ValueError,
            r"class_weights must be finite",
        ),
        (
            {"kind": "multiclass", "outputs": 2, "class_weights": torch.ones(2, 1)},
            TypeError,
            r"class_weights must be a 1-D tensor of real numbers, got torch.float32 .* \(2, 1\)",
        ),
        (
            {"kind": "multiclass", "outputs": 2, "class_weights": "ab"},
            TypeError,
            r"class_weights must be a sequence of numbers, got 'ab'",
        ),
        (
            {"kind": "multiclass", "outputs": 2, "class_weights": [1.0, None]},
            TypeError,
            r"class_weights must hold numbers, got None",
        ),
        (
            {"kind": "multiclass", "outputs": 2, "label_smoothing": 1.0},
            ValueError,
            r"label_smoothing must be in \[0, 1\), got 1.0",
        ),
        (
            {"kind": "multiclass", "outputs": 2, "label_smoothing": -0.1},
            ValueError,
            r"label_smoothing must be in \[0, 1\), got -0.1",
        ),
        (
            {"kind": "multiclass", "outputs": 2, "label_smoothing": "0.1"},
            TypeError,
            r"label_smoothing must be a number, got '0.1'",
        ),
        (
            {"kind": "binary", "outputs": 3, "pos_weight": [1.0, 2.0]},
            ValueError,
            r"pos_weight has 2 values for 3 labels \(outputs\); give one number .* one per label",
        ),
        (
            {"kind": "binary", "pos_weight": 0.0},
            ValueError,
            r"pos_weight must be finite and positive, got \[0.0\]",
        ),
        (
            {"kind": "binary", "outputs": 2, "pos_weight": [1.0, -2.0]},
            ValueError,
            r"must be finite and positive, got \[1.0, -2.0\]",
        ),
        (
            {"kind": "binary", "pos_weight": math.inf},
            ValueError,
            r"pos_weight must be finite and positive",
        ),
    ],
)
def test_bad_task_options(
    arguments: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Task(**arguments)  # type: ignore[arg-type]


def test_task_options_are_stored_as_numbers() -> None:
    task = Task("multiclass", outputs=3, class_weights=torch.tensor([1, 2, 3]), label_smoothing=0)
    assert task.class_weights == (1.0, 2.0, 3.0)
    assert task.label_smoothing == 0.0
    assert task == Task("multiclass", outputs=3, class_weights=[1.0, 2.0, 3.0])
    assert Task("binary", pos_weight=torch.tensor(2)).pos_weight == 2.0
    assert Task("binary", outputs=2, pos_weight=[3.0]).pos_weight == 3.0  # one for all labels
    assert Task("binary", outputs=2, pos_weight=(1, 2)).pos_weight == (1.0, 2.0)
    assert len({task, Task("multiclass", outputs=3, class_weights=(1, 2, 3))}) == 1  # hashable


@pytest.mark.parametrize("one_output_column", [False, True])
@pytest.mark.parametrize(
    "kinds",
    [
        ["binary", "binary", "binary"],
        ["regression", "regression", "regression"],
        ["binary", "regression", "binary"],
    ],
)
def test_per_sample_tasks_in_one_target_tensor_match_the_general_path(
    kinds: list[str], one_output_column: bool
) -> None:
    # Targets as one [B, K] tensor take one [B, K] call; by name they take the per-task path.
    tasks: dict[str, TaskSpec] = {f"t{j}": Task(kind) for j, kind in enumerate(kinds)}  # type: ignore[arg-type]
    if "regression" not in kinds:
        tasks["t1"] = Task("binary", pos_weight=2.5)
    loss_fn = MaskedMultiTaskLoss(tasks)
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    columns = base.split(1, dim=1) if one_output_column else base.unbind(dim=1)
    outputs = dict(zip(tasks, columns, strict=True))
    targets = torch.randint(0, 2, (6, 3), generator=generator).double()
    targets[torch.rand(6, 3, generator=generator) < 0.3] = float("nan")
    targets[:, 2] = float("nan")  # a task without labels
    by_name = dict(zip(tasks, targets.unbind(dim=1), strict=True))

    general = loss_fn(outputs, by_name)
    general_counts = loss_fn.label_counts
    (general_grad,) = torch.autograd.grad(general.sum(), base)
    fast = loss_fn(outputs, targets)
    (fast_grad,) = torch.autograd.grad(fast.sum(), base)

    assert torch.equal(fast, general)
    assert torch.equal(loss_fn.label_counts, general_counts)
    assert torch.equal(fast_grad, general_grad)
    assert fast[2] == 0
    assert general_counts.tolist() == (~targets.isnan()).sum(dim=0).float().tolist()


def test_tasks_without_outputs_get_nan_losses_and_no_labels() -> None:
    loss_fn = MaskedMultiTaskLoss({"a": "binary", "b": "regression", "c": "binary"})
    outputs = {"a": torch.tensor([2.0, -1.0], requires_grad=True), "c": torch.zeros(2)}
    targets = torch.tensor([[1.0, 3.0, 0.0], [0.0, 4.0, 1.0]])
    losses = loss_fn(outputs, targets)  # the heads of "b" did not run
    assert losses[1].isnan()
    # Masked out, as a scheduler masks a dropped task, it puts no NaN into the gradients.
    torch.where(torch.tensor([True, False, True]), losses, 0.0).sum().backward()
    assert outputs["a"].grad is not None
    assert outputs["a"].grad.isfinite().all()
    expected_a = F.binary_cross_entropy_with_logits(outputs["a"], targets[:, 0])
    torch.testing.assert_close(losses[0], expected_a)
    assert loss_fn.label_counts.tolist() == [2.0, 0.0, 2.0]
    with pytest.raises(ValueError, match="unexpected \\['x'\\]"):
        loss_fn({"a": torch.zeros(2), "x": torch.zeros(2)}, targets)
    with pytest.raises(ValueError, match="missing"):
        loss_fn({}, targets)
