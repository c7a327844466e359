"""Longest path of weight layers through a module, read off its torch.fx graph."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import fx, nn

_WEIGHT_MODULES = (nn.modules.conv._ConvNd, nn.Linear)
_WEIGHT_FUNCTIONS = {F.linear, F.conv1d, F.conv2d, F.conv3d}


def weight_layer_depths(module: nn.Module) -> dict[str, int] | int:
    """Return, for the module's output, the most conv/linear layers on one input-output path.

    A module returning a dict (a torchvision feature extractor) gets one depth per key.
    Raises ``TypeError`` when the module cannot be traced by :mod:`torch.fx`.
    """
    graph_module = module if isinstance(module, fx.GraphModule) else _trace(module)
    depth: dict[fx.Node, int] = {}
    result: Any = None
    for node in graph_module.graph.nodes:
        if node.op == "output":
            result = node.args[0]
            break
        own = 1 if _is_weight_layer(graph_module, node) else 0
        depth[node] = own + max((depth[i] for i in node.all_input_nodes), default=0)
    if isinstance(result, dict):
        return {str(key): depth[value] for key, value in result.items()}
    if isinstance(result, fx.Node):
        return depth[result]
    raise TypeError(f"cannot read a depth off {type(module).__name__}: it returns {result!r}")


def _trace(module: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(module)
    except Exception as error:
        raise TypeError(
            f"cannot trace {type(module).__name__} with torch.fx to count its layers ({error}); "
            "pass the depths explicitly, e.g. NetworkDepth({'task': 18, ...})"
        ) from error


def _is_weight_layer(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(graph_module.get_submodule(str(node.target)), _WEIGHT_MODULES)
    return node.op == "call_function" and node.target in _WEIGHT_FUNCTIONS
