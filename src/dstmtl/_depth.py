"""Weight layers on the longest input-output path, read off one real forward pass.

The count follows the data flow of every ATen operation that one forward pass on an
example input runs, seen by a :class:`~torch.utils._python_dispatch.TorchDispatchMode`.
That level was chosen over the two others that see a real run:

* the autograd graph loses what runs under ``torch.no_grad()`` or after ``.detach()`` (a
  frozen feature extractor), what ``torch.utils.checkpoint`` recomputes, and integer inputs
  (token ids), which cannot require grad;
* a :class:`~torch.overrides.TorchFunctionMode` sees Python functions such as
  ``F.multi_head_attention_forward`` as one call, with the projections inside hidden,
  since a function mode is switched off while the function it intercepted runs.

ATen operations are seen whatever the grad mode, after Python functions and composite
operations (``linear``, ``matmul``) are taken apart, so that a weight layer is an
operation with a learned operand whatever module or function called it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

EXPLICIT_DEPTHS = "pass the depths explicitly, e.g. NetworkDepth({'task': 18, ...})"

# The operations that multiply (or convolve) two operands, and the argument positions of
# the two; one learned operand and one computed from the input make a weight layer. An
# embedding lookup is the product of the one-hot input with the table, so it is one too
# (as ViT's patch convolution is).
_PRODUCTS = {
    "convolution": (0, 1),
    "_convolution": (0, 1),
    "convolution_overrideable": (0, 1),
    "mkldnn_convolution": (0, 1),
    "cudnn_convolution": (0, 1),
    "cudnn_convolution_transpose": (0, 1),
    "miopen_convolution": (0, 1),
    "_slow_conv2d_forward": (0, 1),
    "slow_conv3d_forward": (0, 1),
    "_conv_depthwise2d": (0, 1),
    "linear": (0, 1),
    "matmul": (0, 1),
    "mm": (0, 1),
    "bmm": (0, 1),
    "mv": (0, 1),
    "dot": (0, 1),
    "addmm": (1, 2),
    "_addmm_activation": (1, 2),
    "baddbmm": (1, 2),
    "addbmm": (1, 2),
    "addmv": (1, 2),
    "embedding": (0, 1),
    "_embedding_bag": (0, 1),
    "embedding_bag": (0, 1),
}

# Operations that use a learned tensor elementwise, or per channel, on what the input
# computed: biases, layer scale, norms, position embeddings, a class token joined by cat.
# They are no weight layer. A learned tensor meeting the input in any other operation
# stops the count, as it may hide a weight layer (a fused attention kernel).
_ELEMENTWISE = frozenset(
    {
        "add",
        "sub",
        "rsub",
        "mul",
        "div",
        "addcmul",
        "addcdiv",
        "lerp",
        "where",
        "maximum",
        "minimum",
        "clamp",
        "clamp_min",
        "clamp_max",
        "masked_fill",
        "cat",
        "stack",
        "copy",
        "index_put",
        "_prelu_kernel",
        "native_layer_norm",
        "native_group_norm",
        "native_batch_norm",
        "_native_batch_norm_legit",
        "_native_batch_norm_legit_no_training",
        "_batch_norm_with_update",
        "_batch_norm_no_update",
        "cudnn_batch_norm",
        "miopen_batch_norm",
        "_fused_rms_norm",
        "_weight_norm_interface",
    }
)

_LEARNED = -1  # the record of a storage that holds parameters or values computed from them


def weight_layer_depths(
    module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> dict[str, int]:
    """For each output of ``module(*args, **kwargs)`` (a mapping), its longest weight path.

    The module runs once, in eval mode and without grad; train/eval modes are restored.
    Raises ``TypeError`` when the depth cannot be read.
    """
    modes = [(m, m.training) for m in module.modules()]
    flow = _DataFlow(module.parameters(), tree_leaves((args, dict(kwargs))))
    try:
        module.eval()
        with torch.no_grad(), _NoFastPath(), flow:
            outputs = module(*args, **kwargs)
    finally:
        for m, training in modes:
            m.training = training
    if not isinstance(outputs, Mapping):
        raise TypeError(
            f"cannot read depths off {type(module).__name__}: it returns "
            f"{type(outputs).__name__}, not a mapping from task name to output; " + EXPLICIT_DEPTHS
        )
    return {str(name): flow.output_depth(str(name), value) for name, value in outputs.items()}


class _NoFastPath(TorchFunctionMode):
    """Keeps ``nn.MultiheadAttention`` and ``nn.TransformerEncoder`` off their fused kernels.

    With a function mode active, their fast-path checks find a "Tensor argument with
    torch function" and run the Python path, whose projections the count sees.
    """

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Iterable[type],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        return func(*args, **(kwargs or {}))


class _DataFlow(TorchDispatchMode):  # type: ignore[no-untyped-call, unused-ignore]  # untyped in torch
    """Records, per storage, the longest weight path from the input to what it holds.

    Records are kept by storage, not by tensor, so that a view (a slice, a transpose) reads
    its base's record and an in-place write into a view raises its base's. A storage holds
    either a depth (values computed from the input), ``_LEARNED`` (parameters and values
    computed from them alone) or no record (constants: buffers, masks, ``arange``).
    """

    def __init__(self, parameters: Iterable[Tensor], inputs: Iterable[Any]) -> None:
        super().__init__()  # type: ignore[no-untyped-call, unused-ignore]
        # Every storage seen is kept alive, so that no new one reuses a recorded address.
        self._alive: dict[int, torch.UntypedStorage] = {}
        self._records: dict[int, int] = {}
        # Storages whose parts were written at different depths (slices of a preallocated
        # buffer): read whole, their record (the deepest part) is right; read in part, it
        # may not be, and the count refuses.
        self._mixed: set[int] = set()
        for parameter in parameters:
            self._records[self._key(parameter)] = _LEARNED
        for value in inputs:
            if isinstance(value, Tensor):
                self._records[self._key(value)] = 0

    def _key(self, tensor: Tensor) -> int:
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError) as error:  # sparse, nested tensors
            raise TypeError(
                f"cannot read the network depth through a {tensor.layout} tensor without a "
                f"plain storage ({error}); " + EXPLICIT_DEPTHS
            ) from error
        key: int = storage._cdata
        self._alive.setdefault(key, storage)
        return key

    def _record(self, tensor: Tensor) -> int | None:
        return self._records.get(self._key(tensor))

    def __torch_dispatch__(
        self,
        func: Any,  # torch._ops.OpOverload
        types: Iterable[type],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves = tree_leaves((args, kwargs))
        if any(isinstance(leaf, torch.ScriptObject) for leaf in leaves):
            raise TypeError(
                f"cannot read the network depth: the operation {func} takes packed weights "
                "(a quantized or prepacked layer), which the count cannot follow; "
                + EXPLICIT_DEPTHS
            )
        self._check_read_whole(func, args)
        # copy_ overwrites its destination without reading it: the values written carry
        # their own depth, not the depth of what the rest of the buffer holds.
        read = leaves[1:] if func.overloadpacket.__name__ == "copy_" else leaves
        records = [self._record(t) for t in read if isinstance(t, Tensor)]
        depths = [r for r in records if r is not None and r != _LEARNED]
        if depths:
            depth = max(depths) + self._own_depth(func, args, _LEARNED in records)
        elif _LEARNED in records:
            depth = _LEARNED
        else:
            return out
        for tensor in tree_leaves(out):
            if isinstance(tensor, Tensor):
                key = self._key(tensor)
                recorded = self._records.get(key, _LEARNED)
                if recorded not in (_LEARNED, depth) and depth != _LEARNED and _partial(tensor):
                    self._mixed.add(key)
                self._records[key] = max(recorded, depth)
        return out

    def _check_read_whole(self, func: Any, args: tuple[Any, ...]) -> None:
        """Refuse to read part of a storage whose parts hold different depths."""
        schema = func._schema.arguments
        for position, arg in enumerate(args):
            alias = schema[position].alias_info if position < len(schema) else None
            if alias is not None and alias.is_write:
                continue  # written, not read: how buffers are filled in part
            for tensor in tree_leaves(arg):
                if isinstance(tensor, Tensor):
                    self._refuse_partial_mixed(tensor, f"the operation {func} reads")

    def _refuse_partial_mixed(self, tensor: Tensor, reader: str) -> None:
        if self._key(tensor) in self._mixed and _partial(tensor):
            raise TypeError(
                f"cannot read the network depth: {reader} part of a tensor whose parts were "
                "computed through different numbers of weight layers (e.g. heads written "
                "into slices of one buffer), and the count keeps one depth per tensor; "
                + EXPLICIT_DEPTHS
            )

    def _own_depth(self, func: Any, args: tuple[Any, ...], learned: bool) -> int:
        name: str = func.overloadpacket.__name__.rstrip("_")
        if name in _PRODUCTS:
            operands = [args[i] for i in _PRODUCTS[name] if i < len(args)]
            kinds = {
                "learned" if r == _LEARNED else "input" if r is not None else "constant"
                for r in (self._record(t) for t in operands if isinstance(t, Tensor))
            }
            return int(kinds == {"learned", "input"})
        if learned and name not in _ELEMENTWISE:
            raise TypeError(
                f"cannot read the network depth: the operation {func} takes a learned "
                "parameter together with values computed from the input, and is neither a "
                "weight layer (convolution, matrix product, embedding) nor an elementwise "
                "use (bias, scale, norm); " + EXPLICIT_DEPTHS
            )
        return 0

    def output_depth(self, name: str, output: Any) -> int:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"cannot read the depth of task {name!r}: its output is "
                f"{type(output).__name__}, not a Tensor; " + EXPLICIT_DEPTHS
            )
        self._refuse_partial_mixed(output, f"the output of task {name!r} is")
        depth = self._record(output)
        if depth is None or depth == _LEARNED:
            raise TypeError(
                f"cannot read the depth of task {name!r}: its output was not computed from the "
                "example input as far as the count can follow (values taken out of tensors, "
                "e.g. with .tolist() or .numpy(), are not followed); " + EXPLICIT_DEPTHS
            )
        if depth == 0:
            raise TypeError(
                f"cannot read the depth of task {name!r}: no weight layer (convolution, "
                "matrix product with a learned parameter, embedding) lies between the input "
                "and its output; " + EXPLICIT_DEPTHS
            )
        return depth


def _partial(tensor: Tensor) -> bool:
    """Whether ``tensor`` covers only part of its storage (a slice of a larger buffer)."""
    return tensor.numel() * tensor.element_size() < tensor.untyped_storage().nbytes()
