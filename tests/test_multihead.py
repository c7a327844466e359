"""MultiHeadNet: heads, branches, depths and the torchvision builder."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from dstmtl import MultiHeadNet


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
