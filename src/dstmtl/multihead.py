from __future__ import annotations

import operator
import os
from collections.abc import Mapping, Sequence
from typing import Any, SupportsIndex

import torch
from torch import Tensor, nn

from dstmtl._depth import weight_layer_depths
from dstmtl._validation import check_mapping, check_task_names

Weights = str | Any | None  # a torchvision WeightsEnum member, its name, or None

# These models also return auxiliary logits (a namedtuple) in training mode, which no head
# can read; the attributes are the auxiliary classifiers that torchvision's builders set to
# None when they turn them off.
_AUX_CLASSIFIERS = {
    "googlenet": ("aux1", "aux2"),
    "quantized_googlenet": ("aux1", "aux2"),
    "inception_v3": ("AuxLogits",),
    "quantized_inception_v3": ("AuxLogits",),
}


class MultiHeadNet(nn.Module):
    """A shared backbone with one head per task.

    ``forward(x)`` returns a dict from task name to that task's output, in the order of
    ``heads``. By default every head reads the backbone's output; ``branches`` lets a head
    read an intermediate node of the backbone instead (e.g. ``"layer3"`` of a ResNet), so
    that tasks can sit at different depths.

    Args:
        backbone: Any module mapping inputs to features.
        heads: Task name to head module; a head maps the features it reads to the task's
            output. Any mapping, an ``nn.ModuleDict`` such as another net's
            ``heads`` included. Task names must be non-empty and free of ``.``, since they
            name the submodules of ``heads``.
        branches: Task name to the backbone node its head reads (node names as listed by
            :func:`torchvision.models.feature_extraction.get_graph_node_names`; a module's
            name, e.g. ``"layer3"``, stands for its last node). Tasks not named read the
            backbone's output. With branches, the backbone is replaced by the graph module
            that :func:`~torchvision.models.feature_extraction.create_feature_extractor`
            builds, so it must be traceable by :mod:`torch.fx`.
        example_input: An input :meth:`depths` runs the forward on when given none (kept
            as a plain attribute, outside the state dict).

    Attributes:
        backbone: The backbone, or with ``branches`` its feature extractor.
        heads: The heads, an ``nn.ModuleDict`` in task order.
        branches: The ``branches`` given, a ``dict`` (empty without branches).
        example_input: The ``example_input`` given, or ``None``.

    Raises:
        TypeError: ``heads`` is not a mapping (for a list of modules pass
            ``dict(zip(names, heads))``), or ``branches`` are given for a backbone that
            :mod:`torch.fx` cannot trace (data-dependent control flow): drop ``branches`` or
            make the backbone traceable.
        ValueError: A task name is empty or holds ``.``, or ``branches`` name an unknown
            task or node.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dstmtl import MultiHeadNet
        >>> backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU())
        >>> net = MultiHeadNet(backbone, {"a": nn.Linear(8, 1), "b": nn.Linear(8, 3)})
        >>> {name: tuple(out.shape) for name, out in net(torch.randn(2, 3, 4)).items()}
        {'a': (2, 1), 'b': (2, 3)}
        >>> net.depths(torch.randn(2, 3, 4))
        {'a': 2, 'b': 2}
    """

    def __init__(
        self,
        backbone: nn.Module,
        heads: Mapping[str, nn.Module] | nn.ModuleDict,
        *,
        branches: Mapping[str, str] | None = None,
        example_input: Tensor | None = None,
    ) -> None:
        super().__init__()
        check_mapping(
            heads,
            what="MultiHeadNet: heads",
            expected="a mapping from task name to head module",
            fix="e.g. MultiHeadNet(backbone, dict(zip(names, heads)))",
        )
        names = check_task_names(heads.keys(), owner="MultiHeadNet")
        for name in names:
            if "." in name or not name:
                raise ValueError(
                    f"MultiHeadNet: task name {name!r} cannot name a submodule; "
                    "use a non-empty name without '.'"
                )
        self.branches: dict[str, str] = dict(branches or {})
        unknown = sorted(set(self.branches) - set(names))
        if unknown:
            raise ValueError(
                f"MultiHeadNet: branches name unknown tasks {unknown}; tasks: {list(names)}"
            )
        self._output_node: str | None = None
        if self.branches:
            backbone, self._output_node = _feature_extractor(backbone, set(self.branches.values()))
        self.backbone = backbone
        self.heads = nn.ModuleDict(dict(heads.items()))
        # A plain attribute, not a buffer: the state dict holds weights only.
        self.example_input = example_input

    @property
    def task_names(self) -> tuple[str, ...]:
        """The task names, in the order of ``heads``."""
        return tuple(self.heads.keys())

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Run the backbone once and return each head's output by task name, in task order.

        This is ``forward_heads(forward_features(x))``.
        """
        return self.forward_heads(self.forward_features(x))

    def forward_features(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        """The shared features: the backbone's output, or a dict by node with ``branches``.

        With :meth:`forward_heads`, this splits :meth:`forward` where a method needs the
        shared representation, e.g. ``torchjd.autojac.mtl_backward(losses, features=...)``.
        """
        features: Tensor | dict[str, Tensor] = self.backbone(x)
        return features

    def forward_heads(self, features: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
        """Each head on the features it reads; the second half of :meth:`forward`.

        Raises:
            TypeError: ``features`` are neither a tensor nor, with ``branches``, a dict by
                node, such as the namedtuple of a model with auxiliary logits.
        """
        if isinstance(features, Tensor):
            return {name: head(features) for name, head in self.heads.items()}
        if not isinstance(features, dict) or self._output_node is None:
            raise TypeError(
                "MultiHeadNet needs the backbone to return a Tensor (or, with branches, a dict "
                f"by node); got {type(features).__name__}. Wrap the backbone in a module that "
                "returns the features the heads read (for torchvision's googlenet and "
                "inception_v3, build it with aux_logits=False)"
            )
        return {
            name: head(features[self.branches.get(name, self._output_node)])
            for name, head in self.heads.items()
        }

    def depths(self, *args: Any, **kwargs: Any) -> dict[str, int]:
        """Weight layers on the longest path from the input to each task's output.

        Runs :meth:`forward` once on the example input given (the same arguments as
        :meth:`forward`), or on ``example_input`` when none is given, in eval mode and
        without grad, and follows every operation it runs. A weight layer is a convolution,
        a matrix product or an embedding lookup with one learned operand (a parameter or a
        view of one) and one computed from the input; attention counts its input
        projection and its output projection. For torchvision's ``resnet18`` with one
        ``nn.Linear`` head this is 18: 17 convolutions and the head (the 1x1 shortcut
        convolutions run beside two 3x3 convolutions, so they are not on the longest path).
        Pass the net to :class:`~dstmtl.metrics.NetworkDepth` to use these depths.

        Raises:
            TypeError: There is no example input, or the depth cannot be read (e.g. a
                parameter used in an operation the count does not classify); give
                :class:`~dstmtl.metrics.NetworkDepth` the depths explicitly.
        """
        if not args and not kwargs:
            if self.example_input is None:
                raise TypeError(
                    "MultiHeadNet.depths needs an example input to run the forward on; pass "
                    "one, e.g. net.depths(torch.zeros(1, 3, 224, 224)), or build the net "
                    "with example_input=..."
                )
            args = (self.example_input,)
            parameter = next(self.parameters(), None)
            if parameter is not None:  # the net may have moved since it was built
                float_dtype = parameter.dtype if self.example_input.is_floating_point() else None
                args = (self.example_input.to(parameter.device, float_dtype),)
        return weight_layer_depths(self, args, kwargs)

    @classmethod
    def from_torchvision(
        cls,
        name: str,
        tasks: Mapping[str, SupportsIndex] | Sequence[str],
        *,
        weights: Weights = None,
        branches: Mapping[str, str] | None = None,
        **model_kwargs: Any,
    ) -> MultiHeadNet:
        """Build a torchvision classification model with its classifier replaced by heads.

        The model's last ``nn.Linear`` (its classifier) becomes ``nn.Identity``, and each task
        gets an ``nn.Linear`` head on the features it fed, whose size is read from that
        layer, never assumed. A head on an intermediate node (``branches``) pools the
        feature map first; its channel count is read from a dry run.

        Args:
            name: A classification model in :func:`torchvision.models.list_models`, e.g.
                ``"resnet18"``.
            tasks: Task name to number of outputs (1 for binary and regression tasks, C for a
                C-class task), each an integer (an ``int``, a numpy integer or an integer
                scalar tensor); a sequence of names means one output each.
            weights: Passed to torchvision: a weights enum member, its name (``"DEFAULT"``,
                ``"IMAGENET1K_V1"``) or ``None`` for random initialisation.
            branches: As in :class:`MultiHeadNet`. A branched task's head is
                ``AdaptiveAvgPool2d(1) -> Flatten -> Linear``, sized from a dry run on a
                224x224 input.
            model_kwargs: Passed to :func:`torchvision.models.get_model`. Unless they set
                ``aux_logits``, the auxiliary classifiers of ``googlenet`` and
                ``inception_v3`` (which would make the backbone return a namedtuple in
                training mode) are turned off, with or without weights.

        Raises:
            ValueError: An unknown model, a model without an ``nn.Linear`` classifier
                (SqueezeNet, detection and segmentation models), weights of another model or
                an unknown weights name (the message lists the valid ones), or a count below 1.
            TypeError: A count that is not an integer (``"binary"``, ``True``, ``2.0``), or a
                bare string as ``tasks``.
            RuntimeError: The weights file is not in torch's hub cache and cannot be
                downloaded; the message says where torchvision looks for it.

        Example:
            >>> from dstmtl import MultiHeadNet
            >>> net = MultiHeadNet.from_torchvision("resnet18", ["male", "smiling"])
            >>> net.depths()
            {'male': 18, 'smiling': 18}
        """
        owner = "MultiHeadNet.from_torchvision"
        if isinstance(tasks, Mapping):
            check_task_names(tasks.keys(), owner=owner)
            outputs = {task: _check_output_count(task, width) for task, width in tasks.items()}
        else:
            outputs = dict.fromkeys(check_task_names(tasks, owner=owner), 1)
        backbone = _load_torchvision_model(name, weights, model_kwargs)
        classifier_path, classifier = _last_linear(backbone, name)
        # Not nn.Module.set_submodule, which torch 2.4 lacks.
        parent, _, attribute = classifier_path.rpartition(".")
        setattr(backbone.get_submodule(parent), attribute, nn.Identity())

        branch_channels: dict[str, int] = {}
        if branches:
            extractor, _ = _feature_extractor(backbone, set(branches.values()))
            # 224 px: the resolution every torchvision classifier accepts, ViTs included.
            with torch.no_grad():
                features = extractor.eval()(torch.zeros(1, 3, 224, 224))
            branch_channels = {node: int(value.shape[1]) for node, value in features.items()}
        heads: dict[str, nn.Module] = {}
        for task, width in outputs.items():
            if branches and task in branches:
                heads[task] = nn.Sequential(
                    nn.AdaptiveAvgPool2d(1),
                    nn.Flatten(),
                    nn.Linear(branch_channels[branches[task]], width),
                )
            else:
                heads[task] = nn.Linear(classifier.in_features, width)
        return cls(backbone, heads, branches=branches, example_input=torch.zeros(1, 3, 224, 224))


def _feature_extractor(backbone: nn.Module, nodes: set[str]) -> tuple[nn.Module, str]:
    from torchvision.models.feature_extraction import (
        create_feature_extractor,
        get_graph_node_names,
    )

    try:
        train_nodes, _ = get_graph_node_names(backbone)
    except _TRACE_ERRORS as error:
        raise _untraceable(backbone, error) from error
    output_node = train_nodes[-1]
    # A module's name ("layer3") stands for its last node, as create_feature_extractor allows.
    unknown = sorted(
        node
        for node in nodes
        if not any(n == node or n.startswith(f"{node}.") for n in train_nodes)
    )
    if unknown:
        raise ValueError(
            f"branches name nodes {unknown} that {type(backbone).__name__} does not have; "
            "list its nodes with torchvision.models.feature_extraction.get_graph_node_names"
        )
    return_nodes = {node: node for node in sorted(nodes | {output_node})}
    try:
        extractor = create_feature_extractor(backbone, return_nodes=return_nodes)
    except _TRACE_ERRORS as error:
        raise _untraceable(backbone, error) from error
    return extractor, output_node


# What torch.fx raises on Python control flow or other operations on traced values; a
# ValueError (a node missing in one mode) is torchvision's own, and clearer, message.
_TRACE_ERRORS = (torch.fx.proxy.TraceError, TypeError)


def _untraceable(backbone: nn.Module, error: Exception) -> TypeError:
    return TypeError(
        f"MultiHeadNet: branches need a backbone that torch.fx can trace, and "
        f"{type(backbone).__name__} cannot be traced ({type(error).__name__}: {error}); pass "
        "no branches (every head then reads the backbone's output), make the backbone "
        "traceable (no Python control flow on tensor values), or write a backbone that "
        "returns the features every head needs"
    )


def _check_output_count(task: str, width: Any) -> int:
    example = f"e.g. {{{task!r}: 1}} (1 for a binary or regression task, C for a C-class task)"
    try:
        # Ints, numpy integers and integer scalar tensors; not 2.0 nor "binary".
        count: int | None = operator.index(width)
    except TypeError:
        count = None
    if count is None or isinstance(width, bool):
        raise TypeError(
            f"MultiHeadNet.from_torchvision: task {task!r} has {width!r} outputs; give each "
            f"task its number of outputs as an int, {example}"
        )
    if count < 1:
        raise ValueError(
            f"MultiHeadNet.from_torchvision: task {task!r} has {count} outputs; give each task "
            f"a positive number of outputs, {example}"
        )
    return count


def _load_torchvision_model(name: str, weights: Weights, kwargs: Mapping[str, Any]) -> nn.Module:
    from urllib.error import URLError

    import torchvision

    if name not in torchvision.models.list_models():
        raise ValueError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
    resolved = None if weights is None else _resolve_weights(name, weights)
    auxiliary = () if "aux_logits" in kwargs else _AUX_CLASSIFIERS.get(name, ())
    if auxiliary and resolved is None:
        kwargs = {**kwargs, "aux_logits": False}
    try:
        model: nn.Module = torchvision.models.get_model(name, weights=resolved, **kwargs)
    except (URLError, OSError) as error:
        assert resolved is not None
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(resolved.url))
        raise RuntimeError(
            f"could not load the {resolved} weights for {name} ({error}). torchvision looks for "
            f"the file at {path} and downloads it from {resolved.url} when it is missing; put "
            "the file there, or train from scratch with weights=None"
        ) from error
    if auxiliary and resolved is not None:
        # torchvision refuses aux_logits=False with weights, whose file holds the auxiliary
        # classifiers, so they are turned off after loading, as its googlenet builder does.
        for attribute, value in {"aux_logits": False, **dict.fromkeys(auxiliary)}.items():
            setattr(model, attribute, value)
    return model


def _resolve_weights(name: str, weights: Weights) -> Any:  # a torchvision WeightsEnum member
    from torchvision.models import get_model_weights

    available = get_model_weights(name)
    try:
        resolved = available.verify(weights)
    except (KeyError, TypeError, ValueError) as error:
        names = ["DEFAULT", *(member.name for member in available)]
        raise ValueError(
            f"torchvision model {name!r} has no weights {weights!r}; use one of {names} "
            "or None for random initialisation"
        ) from error
    return resolved


def _last_linear(model: nn.Module, name: str) -> tuple[str, nn.Linear]:
    linears = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"torchvision model {name!r} has no nn.Linear classifier to replace")
    return linears[-1]
