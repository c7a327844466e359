"""Heads that read a feature of any layout, and K linear heads held as one weight matrix."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Layout = Literal["flat", "nchw", "nhwc", "tokens_cls", "tokens_mean"]
"""How a feature is laid out, and so how a linear head reduces it to ``[B, C]``.

* ``"flat"``: ``[B, C]``, read as is (a classifier's input).
* ``"nchw"``: ``[B, C, H, W]`` (CNNs), averaged over ``H, W``.
* ``"nhwc"``: ``[B, H, W, C]`` (Swin, the permuted blocks of ConvNeXt), averaged over
  ``H, W``.
* ``"tokens_cls"``: ``[B, N, C]`` (ViT), the first (class) token.
* ``"tokens_mean"``: ``[B, N, C]``, the mean over the ``N`` tokens.
"""

LAYOUTS: tuple[Layout, ...] = get_args(Layout)

# The number of dimensions each layout reads, and which of them holds the channels.
FEATURE_DIMS: dict[Layout, int] = {
    "flat": 2,
    "nchw": 4,
    "nhwc": 4,
    "tokens_cls": 3,
    "tokens_mean": 3,
}
CHANNEL_DIM: dict[Layout, int] = {
    "flat": 1,
    "nchw": 1,
    "nhwc": 3,
    "tokens_cls": 2,
    "tokens_mean": 2,
}


def _pool(x: Tensor, layout: Layout) -> Tensor:
    # A function, not a submodule call, so that torch.fx can trace a FusedLinearHead,
    # whose pooling belongs to the FusedLinearHeads it is a view of.
    if layout == "nchw":
        return x.mean((2, 3))
    if layout == "nhwc":
        return x.mean((1, 2))
    if layout == "tokens_cls":
        return x[:, 0]
    if layout == "tokens_mean":
        return x.mean(1)
    return x


def check_layout(layout: object, *, owner: str) -> Layout:
    """Return ``layout`` if it names a :data:`Layout`, else raise ``ValueError`` listing them."""
    if layout not in LAYOUTS:
        raise ValueError(f"{owner}: unknown layout {layout!r}; use one of {list(LAYOUTS)}")
    return layout


class FeaturePool(nn.Module):
    """Reduce a feature of the given :data:`Layout` to one ``[B, C]`` vector per sample.

    Example:
        >>> import torch
        >>> from dstmtl import FeaturePool
        >>> FeaturePool("nhwc")(torch.ones(2, 7, 7, 384)).shape
        torch.Size([2, 384])
        >>> FeaturePool("tokens_cls")(torch.arange(6.0).reshape(1, 3, 2))
        tensor([[0., 1.]])
    """

    def __init__(self, layout: Layout) -> None:
        super().__init__()
        self.layout = check_layout(layout, owner="FeaturePool")

    def forward(self, x: Tensor) -> Tensor:
        """``x`` reduced to ``[B, C]`` as the layout says."""
        return _pool(x, self.layout)

    def extra_repr(self) -> str:
        return repr(self.layout)


class FusedLinearHeads(nn.Module):
    r"""K linear heads reading the same feature, held as one weight matrix.

    Task :math:`j`, with :math:`m_j` outputs, owns rows :math:`r_j` (consecutive, in the
    order of ``outputs``) of ``weight`` (``[sum of m_j, in_features]``) and ``bias``:

    .. math::

        y_j = \operatorname{pool}(x)\, W_{r_j}^\top + b_{r_j}

    computed as one matrix product for all tasks, then split by task. This is the same
    function, with the same gradients, as one ``nn.Linear(in_features, m_j)`` per task
    (rows initialised as ``nn.Linear`` does), but one matmul and two parameter tensors
    instead of K and 2K, which is what makes many small heads cheap.

    The parameters are shared: ``state_dict()`` holds one ``weight`` and one ``bias``; task
    j's rows are ``weight[fused.rows(j)]``, and its gradient is
    ``weight.grad[fused.rows(j)]``. A task whose loss is dropped (or not computed) gets a
    zero gradient in its rows, not ``None``, so an optimizer with momentum (Adam) still moves
    them; separate ``nn.Linear`` heads that never ran would get ``None`` and stay put.

    :meth:`heads` gives one :class:`FusedLinearHead` per task, the per-task handle that
    :class:`MultiHeadNet` keeps in ``net.heads``.

    Args:
        in_features: The channel count of the feature (after pooling).
        outputs: Task name to its number of outputs.
        layout: How the feature is laid out (:data:`Layout`); it is pooled to
            ``[B, in_features]`` once, for all the tasks.

    Example:
        >>> import torch
        >>> from dstmtl import FusedLinearHeads
        >>> fused = FusedLinearHeads(8, {"a": 1, "b": 3})
        >>> {task: tuple(y.shape) for task, y in fused(torch.randn(2, 8)).items()}
        {'a': (2, 1), 'b': (2, 3)}
        >>> tuple(fused.weight.shape), fused.rows("b")
        ((4, 8), slice(1, 4, None))
    """

    def __init__(
        self, in_features: int, outputs: Mapping[str, int], *, layout: Layout = "flat"
    ) -> None:
        super().__init__()
        if not outputs:
            raise ValueError("FusedLinearHeads: no tasks; give at least one, e.g. {'task': 1}")
        bad = {
            task: width
            for task, width in outputs.items()
            if isinstance(width, bool) or not isinstance(width, int) or width < 1
        }
        if bad:
            raise ValueError(f"FusedLinearHeads: tasks {bad} need a positive int number of outputs")
        self.in_features = in_features
        self.outputs = dict(outputs)
        self.layout = check_layout(layout, owner="FusedLinearHeads")
        self._widths = list(self.outputs.values())
        ends = list(itertools.accumulate(self._widths))
        self._rows = {
            task: slice(end - width, end)
            for task, end, width in zip(self.outputs, ends, self._widths, strict=True)
        }
        total = ends[-1]
        self.weight = nn.Parameter(torch.empty(total, in_features))
        self.bias = nn.Parameter(torch.empty(total))
        self.reset_parameters()
        # A plain dict, so that the handles are not submodules: the parameters are
        # registered once, here.
        self._heads = {task: FusedLinearHead(self, task) for task in self.outputs}

    def reset_parameters(self) -> None:
        """Initialise every task's rows as ``nn.Linear(in_features, m_j)`` would."""
        # nn.Linear's initialisation depends only on in_features, so drawing the whole
        # matrix at once draws each task's rows from the same distribution.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linears(
        cls, linears: Mapping[str, nn.Linear], *, layout: Layout = "flat"
    ) -> FusedLinearHeads:
        """Fuse separate ``nn.Linear`` heads with the same input size, copying their weights.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from dstmtl import FusedLinearHeads
            >>> linears = {"a": nn.Linear(4, 1), "b": nn.Linear(4, 2)}
            >>> fused = FusedLinearHeads.from_linears(linears)
            >>> x = torch.randn(3, 4)
            >>> torch.equal(fused(x)["b"], linears["b"](x))
            True
        """
        sizes = {task: linear.in_features for task, linear in linears.items()}
        if len(set(sizes.values())) > 1 or any(linear.bias is None for linear in linears.values()):
            raise ValueError(
                f"FusedLinearHeads.from_linears: the heads must share one input size and all have "
                f"a bias; got input sizes {sizes}"
            )
        first = next(iter(linears.values()))
        fused = cls(
            first.in_features, {t: m.out_features for t, m in linears.items()}, layout=layout
        ).to(first.weight.device, first.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([m.weight for m in linears.values()]))
            fused.bias.copy_(torch.cat([m.bias for m in linears.values()]))
        return fused

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.outputs)

    def rows(self, task: str) -> slice:
        """The rows of ``weight`` and ``bias`` that belong to ``task``."""
        try:
            return self._rows[task]
        except KeyError:
            raise KeyError(
                f"FusedLinearHeads has no task {task!r}; tasks: {list(self.outputs)}"
            ) from None

    def heads(self) -> dict[str, FusedLinearHead]:
        """One per-task handle each, e.g. for ``MultiHeadNet(backbone, fused.heads())``."""
        return dict(self._heads)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Every task's output, by task name, from one matrix product."""
        out = F.linear(_pool(x, self.layout), self.weight, self.bias)
        return dict(zip(self.outputs, torch.split(out, self._widths, dim=-1), strict=True))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, outputs={self.outputs}, layout={self.layout!r}"


class FusedLinearHead(nn.Module):
    """One task's handle on a :class:`FusedLinearHeads`: its rows, as a module.

    It owns no parameters of its own (``state_dict()`` is empty): ``weight`` and ``bias``
    are views of the task's rows of the shared matrices, and calling it runs that task's
    head alone (same values as the fused call). ``parameters()`` yields the shared
    ``weight`` and ``bias`` (the tensors this task's output depends on, common to every task
    of ``fused``), so code that collects a head's parameters, e.g. TorchJD's
    ``mtl_backward(tasks_params=...)``, still gets the right ones; gradients of tasks that
    share them add up, each in its own rows. ``zero_grad()`` or ``requires_grad_()`` on a
    handle therefore act on every task of ``fused``.

    Attributes: ``fused`` (the :class:`FusedLinearHeads`), ``task``, ``rows`` (a slice),
    ``in_features``, ``out_features``, ``weight``, ``bias``.
    """

    def __init__(self, fused: FusedLinearHeads, task: str) -> None:
        super().__init__()
        # In a tuple so that nn.Module does not register it: its parameters would then be
        # counted twice in state_dict().
        self._fused = (fused,)
        self.task = task
        self.rows = fused.rows(task)
        self.in_features = fused.in_features
        self.out_features = fused.outputs[task]

    @property
    def fused(self) -> FusedLinearHeads:
        return self._fused[0]

    @property
    def weight(self) -> Tensor:
        return self.fused.weight[self.rows]

    @property
    def bias(self) -> Tensor:
        return self.fused.bias[self.rows]

    def forward(self, x: Tensor) -> Tensor:
        """This task's output alone, the same values as its part of the fused call."""
        return F.linear(_pool(x, self.fused.layout), self.weight, self.bias)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """The shared ``weight`` and ``bias``, named ``fused.weight`` and ``fused.bias``."""
        yield from self.fused.named_parameters(
            prefix=f"{prefix}.fused" if prefix else "fused",
            recurse=recurse,
            remove_duplicate=remove_duplicate,
        )

    def extra_repr(self) -> str:
        return (
            f"task={self.task!r}, rows={self.rows.start}:{self.rows.stop}, "
            f"in_features={self.in_features}, out_features={self.out_features}"
        )
