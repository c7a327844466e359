from __future__ import annotations

import contextlib
import io
import operator
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, SupportsIndex

import torch
from torch import Tensor, nn

from dstmtl._depth import weight_layer_depths
from dstmtl._validation import check_mapping, check_task_names
from dstmtl.heads import (
    CHANNEL_DIM,
    FEATURE_DIMS,
    LAYOUTS,
    FeaturePool,
    FusedLinearHead,
    FusedLinearHeads,
    Layout,
    check_layout,
)
from dstmtl.task import Task

Weights = str | Any | None  # a torchvision WeightsEnum member, its name, or None
HeadFactory = Callable[[str, torch.Size], nn.Module | None]
"""``head_factory(task, feature_shape)``: the task's head, or ``None`` for the default one."""

# The dry runs that size the heads: 224 px, which every torchvision classifier accepts
# (ViTs included), and a second size, only to tell a 4-D feature's channels from its
# spatial dimensions (the channels keep their size).
_PROBE_SIZE, _SECOND_PROBE_SIZE = 224, 160

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

    ``forward(x, *args, **kwargs)`` runs ``backbone(x, *args, **kwargs)`` once and returns
    a dict from task name to that task's output, in the order of ``heads``. By default
    every head reads the backbone's output; ``branches`` lets a head read an intermediate
    node of the backbone instead (e.g. ``"layer3"`` of a ResNet), so that tasks can sit at
    different depths. The intermediate features are taken with
    :func:`torchvision.models.feature_extraction.create_feature_extractor`.

    A head may be a :class:`~dstmtl.FusedLinearHead`, one task's handle on a
    :class:`~dstmtl.FusedLinearHeads` (``fused.heads()``): the fused module then runs once
    for all its tasks, and is registered once, in ``fused_heads``, where the
    ``state_dict`` holds its parameters (``fused_heads.0.weight``); ``heads[task]`` stays
    the per-task handle.

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
        heads: The heads, an ``nn.ModuleDict`` in task order (for fused heads, the
            per-task :class:`~dstmtl.FusedLinearHead` handles, which own no parameters:
            ``net.heads.parameters()`` leaves the fused ones out, while
            ``net.heads[task].parameters()`` yields the shared matrices; for an optimizer
            group of all head parameters, add ``net.fused_heads.parameters()``).
        fused_heads: The :class:`~dstmtl.FusedLinearHeads` behind the handles, once each,
            an ``nn.ModuleList``: where the fused parameters are registered.
        branches: The ``branches`` given, a ``dict`` (empty without branches).
        example_input: The ``example_input`` given, or ``None``.

    Raises:
        TypeError: ``heads`` is not a mapping (for a list of modules pass
            ``dict(zip(names, heads))``), or ``branches`` are given for a backbone that
            :mod:`torch.fx` cannot trace (data-dependent control flow): drop ``branches`` or
            make the backbone traceable.
        ValueError: A task name is empty or holds ``.``, ``branches`` name an unknown
            task or node, or fused handles are stored under another task's name or read
            different nodes.

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
        self.fused_heads = nn.ModuleList(_fused_owners(heads, self.branches))
        # Task name -> index in fused_heads, for the tasks whose head is a FusedLinearHead.
        self._fused_index = {
            name: next(i for i, f in enumerate(self.fused_heads) if f is head.fused)
            for name, head in heads.items()
            if isinstance(head, FusedLinearHead)
        }
        # A plain attribute, not a buffer: the state dict holds weights only.
        self.example_input = example_input

    @property
    def task_names(self) -> tuple[str, ...]:
        """The task names, in the order of ``heads``."""
        return tuple(self.heads.keys())

    def forward(
        self, x: Tensor, *args: Any, tasks: Iterable[str] | None = None, **kwargs: Any
    ) -> dict[str, Tensor]:
        """Each task's output by name: ``forward_heads(forward_features(x, *args, **kwargs))``.

        Args:
            x: The backbone's input.
            args, kwargs: Passed on to the backbone after ``x`` (e.g. an attention or padding
                mask); ``tasks`` is this method's own.
            tasks: Run only these tasks' heads and return only their outputs (in the order
                of ``heads``); ``None`` runs them all.
        """
        return self.forward_heads(self.forward_features(x, *args, **kwargs), tasks=tasks)

    def forward_features(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor | dict[str, Tensor]:
        """The shared features: the backbone's output, or a dict by node with ``branches``.

        With :meth:`forward_heads`, this splits :meth:`forward` where a method needs the
        shared representation, e.g. ``torchjd.autojac.mtl_backward(losses, features=...)``.
        ``args`` and ``kwargs`` are passed on to the backbone after ``x``.
        """
        features: Tensor | dict[str, Tensor] = self.backbone(x, *args, **kwargs)
        return features

    def forward_heads(
        self, features: Tensor | dict[str, Tensor], *, tasks: Iterable[str] | None = None
    ) -> dict[str, Tensor]:
        """Each head on the features it reads; the second half of :meth:`forward`.

        Fused heads (:class:`~dstmtl.FusedLinearHeads`) run once for all their tasks. With
        ``tasks``, only those tasks' outputs are returned.

        Raises:
            TypeError: ``features`` are neither a tensor nor, with ``branches``, a dict by
                node, such as the namedtuple of a model with auxiliary logits; or ``tasks``
                is a bare string.
            ValueError: ``tasks`` names unknown tasks.
        """
        names = self._selected(tasks)
        if not isinstance(features, Tensor) and (
            not isinstance(features, dict) or self._output_node is None
        ):
            raise TypeError(
                "MultiHeadNet needs the backbone to return a Tensor (or, with branches, a dict "
                f"by node); got {type(features).__name__}. Wrap the backbone in a module that "
                "returns the features the heads read (for torchvision's googlenet and "
                "inception_v3, build it with aux_logits=False)"
            )
        outputs: dict[str, Tensor] = {}
        fused_outputs: dict[int, dict[str, Tensor]] = {}
        for name in names:
            if isinstance(features, Tensor):
                read = features
            else:
                assert self._output_node is not None  # checked above
                read = features[self.branches.get(name, self._output_node)]
            index = self._fused_index.get(name)
            if index is None:
                outputs[name] = self.heads[name](read)
                continue
            if index not in fused_outputs:
                fused_outputs[index] = self.fused_heads[index](read)
            outputs[name] = fused_outputs[index][name]
        return outputs

    def _selected(self, tasks: Iterable[str] | None) -> tuple[str, ...]:
        if tasks is None:
            return self.task_names
        if isinstance(tasks, str):
            raise TypeError(
                f"MultiHeadNet: tasks must be an iterable of task names, got the string "
                f"{tasks!r}; e.g. tasks=[{tasks!r}]"
            )
        wanted = set(tasks)
        unknown = sorted(wanted - set(self.task_names), key=str)
        if unknown:
            raise ValueError(
                f"MultiHeadNet: tasks= names unknown tasks {unknown}; tasks: "
                f"{list(self.task_names)}"
            )
        return tuple(name for name in self.task_names if name in wanted)

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
        tasks: Mapping[str, SupportsIndex | Task] | Sequence[str],
        *,
        weights: Weights = None,
        branches: Mapping[str, str] | None = None,
        layouts: Mapping[str, Layout] | None = None,
        head_factory: HeadFactory | None = None,
        fuse_heads: bool = True,
        **model_kwargs: Any,
    ) -> MultiHeadNet:
        """Build a torchvision classification model with its classifier replaced by heads.

        The model's last ``nn.Linear`` (its classifier) becomes ``nn.Identity``, and each task
        gets a linear head on the features it reads, sized from the model, never assumed:
        on the model's output, from the replaced classifier; on a branch (an intermediate
        node), from a dry run on a ``1x3x224x224`` zero input, after pooling the node's
        feature to ``[B, C]`` as its :data:`~dstmtl.Layout` says. By default the
        linear heads that read the same feature are one
        :class:`~dstmtl.FusedLinearHeads` (one matmul for them all), and ``net.heads`` holds
        a :class:`~dstmtl.FusedLinearHead` handle per task.

        A branch's layout is inferred where the feature's shape decides it: ``[B, C]`` is
        ``"flat"``; for a 4-D feature, a second dry run at 160 px tells the channel
        dimension (the one that keeps its size) from the spatial ones, so a CNN's
        ``[B, C, H, W]`` is ``"nchw"`` and Swin's ``[B, H, W, C]`` is ``"nhwc"``. A token
        sequence ``[B, N, C]`` needs ``layouts`` (class token or mean), and so does a 4-D
        feature whose layout the two runs cannot tell (e.g. ``1x1`` maps, or a backbone
        that only takes 224 px). A given layout is checked against the same runs. Either
        problem raises ``ValueError`` here, naming the node, the shapes found and the fix.

        Args:
            name: A classification model in :func:`torchvision.models.list_models`, e.g.
                ``"resnet18"``.
            tasks: Task name to number of outputs (1 for binary and regression tasks, C for a
                C-class task), each an integer (an ``int``, a numpy integer or an integer
                scalar tensor), or to a :class:`~dstmtl.Task` (its ``outputs``); a sequence
                of names means one output each.
            weights: Passed to torchvision: a weights enum member, its name (``"DEFAULT"``,
                ``"IMAGENET1K_V1"``) or ``None`` for random initialisation.
            branches: As in :class:`MultiHeadNet`.
            layouts: Branched task name to the :data:`~dstmtl.Layout` of the node it
                reads: ``"nchw"``, ``"nhwc"``, ``"tokens_cls"``, ``"tokens_mean"`` or
                ``"flat"``.
            head_factory: ``head_factory(task, feature_shape)`` returns the task's head
                module, or ``None`` for the default linear head. ``feature_shape`` is the
                ``torch.Size`` of the feature the task reads in the dry run (batch 1,
                224 px; ``(1, in_features)`` on the model's output). The factory's heads
                get the raw feature, are never fused and are used as given.
            fuse_heads: ``False`` gives each task its own ``nn.Linear`` (after a
                :class:`~dstmtl.FeaturePool` on a branch) instead of fused heads.
            model_kwargs: Passed to :func:`torchvision.models.get_model`. Unless they set
                ``aux_logits``, the auxiliary classifiers of ``googlenet`` and
                ``inception_v3`` (which would make the backbone return a namedtuple in
                training mode) are turned off, with or without weights.

        Raises:
            ValueError: An unknown model, a model without an ``nn.Linear`` classifier
                (SqueezeNet, detection and segmentation models), weights of another model or
                an unknown weights name (the message lists the valid ones), a count below 1,
                or a branch layout that is wrong or that the dry runs cannot tell.
            TypeError: A count that is not an integer (``"binary"``, ``True``, ``2.0``), or a
                bare string as ``tasks``.
            RuntimeError: The weights file is not in torch's hub cache and cannot be
                downloaded; the message says where torchvision looks for it.

        Example:
            >>> from dstmtl import MultiHeadNet
            >>> net = MultiHeadNet.from_torchvision("resnet18", ["male", "smiling"])
            >>> net.depths()
            {'male': 18, 'smiling': 18}
            >>> net.heads["smiling"].rows, tuple(net.fused_heads[0].weight.shape)
            (slice(1, 2, None), (2, 512))
        """
        owner = "MultiHeadNet.from_torchvision"
        if isinstance(tasks, Mapping):
            check_task_names(tasks.keys(), owner=owner)
            outputs = {task: _check_output_count(task, width) for task, width in tasks.items()}
        else:
            outputs = dict.fromkeys(check_task_names(tasks, owner=owner), 1)
        branches = dict(branches or {})
        unknown = sorted(set(branches) - set(outputs))
        if unknown:
            raise ValueError(
                f"MultiHeadNet: branches name unknown tasks {unknown}; tasks: {list(outputs)}"
            )
        given = _check_layouts(layouts, branches, owner)
        backbone = _load_torchvision_model(name, weights, model_kwargs)
        classifier_path, classifier = _last_linear(backbone, name)
        # Not nn.Module.set_submodule, which torch 2.4 lacks.
        parent, _, attribute = classifier_path.rpartition(".")
        setattr(backbone.get_submodule(parent), attribute, nn.Identity())

        probe = _Probe(backbone, set(branches.values()), owner)
        own: dict[str, nn.Module] = {}
        readers: dict[tuple[str | None, Layout, int], dict[str, int]] = {}
        for task, width in outputs.items():
            node = branches.get(task)
            shape = torch.Size((1, classifier.in_features)) if node is None else probe.shape(node)
            custom = None if head_factory is None else head_factory(task, shape)
            if custom is not None:
                own[task] = custom
                continue
            layout = "flat" if node is None else probe.layout(task, node, given.get(task))
            channels = int(shape[CHANNEL_DIM[layout]])
            readers.setdefault((node, layout, channels), {})[task] = width
        heads: dict[str, nn.Module] = {}
        for (node, layout, channels), widths in readers.items():
            if fuse_heads:
                heads.update(FusedLinearHeads(channels, widths, layout=layout).heads())
            else:
                for task, width in widths.items():
                    linear = nn.Linear(channels, width)
                    heads[task] = (
                        linear if node is None else nn.Sequential(FeaturePool(layout), linear)
                    )
        heads.update(own)
        probe.restore_modes()
        return cls(
            backbone,
            {task: heads[task] for task in outputs},
            branches=branches,
            example_input=torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE),
        )


def _fused_owners(
    heads: Mapping[str, nn.Module] | nn.ModuleDict, branches: Mapping[str, str]
) -> list[FusedLinearHeads]:
    """The FusedLinearHeads behind the heads, once each, after checking their handles."""
    owners: dict[int, FusedLinearHeads] = {}
    nodes: dict[int, dict[str | None, list[str]]] = {}
    for name, head in heads.items():
        if not isinstance(head, FusedLinearHead):
            continue
        if head.task != name:
            raise ValueError(
                f"MultiHeadNet: the head of task {name!r} is the FusedLinearHead of task "
                f"{head.task!r}; give each task its own handle, e.g. "
                "MultiHeadNet(backbone, fused.heads())"
            )
        owners.setdefault(id(head.fused), head.fused)
        nodes.setdefault(id(head.fused), {}).setdefault(branches.get(name), []).append(name)
    for by_node in nodes.values():
        if len(by_node) > 1:
            found = {node or "the output": names for node, names in by_node.items()}
            raise ValueError(
                f"MultiHeadNet: tasks {sorted(n for names in by_node.values() for n in names)} "
                "share one "
                f"FusedLinearHeads but read different nodes ({found}); fused heads read one "
                "feature: give the tasks the same branch, or one FusedLinearHeads per node"
            )
    return list(owners.values())


class _Probe:
    """Dry runs of a backbone's nodes, for the shapes and layouts of the heads that read them.

    The runs are in eval mode without gradients, so that they change no batch-norm
    statistics; :meth:`restore_modes` puts every module back in the mode it had.
    """

    def __init__(self, backbone: nn.Module, nodes: set[str], owner: str) -> None:
        self._backbone, self._nodes, self._owner = backbone, nodes, owner
        self._modes = {module: module.training for module in backbone.modules()}
        self._extractor: nn.Module | None = None
        self._runs: dict[int, dict[str, torch.Size] | Exception] = {}

    def restore_modes(self) -> None:
        for module, training in self._modes.items():
            module.training = training

    def shape(self, node: str) -> torch.Size:
        shapes = self._run(_PROBE_SIZE)
        if isinstance(shapes, Exception):
            raise shapes
        return shapes[node]

    def layout(self, task: str, node: str, given: Layout | None) -> Layout:
        """The layout of ``node``'s feature: ``given`` after checking it, or the one its shape
        decides; ``ValueError`` naming the node, its shapes and the fix otherwise."""
        shape = self.shape(node)
        dims = len(shape)
        fix = (
            f"give the layout of the feature, layouts={{{task!r}: ...}} (one of "
            f"{list(LAYOUTS)}), or a head_factory that builds the task's head"
        )
        found = (
            f"{self._owner}: task {task!r} reads node {node!r}, of shape {tuple(shape)} at "
            f"{_PROBE_SIZE} px"
        )
        candidates = [layout for layout in LAYOUTS if FEATURE_DIMS[layout] == dims]
        if not candidates:
            raise ValueError(
                f"{found}, which no layout reads (they read [B, C], [B, N, C], [B, C, H, W] "
                "and [B, H, W, C] features); give a head_factory that builds the task's head"
            )
        if given is not None and given not in candidates:
            raise ValueError(
                f"{found}; layout {given!r} reads {FEATURE_DIMS[given]}-D features, not "
                f"{dims}-D; {fix}"
            )
        if dims == 2:
            return "flat"
        second = self._run(_SECOND_PROBE_SIZE)
        if isinstance(second, Exception):
            found += (
                f" (and the backbone fails at {_SECOND_PROBE_SIZE} px: "
                f"{type(second).__name__}: {second})"
            )
            consistent = candidates
        else:
            other = second[node]
            found += f" and {tuple(other)} at {_SECOND_PROBE_SIZE} px"
            consistent = [
                layout
                for layout in candidates
                if len(other) == dims and other[CHANNEL_DIM[layout]] == shape[CHANNEL_DIM[layout]]
            ]
        if given is not None:
            if given not in consistent:
                raise ValueError(
                    f"{found}: dim {CHANNEL_DIM[given]} changes with the input size, so it is "
                    f"not the channel dim of layout {given!r}; {fix}"
                )
            return given
        if len(consistent) == 1 and not isinstance(second, Exception):
            return consistent[0]
        raise ValueError(f"{found}: its shape does not tell its layout ({consistent} fit); {fix}")

    def _run(self, size: int) -> dict[str, torch.Size] | Exception:
        if size not in self._runs:
            if self._extractor is None:
                self._extractor, _ = _feature_extractor(self._backbone, self._nodes)
            # torch.fx prints the generated code of a failing graph to stderr; a failure at
            # the second size is expected of fixed-size backbones and named in our message.
            quiet = size != _PROBE_SIZE
            silence = (
                contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()
            )
            try:
                with torch.no_grad(), silence:
                    features = self._extractor.eval()(torch.zeros(1, 3, size, size))
            except Exception as error:  # the second size is optional: any failure is reported
                if not quiet:
                    raise
                self._runs[size] = error
            else:
                self._runs[size] = {
                    node: _feature_shape(features[node], node) for node in self._nodes
                }
        return self._runs[size]


def _feature_shape(feature: object, node: str) -> torch.Size:
    if not isinstance(feature, Tensor):
        raise TypeError(
            f"MultiHeadNet.from_torchvision: node {node!r} gives a {type(feature).__name__}, "
            "not a tensor; branch from a node that gives one tensor"
        )
    return feature.shape


def _check_layouts(
    layouts: Mapping[str, Layout] | None, branches: Mapping[str, str], owner: str
) -> dict[str, Layout]:
    if layouts is None:
        return {}
    check_mapping(
        layouts,
        what=f"{owner}: layouts",
        expected="a mapping from branched task name to layout",
        fix=f"e.g. layouts={{'task': 'nhwc'}}, layouts being one of {list(LAYOUTS)}",
    )
    unbranched = sorted(set(layouts) - set(branches))
    if unbranched:
        raise ValueError(
            f"{owner}: layouts name tasks {unbranched} that have no branch; a layout says how "
            "a branched task's node is laid out (a task on the model's output reads its "
            "[B, C] features)"
        )
    return {task: check_layout(layout, owner=owner) for task, layout in layouts.items()}


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
    if isinstance(width, Task):
        width = width.outputs
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
