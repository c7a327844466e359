"""MultiHeadNet: heads, branches, depths and the torchvision builder."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from dstmtl import FusedLinearHead, FusedLinearHeads, MultiHeadNet, Task


def test_outputs_follow_the_order_of_the_heads() -> None:
    heads = {"z": nn.Linear(6, 2), "a": nn.Linear(6, 1), "m": nn.Linear(6, 3)}
    net = MultiHeadNet(nn.Linear(4, 6), heads)
    outputs = net(torch.randn(5, 4))
    assert list(outputs) == ["z", "a", "m"]
    assert [tuple(out.shape) for out in outputs.values()] == [(5, 2), (5, 1), (5, 3)]
    assert net.task_names == ("z", "a", "m")


def test_resnet18_depth_is_18() -> None:
    net = MultiHeadNet.from_torchvision("resnet18", {"male": 1, "age": 5})
    assert net.depths() == {"male": 18, "age": 18}
    assert isinstance(net.backbone.fc, nn.Identity)
    assert net.heads["age"].in_features == 512  # read from the replaced classifier


@pytest.mark.parametrize(("name", "features"), [("resnet50", 2048), ("mobilenet_v3_small", 1024)])
def test_feature_size_is_read_from_the_model(name: str, features: int) -> None:
    net = MultiHeadNet.from_torchvision(name, ["a"])
    assert net.heads["a"].in_features == features
    assert net(torch.randn(2, 3, 64, 64))["a"].shape == (2, 1)


def test_heads_can_branch_from_an_intermediate_layer() -> None:
    net = MultiHeadNet.from_torchvision(
        "resnet18", {"top": 1, "mid": 3}, branches={"mid": "layer3"}
    )
    outputs = net(torch.randn(2, 3, 64, 64))
    assert outputs["top"].shape == (2, 1)
    assert outputs["mid"].shape == (2, 3)
    # conv1 + 3 stages of 2 blocks of 2 convolutions + the head's linear layer
    assert net.depths() == {"top": 18, "mid": 14}
    # The layer3 head reads what layer3 of the plain model computes.
    plain = torchvision.models.resnet18().eval()
    plain.load_state_dict(
        {k.removeprefix("backbone."): v for k, v in net.state_dict().items() if "heads" not in k},
        strict=False,
    )
    net.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        stem = plain.maxpool(plain.relu(plain.bn1(plain.conv1(x))))
        layer3 = plain.layer3(plain.layer2(plain.layer1(stem)))
        expected = net.heads["mid"](layer3)
        assert torch.allclose(net(x)["mid"], expected, atol=1e-5)


def test_weights_load_from_torchvisions_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    reference = torchvision.models.resnet18()
    checkpoint = tmp_path / "hub" / "checkpoints" / Path(weights.url).name
    checkpoint.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), checkpoint)
    net = MultiHeadNet.from_torchvision("resnet18", ["a"], weights="IMAGENET1K_V1")
    conv1 = net.backbone.get_submodule("conv1")
    assert isinstance(conv1, nn.Conv2d)
    assert torch.equal(conv1.weight, reference.conv1.weight)


def test_missing_weights_say_where_torchvision_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(RuntimeError, match=f"{expected}.*weights=None"):
        MultiHeadNet.from_torchvision("resnet18", ["a"], weights="DEFAULT")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="task list is empty"):
        MultiHeadNet(nn.Identity(), {})
    with pytest.raises(ValueError, match="cannot name a submodule"):
        MultiHeadNet(nn.Identity(), {"a.b": nn.Identity()})
    with pytest.raises(ValueError, match=r"branches name unknown tasks \['x'\]"):
        MultiHeadNet(torchvision.models.resnet18(), {"a": nn.Identity()}, branches={"x": "layer3"})
    with pytest.raises(ValueError, match=r"nodes \['layer9'\] that ResNet does not have"):
        MultiHeadNet(torchvision.models.resnet18(), {"a": nn.Identity()}, branches={"a": "layer9"})
    with pytest.raises(ValueError, match="torchvision has no model 'resnet19'"):
        MultiHeadNet.from_torchvision("resnet19", ["a"])
    with pytest.raises(ValueError, match=r"no weights 'IMAGENET'; use one of \['DEFAULT', 'IMAG"):
        MultiHeadNet.from_torchvision("resnet18", ["a"], weights="IMAGENET")
    other_model = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    with pytest.raises(ValueError, match=r"no weights ResNet50_Weights\.IMAGENET1K_V2"):
        MultiHeadNet.from_torchvision("resnet18", ["a"], weights=other_model)
    with pytest.raises(ValueError, match=r"'squeezenet1_0' has no nn\.Linear classifier"):
        MultiHeadNet.from_torchvision("squeezenet1_0", ["a"])


def test_from_torchvision_refuses_a_bare_string_of_tasks() -> None:
    with pytest.raises(TypeError, match="got the string 'male'"):
        MultiHeadNet.from_torchvision("resnet18", "male")


def test_from_torchvision_refuses_repeated_task_names() -> None:
    with pytest.raises(ValueError, match=r"duplicate task names \['a'\]"):
        MultiHeadNet.from_torchvision("resnet18", ["a", "a"])


@pytest.mark.parametrize(
    ("width", "error", "message"),
    [
        ("binary", TypeError, r"task 'a' has 'binary' outputs; .* as an int, e\.g\. \{'a': 1\}"),
        (True, TypeError, r"task 'a' has True outputs; .* as an int"),
        (2.0, TypeError, r"task 'a' has 2\.0 outputs; .* as an int"),
        (0, ValueError, r"task 'a' has 0 outputs; .* positive number of outputs"),
        (torch.tensor(2.0), TypeError, r"task 'a' has tensor\(2\.\) outputs; .* as an int"),
    ],
)
def test_from_torchvision_needs_a_positive_int_per_task(
    width: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        MultiHeadNet.from_torchvision("resnet18", {"a": width})  # type: ignore[dict-item]


def test_googlenet_heads_read_one_tensor_in_training_mode() -> None:
    net = MultiHeadNet.from_torchvision("googlenet", ["a", "b"], init_weights=False)
    assert net.training
    outputs = net(torch.randn(2, 3, 64, 64))
    assert {name: tuple(out.shape) for name, out in outputs.items()} == {"a": (2, 1), "b": (2, 1)}
    assert net.backbone.aux1 is None


def test_pretrained_inception_v3_heads_read_one_tensor_in_training_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The weights file holds the auxiliary classifier, so torchvision refuses
    # aux_logits=False with weights; a reference model stands in for the download.
    reference = torchvision.models.inception_v3(aux_logits=True, init_weights=False)

    def cached(*args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = reference.state_dict()
        return state

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", cached)
    net = MultiHeadNet.from_torchvision("inception_v3", ["a"], weights="DEFAULT")
    assert net.backbone.AuxLogits is None
    assert net(torch.randn(2, 3, 75, 75))["a"].shape == (2, 1)
    conv = net.backbone.get_submodule("Conv2d_1a_3x3.conv")
    assert isinstance(conv, nn.Conv2d)
    assert torch.equal(conv.weight, reference.Conv2d_1a_3x3.conv.weight)


def test_a_backbone_returning_a_tuple_is_named() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    net = MultiHeadNet(Pair(), {"a": nn.Linear(2, 1)})
    with pytest.raises(TypeError, match=r"return a Tensor \(or, with branches, a dict by node\)"):
        net(torch.randn(3, 2))
    with pytest.raises(TypeError, match="; got tuple"):
        net(torch.randn(3, 2))


def test_from_torchvision_takes_integer_counts_of_any_integer_type() -> None:
    labels = torch.tensor([0, 2, 1])
    net = MultiHeadNet.from_torchvision("resnet18", {"hair": labels.max() + 1, "n": np.int64(2)})
    assert {name: head.out_features for name, head in net.heads.items()} == {"hair": 3, "n": 2}


def test_heads_must_be_a_mapping() -> None:
    with pytest.raises(TypeError, match=r"heads must be a mapping .*, got list; .*dict\(zip"):
        MultiHeadNet(nn.Identity(), [nn.Linear(2, 1), nn.Linear(2, 1)])  # type: ignore[arg-type]
    # Another net's heads (an nn.ModuleDict, not a collections.abc.Mapping) are a mapping.
    first = MultiHeadNet(nn.Identity(), {"a": nn.Linear(2, 1), "b": nn.Linear(2, 3)})
    second = MultiHeadNet(nn.Linear(2, 2), first.heads)
    assert {name: tuple(out.shape) for name, out in second(torch.zeros(4, 2)).items()} == {
        "a": (4, 1),
        "b": (4, 3),
    }


@pytest.mark.filterwarnings("ignore:NOTE. The nodes obtained by tracing:UserWarning")
def test_a_node_missing_in_one_mode_keeps_torchvisions_message() -> None:
    class TrainOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.extra(x) if self.training else x

    with pytest.raises(ValueError, match=r"node: 'extra' is not present in model"):
        MultiHeadNet(TrainOnly(), {"a": nn.Linear(2, 1)}, branches={"a": "extra"})


def test_branches_over_an_untraceable_backbone_name_the_way_out() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.inner(x)
            return x if x.sum() > 0 else -x

    with pytest.raises(TypeError, match=r"branches need a backbone that torch\.fx can trace"):
        MultiHeadNet(DataDependent(), {"a": nn.Linear(2, 1)}, branches={"a": "inner"})


def _pool_by_hand(feature: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "nchw":
        return feature.flatten(2).mean(2)
    if layout == "nhwc":
        return feature.flatten(1, 2).mean(1)
    if layout == "tokens_cls":
        return feature[:, 0, :]
    return feature.mean(1)


@pytest.mark.parametrize(
    ("name", "node", "layout", "channels", "sizes"),
    [
        ("resnet18", "layer3", None, 256, (64, 96)),  # NCHW, inferred
        ("convnext_tiny", "features.1.0.block.2", None, 96, (64, 96)),  # NHWC, inferred
        ("swin_t", "features.5", None, 384, (224, 256)),  # NHWC, inferred
        ("swin_t", "features.5", "nhwc", 384, (224,)),  # NHWC, given
        ("vit_b_16", "encoder.layers.encoder_layer_6", "tokens_cls", 768, (224,)),
        ("vit_b_16", "encoder.layers.encoder_layer_6", "tokens_mean", 768, (224,)),
    ],
)
def test_branch_heads_read_every_layout(
    name: str, node: str, layout: str | None, channels: int, sizes: tuple[int, ...]
) -> None:
    layouts = None if layout is None else {"mid": layout}
    net = MultiHeadNet.from_torchvision(
        name,
        {"top": 1, "mid": 3},
        branches={"mid": node},
        layouts=layouts,  # type: ignore[arg-type]
    )
    head = net.heads["mid"]
    assert isinstance(head, FusedLinearHead)
    assert (head.in_features, head.out_features) == (channels, 3)
    expected_layout = layout or ("nchw" if name == "resnet18" else "nhwc")
    assert head.fused.layout == expected_layout
    net.eval()
    for size in sizes:
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            features = net.forward_features(x)
            outputs = net.forward_heads(features)
        assert isinstance(features, dict)
        assert {task: tuple(out.shape) for task, out in outputs.items()} == {
            "top": (1, 1),
            "mid": (1, 3),
        }
        by_hand = _pool_by_hand(features[node], expected_layout) @ head.weight.T + head.bias
        torch.testing.assert_close(outputs["mid"], by_hand)


@pytest.mark.parametrize(
    ("name", "node", "layouts", "message"),
    [
        # Swin's [B, H, W, C] read as NCHW would size the head from H.
        (
            "swin_t",
            "features.5",
            {"mid": "nchw"},
            r"task 'mid' reads node 'features\.5', of shape \(1, 14, 14, 384\) at 224 px and "
            r"\(1, 10, 10, 384\) at 160 px: dim 1 changes with the input size, so it is not "
            r"the channel dim of layout 'nchw'; give the layout of the feature, "
            r"layouts=\{'mid': \.\.\.\}",
        ),
        (
            "resnet18",
            "layer3",
            {"mid": "nhwc"},
            r"\(1, 256, 14, 14\) at 224 px and \(1, 256, 10, 10\) at 160 px: dim 3 changes",
        ),
        (
            "resnet18",
            "layer3",
            {"mid": "tokens_cls"},
            r"of shape \(1, 256, 14, 14\) at 224 px; layout 'tokens_cls' reads 3-D features, "
            r"not 4-D; give the layout",
        ),
        # Tokens: the class token or the mean is the user's choice.
        (
            "vit_b_16",
            "encoder.layers.encoder_layer_6",
            None,
            r"of shape \(1, 197, 768\) at 224 px \(and the backbone fails at 160 px: "
            r"AssertionError: .*\): its shape does not tell its layout "
            r"\(\['tokens_cls', 'tokens_mean'\] fit\); give the layout .* or a head_factory",
        ),
        # 1x1 maps: both NCHW and NHWC fit.
        (
            "resnet18",
            "avgpool",
            None,
            r"\(1, 512, 1, 1\) at 224 px and \(1, 512, 1, 1\) at 160 px: its shape does not "
            r"tell its layout \(\['nchw', 'nhwc'\] fit\)",
        ),
    ],
)
def test_a_wrong_or_unknown_layout_fails_at_construction(
    name: str, node: str, layouts: dict[str, str] | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        MultiHeadNet.from_torchvision(
            name,
            {"top": 1, "mid": 3},
            branches={"mid": node},
            layouts=layouts,  # type: ignore[arg-type]
        )


def test_a_given_layout_resolves_an_ambiguous_shape() -> None:
    net = MultiHeadNet.from_torchvision(
        "resnet18", ["top", "mid"], branches={"mid": "avgpool"}, layouts={"mid": "nchw"}
    )
    outputs = net(torch.randn(2, 3, 64, 64))
    assert outputs["mid"].shape == (2, 1)


def test_layouts_name_branched_tasks_and_known_layouts() -> None:
    with pytest.raises(ValueError, match=r"layouts name tasks \['top'\] that have no branch"):
        MultiHeadNet.from_torchvision("resnet18", ["top"], layouts={"top": "nchw"})
    with pytest.raises(ValueError, match=r"unknown layout 'chw'; use one of \['flat', 'nchw'"):
        MultiHeadNet.from_torchvision(
            "resnet18",
            ["top", "mid"],
            branches={"mid": "layer3"},
            layouts={"mid": "chw"},  # type: ignore[dict-item]
        )


def test_branches_name_known_tasks_before_any_dry_run() -> None:
    with pytest.raises(ValueError, match=r"branches name unknown tasks \['x'\]; tasks: \['a'\]"):
        MultiHeadNet.from_torchvision("resnet18", ["a"], branches={"x": "layer3"})


def test_the_dry_runs_leave_every_module_in_training_mode() -> None:
    net = MultiHeadNet.from_torchvision("resnet18", ["a", "b"], branches={"b": "layer2"})
    assert all(module.training for module in net.modules())


def test_head_factory_builds_the_heads_it_wants() -> None:
    shapes: dict[str, tuple[int, ...]] = {}

    def factory(task: str, feature_shape: torch.Size) -> nn.Module | None:
        shapes[task] = tuple(feature_shape)
        if task == "dense":  # a per-pixel map from layer3's features
            return nn.Conv2d(feature_shape[1], 2, kernel_size=1)
        return None

    net = MultiHeadNet.from_torchvision(
        "resnet18",
        {"dense": 2, "top": 1, "mid": 3},
        branches={"dense": "layer3", "mid": "layer3"},
        head_factory=factory,
    )
    assert shapes == {"dense": (1, 256, 14, 14), "top": (1, 512), "mid": (1, 256, 14, 14)}
    assert isinstance(net.heads["dense"], nn.Conv2d)
    assert isinstance(net.heads["mid"], FusedLinearHead)
    assert list(net.heads) == ["dense", "top", "mid"]
    x = torch.randn(2, 3, 64, 64)
    features = net.forward_features(x)
    assert isinstance(features, dict)
    outputs = net.forward_heads(features)
    assert outputs["dense"].shape == (2, 2, 4, 4)
    assert torch.equal(outputs["dense"], net.heads["dense"](features["layer3"]))
    assert net.depths()["dense"] == 14


def _linear_of(head: nn.Module) -> nn.Linear:
    """The nn.Linear of a head built with fuse_heads=False (alone, or after a FeaturePool)."""
    linear = head if isinstance(head, nn.Linear) else head.get_submodule("1")
    assert isinstance(linear, nn.Linear)
    return linear


def test_fused_and_separate_heads_compute_the_same_function() -> None:
    tasks = {"top": 1, "mid": 3, "low": 2}
    branches = {"mid": "layer3", "low": "layer3"}
    fused = MultiHeadNet.from_torchvision("resnet18", tasks, branches=branches)
    separate = MultiHeadNet.from_torchvision("resnet18", tasks, branches=branches, fuse_heads=False)
    assert isinstance(separate.heads["top"], nn.Linear)
    assert isinstance(separate.heads["mid"], nn.Sequential)
    assert len(separate.fused_heads) == 0
    assert len(fused.fused_heads) == 2
    # One fused module per node: the output's and layer3's.
    assert fused.fused_heads[1].task_names == ("mid", "low")
    assert fused.depths() == separate.depths() == {"top": 18, "mid": 14, "low": 14}
    separate.backbone.load_state_dict(fused.backbone.state_dict())
    with torch.no_grad():
        for task in tasks:
            handle = fused.heads[task]
            assert isinstance(handle, FusedLinearHead)
            linear = _linear_of(separate.heads[task])
            linear.weight.copy_(handle.weight)
            linear.bias.copy_(handle.bias)
    x = torch.randn(2, 3, 64, 64)
    expected = separate(x)
    outputs = fused(x)
    for task in tasks:
        torch.testing.assert_close(outputs[task], expected[task])
    sum(out.sum() for out in outputs.values()).backward()
    sum(out.sum() for out in expected.values()).backward()
    conv = fused.backbone.get_submodule("conv1")
    assert isinstance(conv, nn.Conv2d)
    assert conv.weight.grad is not None
    torch.testing.assert_close(
        conv.weight.grad, separate.backbone.get_submodule("conv1").weight.grad
    )
    for task in tasks:
        handle = fused.heads[task]
        assert isinstance(handle, FusedLinearHead)
        assert handle.fused.weight.grad is not None
        linear = _linear_of(separate.heads[task])
        torch.testing.assert_close(handle.fused.weight.grad[handle.rows], linear.weight.grad)


def test_state_dict_round_trip() -> None:
    tasks = {"top": 1, "mid": 3}
    net = MultiHeadNet.from_torchvision("resnet18", tasks, branches={"mid": "layer3"})
    state = net.state_dict()
    assert [key for key in state if not key.startswith("backbone.")] == [
        "fused_heads.0.weight",
        "fused_heads.0.bias",
        "fused_heads.1.weight",
        "fused_heads.1.bias",
    ]
    fresh = MultiHeadNet.from_torchvision("resnet18", tasks, branches={"mid": "layer3"})
    fresh.load_state_dict(state)  # strict
    net.eval()
    fresh.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(fresh(x)[t], net(x)[t]) for t in tasks)


def test_from_torchvision_takes_task_descriptions() -> None:
    tasks = {"smiling": Task("binary"), "hair": Task("multiclass", outputs=4)}
    net = MultiHeadNet.from_torchvision("resnet18", tasks)
    outputs = net(torch.randn(2, 3, 32, 32))
    assert {name: tuple(out.shape) for name, out in outputs.items()} == {
        "smiling": (2, 1),
        "hair": (2, 4),
    }


class _TokenBackbone(nn.Module):
    """Token ids -> mean of the encoder's outputs over the tokens that are not padding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        layer = nn.TransformerEncoderLayer(
            16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    def forward(self, tokens: torch.Tensor, src_key_padding_mask: torch.Tensor) -> torch.Tensor:
        encoded = self.encoder(self.embed(tokens), src_key_padding_mask=src_key_padding_mask)
        keep = (~src_key_padding_mask).unsqueeze(-1).float()
        out: torch.Tensor = (encoded * keep).sum(1) / keep.sum(1)
        return out


def test_forward_passes_extra_arguments_to_the_backbone() -> None:
    torch.manual_seed(0)
    net = MultiHeadNet(_TokenBackbone(), {"a": nn.Linear(16, 1), "b": nn.Linear(16, 2)})
    tokens = torch.randint(0, 20, (3, 6))
    padded = torch.zeros(3, 6, dtype=torch.bool)
    padded[0, 4:] = True
    no_padding = torch.zeros_like(padded)
    with_mask = net(tokens, padded)
    expected = net.heads["b"](net.backbone(tokens, padded))
    assert torch.equal(with_mask["b"], expected)
    assert torch.equal(net(tokens, src_key_padding_mask=padded)["b"], expected)
    features = net.forward_features(tokens, src_key_padding_mask=padded)
    assert isinstance(features, torch.Tensor)
    assert torch.equal(features, net.backbone(tokens, padded))
    # The mask reaches the encoder: the padded sequence's output changes, the others do not.
    without = net(tokens, no_padding)
    assert not torch.allclose(with_mask["a"][0], without["a"][0])
    torch.testing.assert_close(with_mask["a"][1:], without["a"][1:])


def test_tasks_runs_only_the_heads_asked_for() -> None:
    calls: list[str] = []
    heads: dict[str, nn.Module] = {"a": nn.Linear(4, 1), "b": nn.Linear(4, 2), "c": nn.Linear(4, 3)}
    for name, head in heads.items():
        head.register_forward_hook(lambda module, args, out, name=name: calls.append(name))
    net = MultiHeadNet(nn.Identity(), heads)
    x = torch.randn(5, 4)
    outputs = net(x, tasks=("c", "a"))
    assert list(outputs) == ["a", "c"]  # in the order of the heads
    assert calls == ["a", "c"]
    assert torch.equal(outputs["c"], heads["c"](x))
    outputs["a"].sum().backward()
    assert heads["b"].weight.grad is None
    assert net.forward_heads(net.forward_features(x), tasks=["b"]).keys() == {"b"}


def test_tasks_picks_fused_outputs() -> None:
    net = MultiHeadNet(nn.Identity(), FusedLinearHeads(4, {"a": 1, "b": 2, "c": 3}).heads())
    x = torch.randn(5, 4)
    everything = net(x)
    some = net(x, tasks=["b"])
    assert list(some) == ["b"]
    assert torch.equal(some["b"], everything["b"])


def test_tasks_must_name_known_tasks() -> None:
    net = MultiHeadNet(nn.Identity(), {"a": nn.Linear(4, 1), "b": nn.Linear(4, 2)})
    with pytest.raises(
        ValueError, match=r"tasks= names unknown tasks \['x', 'y'\]; tasks: \['a', 'b'\]"
    ):
        net(torch.randn(2, 4), tasks=["a", "y", "x"])
    with pytest.raises(TypeError, match=r"got the string 'a'; e\.g\. tasks=\['a'\]"):
        net(torch.randn(2, 4), tasks="a")


def test_a_backbone_refusing_the_second_size_stays_quiet(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # MaxViT's window partition fails at 160 px (inside torch.fx's generated code, which
    # prints that code to stderr); with the layout given, the net builds without a word.
    net = MultiHeadNet.from_torchvision(
        "maxvit_t", ["top", "mid"], branches={"mid": "blocks.1"}, layouts={"mid": "nchw"}
    )
    assert net.heads["mid"].in_features == 128
    assert capsys.readouterr().err == ""
