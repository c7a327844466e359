"""Network depth: weight layers on the longest path, against counts made by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dstmtl import Layout, MultiHeadNet
from dstmtl.metrics import NetworkDepth

# name, input size, depth with one linear head on the output, a node, depth with one linear
# head on that node. The breakdowns are in docs/algorithm.md (NetworkDepth).
TORCHVISION = [
    # conv1 + 4 stages x 2 blocks x 2 convs + head; layer3: conv1 + 3 x 4 + head
    ("resnet18", 32, 18, "layer3", 14),
    # stem + 4 (dw, SE 2, project) + 15 x 5 (expand, dw, SE 2, project) + 1x1 conv + head;
    # features.4 ends block 8: stem + 4 + 7 x 5 + head
    ("efficientnet_b0", 32, 82, "features.4", 41),
    # stem + 4 + 3 + 3 + 8 x 5 + 1x1 conv + classifier's first linear + head;
    # features.4: stem + 4 + 3 + 3 + 5 + head
    ("mobilenet_v3_small", 32, 54, "features.4", 17),
    # stem + 16 blocks x 5 (1x1, 3x3, SE 2, 1x1) + head; block2: stem + 4 blocks x 5 + head
    ("regnet_y_400mf", 32, 82, "trunk_output.block2", 22),
    # stem + 18 blocks x 3 (dw conv, 2 linears) + 3 downsampling convs + head;
    # features.3: stem + 3 x 3 + downsampling + 3 x 3 + head
    ("convnext_tiny", 32, 59, "features.3", 21),
    # stem + 58 dense layers x 2 convs + 3 transition convs + head;
    # denseblock2: stem + 6 x 2 + transition + 12 x 2 + head
    ("densenet121", 32, 121, "features.denseblock2", 39),
    # patch conv + 12 blocks x 4 (qkv, proj, fc1, fc2) + 3 patch-merging linears + head;
    # features.3: patch conv + 2 x 4 + merging + 2 x 4 + head
    ("swin_t", 64, 53, "features.3", 19),
    # patch conv + 12 blocks x 4 + head; encoder_layer_5: patch conv + 6 x 4 + head
    ("vit_b_16", 224, 50, "encoder.layers.encoder_layer_5", 26),
]


@pytest.mark.parametrize(("name", "size", "depth", "node", "node_depth"), TORCHVISION)
def test_torchvision_depths_with_and_without_a_branch(
    name: str, size: int, depth: int, node: str, node_depth: int
) -> None:
    x = torch.zeros(1, 3, size, size)
    net = MultiHeadNet.from_torchvision(name, ["top"])
    assert net.depths(x) == {"top": depth}
    # The same model with a default (pooled linear) head on the node; a ViT's tokens need
    # their layout, the others are read off the feature's shape.
    layouts: dict[str, Layout] | None = {"mid": "tokens_cls"} if name.startswith("vit") else None
    branched = MultiHeadNet.from_torchvision(
        name, {"top": 1, "mid": 3}, branches={"mid": node}, layouts=layouts
    )
    outputs = branched.eval()(x)
    assert {task: tuple(out.shape) for task, out in outputs.items()} == {
        "top": (1, 1),
        "mid": (1, 3),
    }
    assert branched.depths(x) == {"top": depth, "mid": node_depth}


class _Text(nn.Module):
    """Token ids to a mean over an nn.TransformerEncoder of three layers."""

    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.position = nn.Parameter(torch.randn(1, 8, 16))
        layer = nn.TransformerEncoderLayer(
            16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)

    def forward(self, tokens: Tensor) -> Tensor:
        out: Tensor = self.encoder(self.embed(tokens) + self.position).mean(1)
        return out


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_counts_both_attention_projections(norm_first: bool) -> None:
    net = MultiHeadNet(_Text(norm_first), {"a": nn.Linear(16, 1)})
    # embedding + 3 layers x (input projection, output projection, linear1, linear2) + head
    assert net.depths(torch.randint(0, 50, (2, 8))) == {"a": 14}


class _Attention(nn.Module):
    def __init__(self, cross: bool, need_weights: bool) -> None:
        super().__init__()
        self.cross = cross
        self.need_weights = need_weights
        size = 6 if cross else 16
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True, kdim=size, vdim=size)

    def forward(self, x: Tensor) -> Tensor:
        context = x[..., :6] if self.cross else x
        out, _ = self.attention(x, context, context, need_weights=self.need_weights)
        pooled: Tensor = out.mean(1)
        return pooled


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_is_two_layers(cross: bool, need_weights: bool) -> None:
    # q, k and v projections run side by side (one packed matrix, or three with kdim/vdim),
    # then the output projection; the products of q, k and v are between activations.
    net = MultiHeadNet(_Attention(cross, need_weights), {"a": nn.Linear(16, 1)})
    assert net.depths(torch.randn(2, 5, 16)) == {"a": 3}


def test_elementwise_parameters_and_activation_products_are_no_layers() -> None:
    class Block(nn.Module):
        fixed: Tensor

        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.scale = nn.Parameter(torch.ones(4))
            self.shift = nn.Parameter(torch.zeros(4))
            self.norm = nn.LayerNorm(4)
            self.register_buffer("fixed", torch.eye(4))

        def forward(self, x: Tensor) -> Tensor:
            y: Tensor = self.norm(self.linear(x)) * self.scale + self.shift
            y = y @ self.fixed  # a constant, not learned, matrix
            return y @ y.transpose(-1, -2) @ self.linear.weight.t()[:, :4]

    net = MultiHeadNet(Block(), {"a": nn.Flatten()})
    # linear, then the product with a transposed slice of its weight
    assert net.depths(torch.randn(2, 4, 4)) == {"a": 2}


def test_data_dependent_control_flow_counts_the_path_taken() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.short = nn.Linear(2, 2)
            self.long = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))

        def forward(self, x: Tensor) -> Tensor:
            out: Tensor = self.short(x) if x.sum() > 0 else self.long(x)
            return out

    backbone = DataDependent()
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(backbone)
    net = MultiHeadNet(backbone, {"a": nn.Linear(2, 1)})
    assert net.depths(torch.ones(1, 2)) == {"a": 2}
    assert net.depths(-torch.ones(1, 2)) == {"a": 3}


def test_a_frozen_feature_extractor_is_counted() -> None:
    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))

        def forward(self, x: Tensor) -> Tensor:
            with torch.no_grad():
                features: Tensor = self.features(x)
            return features.detach().flatten(1)

    net = MultiHeadNet(Frozen(), {"a": nn.Linear(4, 1)})
    assert net.depths(torch.zeros(1, 3, 5, 5)) == {"a": 3}


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad:UserWarning")
def test_checkpointed_layers_are_counted() -> None:
    # Reentrant checkpointing runs the layers without grad: autograd would not see them.
    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))

        def forward(self, x: Tensor) -> Tensor:
            out: Tensor = checkpoint(self.layers, x, use_reentrant=True)
            return out

    net = MultiHeadNet(Checkpointed(), {"a": nn.Linear(4, 1)})
    assert net.depths(torch.zeros(1, 4)) == {"a": 3}


def test_writes_into_a_preallocated_tensor_and_computed_weights_are_followed() -> None:
    class Preallocated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.short = nn.Linear(4, 2)
            self.long = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))

        def forward(self, x: Tensor) -> Tensor:
            out = x.new_zeros(len(x), 4)
            out[:, :2] = self.short(x)  # written through views of out
            out[:, 2:] = self.long(x)
            return out

    net = MultiHeadNet(Preallocated(), {"a": nn.Linear(4, 1)})
    assert net.depths(torch.zeros(1, 4)) == {"a": 3}
    # The weight is computed from two parameters, g * v / |v|; still one layer.
    normed = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
    net = MultiHeadNet(normed, {"a": nn.Linear(4, 1)})
    assert net.depths(torch.zeros(1, 4)) == {"a": 2}


def test_an_output_without_a_weight_layer_is_refused() -> None:
    net = MultiHeadNet(nn.Flatten(), {"a": nn.Identity(), "b": nn.Linear(4, 1)})
    with pytest.raises(TypeError, match=r"task 'a': no weight layer.*NetworkDepth\(\{'task'"):
        net.depths(torch.zeros(1, 4))


def test_an_output_not_computed_from_the_input_is_refused() -> None:
    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.value = nn.Parameter(torch.zeros(1))

        def forward(self, x: Tensor) -> Tensor:
            return self.value.expand(len(x), 1)

    net = MultiHeadNet(nn.Linear(4, 4), {"a": Constant()})
    with pytest.raises(TypeError, match=r"task 'a'.*not computed from the example input"):
        net.depths(torch.zeros(1, 4))


def test_a_fused_kernel_that_hides_its_weights_is_refused() -> None:
    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: Tensor) -> Tensor:
            a = self.attention
            out, _ = torch._native_multi_head_attention(
                x, x, x, 8, 2, a.in_proj_weight, a.in_proj_bias,
                a.out_proj.weight, a.out_proj.bias, need_weights=False,
            )  # fmt: skip
            return out.mean(1)

    net = MultiHeadNet(Fused(), {"a": nn.Linear(8, 1)})
    with pytest.raises(TypeError, match=r"_native_multi_head_attention.*NetworkDepth\(\{"):
        net.depths(torch.zeros(1, 3, 8))


@pytest.mark.filterwarnings("ignore:.*quantiz:DeprecationWarning", "ignore:.*quantiz:UserWarning")
def test_packed_weights_are_refused() -> None:
    # Quantized layers hold their weights packed in a ScriptObject, not in parameters.
    backbone = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(4, 4)), {nn.Linear})
    net = MultiHeadNet(backbone, {"a": nn.Linear(4, 1)})
    with pytest.raises(TypeError, match=r"packed weights.*NetworkDepth\(\{"):
        net.depths(torch.zeros(1, 4))


def test_depths_need_an_example_input() -> None:
    net = MultiHeadNet(nn.Linear(4, 4), {"a": nn.Linear(4, 1)})
    expected = r"needs an example input.*net\.depths\(torch\.zeros\(1, 3, 224, 224\)\)"
    with pytest.raises(TypeError, match=expected):
        net.depths()
    with pytest.raises(TypeError, match=expected):
        NetworkDepth(net)
    assert NetworkDepth(net.depths(torch.zeros(1, 4)))._depths == {"a": 2}


def test_the_example_input_is_no_state_and_the_probe_changes_nothing() -> None:
    net = MultiHeadNet.from_torchvision("resnet18", ["a"])
    assert net.example_input is not None
    assert tuple(net.example_input.shape) == (1, 3, 224, 224)
    assert not any("example" in key for key in net.state_dict())
    layer1, layer2 = net.backbone.get_submodule("layer1"), net.backbone.get_submodule("layer2")
    net.train()
    layer1.eval()
    before = {key: value.clone() for key, value in net.state_dict().items()}
    assert net.depths() == {"a": 18}
    assert net.training
    assert not layer1.training
    assert layer2.training
    assert net.backbone.get_submodule("bn1").training
    assert not layer1.get_submodule("0.bn1").training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BN stats too


def test_the_example_input_follows_the_net_to_its_device_and_dtype() -> None:
    net = MultiHeadNet(nn.Linear(4, 4), {"a": nn.Linear(4, 1)}, example_input=torch.zeros(1, 4))
    net.to("meta", torch.float64)
    assert net.depths() == {"a": 2}
    assert net.example_input is not None
    assert net.example_input.device.type == "cpu"


def _compiled(module: nn.Module) -> nn.Module:
    compiled: nn.Module = torch.compile(module)  # type: ignore[assignment]
    return compiled


def test_network_depth_unwraps_compiled_and_parallel_nets(tmp_path: Path) -> None:
    example = torch.zeros(1, 4)
    net = MultiHeadNet(nn.Linear(4, 4), {"a": nn.Linear(4, 1)}, example_input=example)
    assert NetworkDepth(_compiled(net))._depths == {"a": 2}
    assert NetworkDepth(nn.DataParallel(net))._depths == {"a": 2}
    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(net)
        assert NetworkDepth(_compiled(ddp))._depths == {"a": 2}
    finally:
        dist.destroy_process_group()
    with pytest.raises(TypeError, match=r"got Linear; pass the depths explicitly"):
        NetworkDepth(_compiled(nn.Linear(4, 1)))


def test_heads_written_into_slices_of_one_buffer_are_refused() -> None:
    class Slots(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.deep = nn.Sequential(*(nn.Linear(4, 4) for _ in range(5)))
            self.shallow = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            out = torch.zeros(x.shape[0], 8)
            out[:, :4] = self.deep(x)
            out[:, 4:] = self.shallow(x)  # 1 layer deep beside 5: one record cannot say so
            return out

    class Columns(nn.Module):
        def __init__(self, start: int, stop: int) -> None:
            super().__init__()
            self.start, self.stop = start, stop

        def forward(self, x: Tensor) -> Tensor:
            return x[:, self.start : self.stop]

    x = torch.randn(2, 4)
    read_whole = MultiHeadNet(Slots(), {"a": nn.Linear(8, 1)})
    assert read_whole.depths(x) == {"a": 6}  # the deepest part, which the head reads
    slices = {"deep": Columns(0, 4), "shallow": Columns(4, 8)}
    with pytest.raises(TypeError, match="the output of task 'deep' is part of a tensor"):
        MultiHeadNet(Slots(), slices).depths(x)
    heads = {t: nn.Sequential(columns, nn.Linear(4, 1)) for t, columns in slices.items()}
    with pytest.raises(TypeError, match=r"aten\.\w+\.\w+ reads part of a tensor"):
        MultiHeadNet(Slots(), heads).depths(x)
