"""FusedLinearHeads, its per-task handles and FeaturePool, on their own and in a MultiHeadNet."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from dstmtl import FeaturePool, FusedLinearHead, FusedLinearHeads, Layout, MultiHeadNet

WIDTHS = {"a": 1, "b": 3, "c": 2}


def separate_and_fused() -> tuple[dict[str, nn.Linear], FusedLinearHeads]:
    torch.manual_seed(0)
    linears = {task: nn.Linear(6, width, dtype=torch.float64) for task, width in WIDTHS.items()}
    return linears, FusedLinearHeads.from_linears(linears)


def test_fused_heads_give_the_outputs_and_gradients_of_separate_linears() -> None:
    linears, fused = separate_and_fused()
    assert fused.weight.dtype == torch.float64
    # Weights that float32 cannot hold: the fused copy must keep them exactly.
    assert not torch.equal(linears["b"].weight.float().double(), linears["b"].weight)
    assert torch.equal(fused.weight[fused.rows("b")], linears["b"].weight)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    x_separate = x.detach().clone().requires_grad_()
    outputs = fused(x)
    expected = {task: linear(x_separate) for task, linear in linears.items()}
    assert list(outputs) == list(WIDTHS)
    for task in WIDTHS:
        torch.testing.assert_close(outputs[task], expected[task], rtol=0, atol=1e-12)
    # A loss that weighs every output differently, so a row mix-up would show.
    weights = {task: torch.randn_like(out) for task, out in expected.items()}
    sum((outputs[t] * weights[t]).sum() for t in WIDTHS).backward()
    sum((expected[t] * weights[t]).sum() for t in WIDTHS).backward()
    assert fused.weight.grad is not None
    assert fused.bias.grad is not None
    for task, linear in linears.items():
        rows = fused.rows(task)
        assert linear.weight.grad is not None
        assert linear.bias.grad is not None
        torch.testing.assert_close(fused.weight.grad[rows], linear.weight.grad, rtol=0, atol=1e-12)
        torch.testing.assert_close(fused.bias.grad[rows], linear.bias.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, x_separate.grad, rtol=0, atol=1e-12)


def test_rows_follow_the_order_of_the_tasks() -> None:
    fused = FusedLinearHeads(4, WIDTHS)
    assert [fused.rows(t) for t in WIDTHS] == [slice(0, 1), slice(1, 4), slice(4, 6)]
    assert fused.weight.shape == (6, 4)
    assert fused.bias.shape == (6,)
    with pytest.raises(KeyError, match=r"no task 'd'; tasks: \['a', 'b', 'c'\]"):
        fused.rows("d")


def test_rows_are_initialised_as_nn_linear_does() -> None:
    torch.manual_seed(0)
    fused = FusedLinearHeads(100, {"a": 200, "b": 200})
    bound = 1 / math.sqrt(100)  # nn.Linear: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias
    for tensor in (fused.weight, fused.bias):
        assert tensor.abs().max() <= bound
        assert tensor.abs().max() > 0.95 * bound
    assert abs(fused.weight.std().item() - bound / math.sqrt(3)) < 0.01 * bound


def test_state_dict_is_one_weight_and_one_bias() -> None:
    _, fused = separate_and_fused()
    state = fused.state_dict()
    assert list(state) == ["weight", "bias"]
    other = FusedLinearHeads(6, WIDTHS).double()
    other.load_state_dict(state)
    x = torch.randn(3, 6, dtype=torch.float64)
    assert all(torch.equal(fused(x)[t], other(x)[t]) for t in WIDTHS)


def test_a_handle_is_a_view_of_its_rows() -> None:
    _, fused = separate_and_fused()
    handle = fused.heads()["b"]
    assert (handle.task, handle.rows, handle.in_features, handle.out_features) == (
        "b",
        slice(1, 4),
        6,
        3,
    )
    assert handle.fused is fused
    assert torch.equal(handle.weight, fused.weight[1:4])
    assert handle.weight.data_ptr() == fused.weight[1].data_ptr()  # a view, not a copy
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(handle(x), fused(x)["b"], rtol=0, atol=1e-12)
    # No parameters of its own, but the shared ones for whoever collects a head's parameters.
    assert handle.state_dict() == {}
    assert list(handle.parameters()) == [fused.weight, fused.bias]
    assert [name for name, _ in handle.named_parameters()] == ["fused.weight", "fused.bias"]


def test_a_net_registers_the_fused_parameters_once() -> None:
    fused = FusedLinearHeads(6, WIDTHS)
    net = MultiHeadNet(nn.Linear(4, 6), {**fused.heads(), "d": nn.Linear(6, 2)})
    assert net.heads["a"].fused is net.fused_heads[0]
    assert sorted(net.state_dict()) == [
        "backbone.bias",
        "backbone.weight",
        "fused_heads.0.bias",
        "fused_heads.0.weight",
        "heads.d.bias",
        "heads.d.weight",
    ]
    assert len(list(net.parameters())) == 6
    x = torch.randn(3, 4)
    outputs = net(x)
    assert {t: tuple(y.shape) for t, y in outputs.items()} == {
        "a": (3, 1),
        "b": (3, 3),
        "c": (3, 2),
        "d": (3, 2),
    }
    assert torch.equal(outputs["c"], fused(net.backbone(x))["c"])
    assert net.depths(x) == {"a": 2, "b": 2, "c": 2, "d": 2}


def test_a_deep_copy_keeps_handles_on_its_own_fused_heads() -> None:
    net = MultiHeadNet(nn.Linear(4, 6), FusedLinearHeads(6, WIDTHS).heads())
    copied = copy.deepcopy(net)
    handle = copied.heads["b"]
    assert isinstance(handle, FusedLinearHead)
    assert handle.fused is copied.fused_heads[0]
    assert handle.fused is not net.fused_heads[0]


def test_a_handle_under_another_tasks_name_is_refused() -> None:
    handles = FusedLinearHeads(6, WIDTHS).heads()
    with pytest.raises(ValueError, match=r"head of task 'x' is the FusedLinearHead of task 'a'"):
        MultiHeadNet(nn.Linear(4, 6), {"x": handles["a"], "b": handles["b"]})


def test_handles_of_one_fused_module_must_read_one_node() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(4, 6)
            self.second = nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.second(self.first(x))
            return out

    handles = FusedLinearHeads(6, {"a": 1, "b": 1}).heads()
    with pytest.raises(ValueError, match=r"tasks \['a', 'b'\] share one FusedLinearHeads but read"):
        MultiHeadNet(Two(), handles, branches={"a": "first"})


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ({}, "no tasks"),
        ({"a": 0}, r"tasks \{'a': 0\} need a positive int"),
        ({"a": 1.0}, r"tasks \{'a': 1\.0\} need a positive int"),
    ],
)
def test_fused_heads_refuse_bad_outputs(outputs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FusedLinearHeads(4, outputs)


def test_from_linears_needs_one_input_size() -> None:
    with pytest.raises(ValueError, match=r"share one input size .* \{'a': 4, 'b': 5\}"):
        FusedLinearHeads.from_linears({"a": nn.Linear(4, 1), "b": nn.Linear(5, 1)})


@pytest.mark.parametrize(
    ("layout", "shape", "by_hand"),
    [
        ("flat", (2, 5), lambda x: x),
        ("nchw", (2, 5, 3, 4), lambda x: x.sum((2, 3)) / 12),
        ("nhwc", (2, 3, 4, 5), lambda x: x.sum((1, 2)) / 12),
        ("tokens_cls", (2, 7, 5), lambda x: x[:, 0, :]),
        ("tokens_mean", (2, 7, 5), lambda x: x.sum(1) / 7),
    ],
)
def test_feature_pool_reads_each_layout(
    layout: Layout, shape: tuple[int, ...], by_hand: object
) -> None:
    x = torch.randn(*shape, dtype=torch.float64)
    pooled = FeaturePool(layout)(x)
    assert pooled.shape == (2, 5)
    torch.testing.assert_close(pooled, by_hand(x), rtol=0, atol=1e-12)  # type: ignore[operator]
    fused = FusedLinearHeads(5, {"a": 2}, layout=layout).double()
    torch.testing.assert_close(
        fused(x)["a"], pooled @ fused.weight.T + fused.bias, rtol=0, atol=1e-12
    )


def test_an_unknown_layout_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown layout 'NCHW'; use one of \['flat', 'nchw'"):
        FeaturePool("NCHW")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown layout 'hwc'"):
        FusedLinearHeads(4, {"a": 1}, layout="hwc")  # type: ignore[arg-type]
