from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dstmtl._validation import check_mapping, check_same_tasks, check_task_names
from dstmtl.task import KINDS, Task, TaskKind

PerSampleLoss = Callable[[Tensor, Tensor], Tensor]
TaskSpec = TaskKind | Task | PerSampleLoss

_MISSING_CLASS = -1


class MaskedMultiTaskLoss(nn.Module):
    r"""Per-task mean losses over the labelled elements only.

    A task's target holds one element per sample (``[B]``) or several (``[B, C]`` labels or
    values, ``[B, H, W]`` maps). For task :math:`j` with labelled elements :math:`S_j` (pairs
    of a sample :math:`i` and an element :math:`e`) in the batch,

    .. math::

        L_j = \frac{\sum_{(i, e) \in S_j} \ell_j(\hat y_{ie}, y_{ie})}
                   {\sum_{(i, e) \in S_j} w_j(y_{ie})}

    where :math:`w_j(c)` is the weight of class :math:`c` for a multiclass task with class
    weights and 1 otherwise, so :math:`L_j` is the mean over the labelled elements, and the
    weighted mean of :func:`~torch.nn.functional.cross_entropy` with ``weight`` and
    ``reduction="mean"``. A task with no labelled element (or whose labelled elements all
    have weight 0) gives exactly 0, keeps a gradient path to its head (every parameter is
    used, as :class:`~torch.nn.parallel.DistributedDataParallel` requires) and is never NaN.

    The kinds, their element losses :math:`\ell_j` and shapes (``*`` is any number of
    further dimensions, the same in output and target):

    * ``"binary"``: :func:`~torch.nn.functional.binary_cross_entropy_with_logits`, with the
      task's ``pos_weight``; output logits and float target in ``{0, 1}`` (soft targets work
      too) of shape ``[B, *]``, NaN for a missing element;
    * ``"multiclass"``: :func:`~torch.nn.functional.cross_entropy`, with the task's
      ``class_weights`` and ``label_smoothing``; output logits ``[B, C, *]``, target class
      indices ``[B, *]`` in ``[0, C)`` of any integer dtype, ``-1`` for a missing element
      (or whole numbers in a floating target, with NaN or ``-1`` for a missing element);
    * ``"regression"``: squared error; output and float target ``[B, *]``, NaN for a missing
      element;
    * a callable ``loss(output, target) -> [B]`` returning per-sample losses. Its missing
      labels follow the target's dtype (NaN if floating, -1 otherwise) and are replaced by
      0 before the call, so the callable never sees them; a sample whose target has any
      missing entry does not count (here the elements are whole samples). A callable that
      is an :class:`~torch.nn.Module` (e.g.
      ``nn.CrossEntropyLoss(weight=w, reduction="none")``) is registered under
      ``loss_modules``, so ``.to()`` and ``state_dict()`` include it.

    For binary and regression tasks, an output or a target may have one more dimension, of
    size 1, at position 1 (a one-channel head): ``[B, 1, H, W]`` against ``[B, H, W]`` as
    ``[B, 1]`` against ``[B]``; a multiclass target may likewise be ``[B, 1, *]``. Nothing
    else is broadcast. A task given as a :class:`~dstmtl.Task` also has its ``outputs``
    checked: ``C`` of a multiclass output, dimension 1 of a binary or regression output
    when ``outputs > 1``.

    Losses are computed in at least float32. Tasks of one kind whose outputs have the same
    shape (and, for multiclass, the same options) are computed in one vectorised call: all
    one-value-per-sample binary tasks over ``[B, K_binary]``, all such regression tasks,
    same-sized maps stacked. Nothing here reads tensor values on the host, so the call
    never synchronises with the device. It works under :func:`torch.autocast`: bfloat16 or
    float16 outputs give float32 losses.

    Only ``-1`` marks a missing class. Any other out-of-range index, such as the ``-100``
    that :func:`~torch.nn.functional.cross_entropy` ignores by default, is an error naming
    the task rather than a silent loss of 0 (an ``IndexError`` on the CPU, a device-side
    assertion on CUDA). Class indices given as floats are cut to integers (1.7 becomes
    class 1) without a check, which would read the values on the host;
    :meth:`count_labels` checks them.

    Args:
        tasks: Maps each task name to its kind, its :class:`~dstmtl.Task` (for a dense or
            multi-output task, or loss options) or its per-sample loss, in task order.

    Attributes:
        task_names: The task names, a tuple in task order.
        loss_modules: The per-sample losses that are modules, an ``nn.ModuleDict``.

    Raises:
        ValueError: An unknown kind.
        TypeError: ``tasks`` is not a mapping by task name.

    Example:
        >>> import torch
        >>> from dstmtl import MaskedMultiTaskLoss, Task
        >>> loss = MaskedMultiTaskLoss(
        ...     {"smiling": "binary", "parts": Task("multiclass", outputs=3), "age": "regression"}
        ... )
        >>> nan = float("nan")
        >>> outputs = {
        ...     "smiling": torch.tensor([2.0, -1.0]),
        ...     "parts": torch.zeros(2, 3, 2, 2),  # per-pixel logits of 3 classes, 2 x 2 maps
        ...     "age": torch.tensor([30.0, 41.0]),
        ... }
        >>> targets = {
        ...     "smiling": torch.tensor([1.0, nan]),
        ...     "parts": torch.tensor([[[0, 2], [-1, -1]], [[-1, -1], [-1, -1]]]),
        ...     "age": torch.tensor([nan, nan]),
        ... }
        >>> loss(outputs, targets)  # parts: log 3 over 2 pixels; age has no label: 0, not NaN
        tensor([0.1269, 1.0986, 0.0000])
        >>> loss.label_counts  # samples with at least one labelled element
        tensor([1., 1., 0.])
    """

    def __init__(self, tasks: Mapping[str, TaskSpec]) -> None:
        super().__init__()
        check_mapping(
            tasks,
            what="MaskedMultiTaskLoss: tasks",
            expected="a mapping from task name to kind, Task or per-sample loss",
            fix="e.g. MaskedMultiTaskLoss(dict.fromkeys(names, 'binary')) or "
            "MaskedMultiTaskLoss({'smiling': 'binary', 'parts': Task('multiclass', outputs=8)})",
        )
        self.task_names = check_task_names(tasks.keys(), owner="MaskedMultiTaskLoss")
        self.tasks: dict[str, TaskSpec] = dict(tasks)
        self._specs: list[_Builtin | PerSampleLoss] = []
        for name, spec in tasks.items():
            if isinstance(spec, Task) or (isinstance(spec, str) and spec in KINDS):
                self._specs.append(_Builtin.of(spec))
            elif callable(spec):
                self._specs.append(spec)
            else:
                raise ValueError(
                    f"MaskedMultiTaskLoss: task {name!r} has kind {spec!r}; use one of "
                    f"{list(KINDS)}, a Task or a callable loss(output, target) -> per-sample "
                    "losses"
                )
        # Module losses (CrossEntropyLoss(weight=...)) become submodules, so that .to() moves
        # their buffers and state_dict() saves them.
        self.loss_modules = nn.ModuleDict(
            {name: spec for name, spec in tasks.items() if isinstance(spec, nn.Module)}
        )
        # Option tensors are buffers so that .to() moves them; not persistent, since they
        # come from the tasks given to the constructor. Once one binary task has a pos_weight,
        # every binary task has one (1 by default), so that grouped tasks share one call.
        builtins = [(j, s) for j, s in enumerate(self._specs) if isinstance(s, _Builtin)]
        any_pos_weight = any(builtin.pos_weight is not None for _, builtin in builtins)
        for j, builtin in builtins:
            if builtin.class_weights is not None:
                weights = torch.tensor(builtin.class_weights)
                self.register_buffer(f"class_weights_{j}", weights, persistent=False)
            if any_pos_weight and builtin.kind == "binary":
                value = 1.0 if builtin.pos_weight is None else builtin.pos_weight
                self.register_buffer(f"pos_weight_{j}", torch.tensor(value), persistent=False)
        # One value per sample for every task: such tasks can skip the per-task loop when
        # the targets come as one [B, K] tensor (see _column_losses).
        per_sample = all(
            isinstance(spec, _Builtin)
            and spec.kind != "multiclass"
            and spec.outputs in (None, 1)
            and not isinstance(spec.pos_weight, tuple)
            for spec in self._specs
        )
        self._column_kinds = {s.kind for _, s in builtins} if per_sample else set()
        if len(self._column_kinds) == 2:
            binary = [isinstance(s, _Builtin) and s.kind == "binary" for s in self._specs]
            self.register_buffer("_column_binary", torch.tensor(binary), persistent=False)
        if any_pos_weight and self._column_kinds:
            column_weights = [
                self.get_buffer(f"pos_weight_{j}")
                if hasattr(self, f"pos_weight_{j}")
                else torch.tensor(1.0)
                for j in range(len(self._specs))
            ]
            self.register_buffer(
                "_column_pos_weight", torch.stack(column_weights), persistent=False
            )
        self._label_counts: Tensor | None = None

    @property
    def label_counts(self) -> Tensor:
        """Samples per task with at least one labelled element in the last call.

        A float32 ``[K]`` tensor on the outputs' device: the samples that took part in each
        task's loss (for a callable, the samples without any missing entry), so it means the
        same for every kind and :class:`~dstmtl.metrics.LabelCount` counts alike. Pass it
        to the scheduler with the losses. Reading it before the first call raises
        ``RuntimeError``.
        """
        if self._label_counts is None:
            raise RuntimeError("MaskedMultiTaskLoss.label_counts is available after the first call")
        return self._label_counts

    def forward(
        self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor] | Tensor
    ) -> Tensor:
        """Return the per-task mean losses over labelled elements, shape ``[K]``, in task order.

        A task with no labelled sample in the batch gets exactly 0 and a zero gradient.

        Args:
            outputs: Model outputs by task name (e.g. from :class:`~dstmtl.MultiHeadNet`):
                every task, or a subset, e.g. ``model(x, tasks=scheduler.active_tasks)``. A
                task without an output gets a NaN loss (with no gradient) and a label count
                of 0, which :class:`~dstmtl.TaskDropScheduler` leaves out of its statistics
                and, for a dropped task, out of the update; an active task needs its output.
            targets: Targets by task name (exactly the tasks), or one ``[B, K]`` tensor in
                task order (one value per sample and task). Such a tensor mixing kinds is
                floating: multiclass columns then hold class indices as floats, with NaN or
                ``-1`` for a missing label.

        Raises:
            ValueError: Output names that are not tasks, no output at all, target names that
                differ from the tasks, a
                ``[B, K]`` tensor with the wrong number of columns, a wrong output or target
                shape, or a callable that does not return one value per sample.
            TypeError: ``outputs`` or ``targets`` that are not mappings by task name (for a
                model returning one ``[B, K]`` tensor ``out``, pass ``{name: out[:, j] for
                j, name in enumerate(loss_fn.task_names)}``), a binary or regression target
                that is not floating point (convert it with ``.float()``), or a boolean
                multiclass or class target.
            IndexError: A class index outside ``[0, C)`` other than ``-1`` (on the CPU).
        """
        check_mapping(
            outputs,
            what="MaskedMultiTaskLoss: model outputs",
            expected="a mapping from task name to output",
            fix="for a model returning one [B, K] tensor `out`, pass "
            "{name: out[:, j] for j, name in enumerate(loss_fn.task_names)}; for a list in "
            "task order, dict(zip(loss_fn.task_names, outputs))",
        )
        fast = self._column_losses(outputs, targets)
        if fast is not None:
            losses, self._label_counts = fast
            return losses
        computed = [name for name in self.task_names if name in outputs]
        if not computed or len(computed) < len(outputs):
            check_same_tasks(self.task_names, outputs.keys(), what="model outputs")
        columns = self._target_columns(targets)
        batch = _batch_size(outputs[computed[0]], computed[0])

        per_task: list[Tensor | None] = [None] * len(self.task_names)
        counts: list[Tensor | None] = [None] * len(self.task_names)
        groups: dict[Hashable, _Group] = {}
        for j, (name, spec) in enumerate(zip(self.task_names, self._specs, strict=True)):
            if name not in outputs:
                continue
            output, target = outputs[name], columns[name]
            if isinstance(spec, _Builtin):
                output, target = spec.pair(output, target, name, batch)
                key = spec.group_key(output)
                if key not in groups:
                    groups[key] = _Group(spec.kind)
                groups[key].add(j, name, output, target)
            else:
                target = _per_sample_target(target, name, batch)
                per_task[j], counts[j] = _masked_means(
                    _per_sample_callable(spec, name), output, target
                )
        for group in groups.values():
            means, labelled = self._group_losses(group, targets)
            if len(group.indices) == len(self.task_names):  # one group for all: in task order
                self._label_counts = labelled
                return means
            for column, j in enumerate(group.indices):
                per_task[j], counts[j] = means[column], labelled[column]
        if len(computed) < len(self.task_names):
            # Tasks whose heads did not run (forward(x, tasks=...)): a NaN loss, which the
            # scheduler leaves out of the statistics and of a dropped task's update.
            reference = next(loss for loss in per_task if loss is not None)
            for j, name in enumerate(self.task_names):
                if name not in outputs:
                    per_task[j] = torch.full_like(reference, float("nan"))
                    counts[j] = torch.zeros((), dtype=torch.float32, device=reference.device)
        self._label_counts = torch.stack([c for c in counts if c is not None])
        return torch.stack([loss for loss in per_task if loss is not None])

    def count_labels(self, targets: Mapping[str, Tensor] | Tensor) -> dict[str, int]:
        """Count each task's samples with a labelled element, by the rule of :attr:`label_counts`.

        Meant for a whole training set, e.g. ``LabelCount(loss_fn.count_labels(labels))``:
        unlike :class:`~dstmtl.metrics.LabelCount` given the raw tensor, it knows the task
        kinds, so ``-1`` in a floating multiclass column counts as missing while ``-1`` in a
        regression column is a label, and a dense target counts a sample once. It reads the
        counts on the host, so it synchronises with the device; call it once, not per step.

        Since it reads every label, it also checks the values that :meth:`forward` does not
        check (that would synchronise every step): a binary target outside ``[0, 1]`` (such
        as CelebA's ``-1`` for "no"), a class index that is not a whole number, is negative
        other than ``-1`` or, for a :class:`~dstmtl.Task` with ``outputs=C``, is ``C`` or
        more, and an infinite target raise ``ValueError``.

        Args:
            targets: Targets by task name, or one ``[N, K]`` tensor in task order.
        """
        columns = self._target_columns(targets)
        first = columns[self.task_names[0]]
        if first.dim() == 0:
            raise ValueError(
                f"target of task {self.task_names[0]!r} must have the sample count first, "
                "got a scalar"
            )
        samples = first.shape[0]
        counts: dict[str, int] = {}
        for name, spec in zip(self.task_names, self._specs, strict=True):
            target = _per_sample_target(columns[name], name, samples)
            if isinstance(spec, _Builtin):
                labelled = _labelled_samples(spec.checked_labels(target, name), every=False)
            else:
                labelled = _labelled_samples(_labelled_entries(target), every=True)
            counts[name] = int(labelled.sum())
        return counts

    def _group_losses(
        self, group: _Group, targets: Mapping[str, Tensor] | Tensor
    ) -> tuple[Tensor, Tensor]:
        """Mean losses and labelled sample counts, ``[K]`` each, of a group of tasks.

        The outputs are stacked along dimension 1 (2 for multiclass logits, after the
        classes), so that one call computes the element losses of every task in the group.
        """
        if group.kind == "multiclass":
            return self._multiclass_losses(group)
        output = _stack(group.outputs, dim=1)
        if isinstance(targets, Tensor) and group.indices == list(
            range(group.indices[0], group.indices[-1] + 1)
        ):  # consecutive columns of a [B, K] tensor: a view instead of a copy
            target = targets[:, group.indices[0] : group.indices[-1] + 1]
        else:
            target = _stack(group.targets, dim=1)
        labelled = ~target.isnan()
        dtype = _loss_dtype(output)
        output = output.to(dtype)
        # Missing targets become 0 before the loss sees them, so neither the loss nor its
        # gradient can become NaN; the where below then drops them from the sums.
        safe_target = torch.where(labelled, target, 0.0).to(dtype)
        if group.kind == "binary":
            losses = F.binary_cross_entropy_with_logits(
                output,
                safe_target,
                pos_weight=self._pos_weight(group.indices, output.shape[2:], dtype),
                reduction="none",
            )
        else:
            losses = F.mse_loss(output, safe_target, reduction="none")
        return _reduce(torch.where(labelled, losses, 0.0), labelled)

    def _column_losses(
        self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor] | Tensor
    ) -> tuple[Tensor, Tensor] | None:
        """The mean losses and sample counts of per-sample binary and regression tasks whose
        outputs are all ``[B]`` or all ``[B, 1]`` and whose targets are one ``[B, K]`` tensor,
        in one call over ``[B, K]``; ``None`` where that does not hold.

        The general path checks and reshapes each task on its own, which costs more than the
        loss itself with tens of tasks (a fused head's outputs are ``[B, 1]`` columns).
        """
        num_tasks = len(self.task_names)
        if (
            not self._column_kinds
            or not isinstance(targets, Tensor)
            or not targets.is_floating_point()
            or targets.dim() != 2
            or targets.shape[1] != num_tasks
            or len(outputs) != num_tasks
        ):
            return None
        columns = [outputs.get(name) for name in self.task_names]
        first = columns[0]
        batch = targets.shape[0]
        if not isinstance(first, Tensor) or first.shape not in ((batch,), (batch, 1)):
            return None
        if any(not isinstance(c, Tensor) or c.shape != first.shape for c in columns):
            return None
        tensors = cast("list[Tensor]", columns)
        output = torch.cat(tensors, dim=1) if first.dim() == 2 else torch.stack(tensors, dim=1)
        dtype = _loss_dtype(output)
        output = output.to(dtype)
        labelled = ~targets.isnan()
        safe_target = torch.where(labelled, targets, 0.0).to(dtype)
        if self._column_kinds == {"regression"}:
            element_losses = F.mse_loss(output, safe_target, reduction="none")
        else:
            element_losses = F.binary_cross_entropy_with_logits(
                output, safe_target, pos_weight=self._column_pos_weights(dtype), reduction="none"
            )
            if "regression" in self._column_kinds:
                squared = F.mse_loss(output, safe_target, reduction="none")
                element_losses = torch.where(
                    self.get_buffer("_column_binary"), element_losses, squared
                )
        return _reduce(torch.where(labelled, element_losses, 0.0), labelled)

    def _column_pos_weights(self, dtype: torch.dtype) -> Tensor | None:
        if not hasattr(self, "_column_pos_weight"):
            return None
        return self.get_buffer("_column_pos_weight").to(dtype)

    def _multiclass_losses(self, group: _Group) -> tuple[Tensor, Tensor]:
        output = _stack(group.outputs, dim=2)  # [B, C, K, *]
        target = _stack(group.targets, dim=1)  # [B, K, *]
        dtype = _loss_dtype(output)
        spec = self._specs[group.indices[0]]  # the group shares its options
        assert isinstance(spec, _Builtin)
        weights = (
            None
            if spec.class_weights is None
            else self.get_buffer(f"class_weights_{group.indices[0]}").to(dtype)
        )
        try:
            # ignore_index=-1: missing elements give 0 and no gradient, and any other
            # negative index is an error instead of the silent 0 of the default -100.
            losses = F.cross_entropy(
                output.to(dtype),
                target,
                weight=weights,
                ignore_index=_MISSING_CLASS,
                label_smoothing=spec.label_smoothing,
                reduction="none",
            )
        except IndexError as error:
            raise _class_index_error(group, output.shape[1], error) from error
        labelled = target != _MISSING_CLASS
        if weights is None:
            return _reduce(losses, labelled)
        # As reduction="mean" with weight: divided by the weights of the labelled targets.
        return _reduce(losses, labelled, torch.where(labelled, weights[target.clamp(min=0)], 0.0))

    def _pos_weight(
        self, indices: list[int], shape: Sequence[int], dtype: torch.dtype
    ) -> Tensor | None:
        """The ``pos_weight`` of stacked binary tasks, broadcastable to ``[B, K, *shape]``.

        A task's weight is one number or one per label along dimension 1 of its output.
        """
        if not hasattr(self, f"pos_weight_{indices[0]}"):
            return None
        weights = [self.get_buffer(f"pos_weight_{j}") for j in indices]
        if shape:
            per_label = [shape[0], *[1] * (len(shape) - 1)]
            weights = [w.reshape(-1, *per_label[1:]).expand(per_label) for w in weights]
        return torch.stack(weights).to(dtype)

    def _target_columns(self, targets: Mapping[str, Tensor] | Tensor) -> dict[str, Tensor]:
        if isinstance(targets, Tensor):
            if targets.dim() != 2 or targets.shape[1] != len(self.task_names):
                raise ValueError(
                    f"targets as one tensor must have shape [B, {len(self.task_names)}] "
                    f"(one column per task {list(self.task_names)}), got {tuple(targets.shape)}"
                )
            return {name: targets[:, j] for j, name in enumerate(self.task_names)}
        check_mapping(
            targets,
            what="MaskedMultiTaskLoss: targets",
            expected="a mapping from task name to target or one [B, K] tensor",
            fix="for a list in task order, pass dict(zip(loss_fn.task_names, targets))",
        )
        check_same_tasks(self.task_names, targets.keys(), what="targets")
        return dict(targets)

    def extra_repr(self) -> str:
        return ", ".join(
            f"{name}={spec if isinstance(spec, str | Task) else getattr(spec, '__name__', spec)}"
            for name, spec in self.tasks.items()
        )


@dataclass(frozen=True)
class _Builtin:
    """A built-in kind with its options; ``outputs`` is None for a bare kind string."""

    kind: str
    outputs: int | None = None
    class_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    pos_weight: float | tuple[float, ...] | None = None

    @classmethod
    def of(cls, spec: Task | str) -> _Builtin:
        if isinstance(spec, str):
            return cls(spec)
        # Task stores its options as floats and tuples of floats.
        return cls(
            spec.kind,
            spec.outputs,
            cast("tuple[float, ...] | None", spec.class_weights),
            spec.label_smoothing,
            cast("float | tuple[float, ...] | None", spec.pos_weight),
        )

    def group_key(self, output: Tensor) -> Hashable:
        """Tasks with equal keys are computed in one call."""
        return (self.kind, tuple(output.shape[1:]), self.class_weights, self.label_smoothing)

    def pair(self, output: Tensor, target: Tensor, name: str, batch: int) -> tuple[Tensor, Tensor]:
        """``output`` and ``target`` checked and shaped for the kind's loss, without a sync.

        Binary and regression: both ``[B, *]``, without a size-1 dimension 1. Multiclass:
        ``[B, C, *]`` and int64 ``[B, *]``.
        """
        if output.dim() == 0 or output.shape[0] != batch:
            raise ValueError(
                f"output of task {name!r} must have the batch size {batch} first, "
                f"got shape {tuple(output.shape)}"
            )
        target = _per_sample_target(target, name, batch)
        if self.kind == "multiclass":
            return self._class_pair(output, _class_target(target, name), name)
        target = _float_target(target, name)
        self._check_width(output, name)
        if output.shape == target.shape:
            if output.dim() > 1 and output.shape[1] == 1:
                return output.squeeze(1), target.squeeze(1)
            return output, target
        if _without_channel(output) == target.shape:
            return output.squeeze(1), target
        if _without_channel(target) == output.shape:
            return output, target.squeeze(1)
        raise ValueError(
            f"output {tuple(output.shape)} and target {tuple(target.shape)} of {self.kind} task "
            f"{name!r} must have the same shape [B, *] (one may have an extra size-1 dimension "
            "1, as [B, 1, H, W] against [B, H, W])"
        )

    def _class_pair(self, output: Tensor, target: Tensor, name: str) -> tuple[Tensor, Tensor]:
        if output.dim() < 2:
            raise ValueError(
                f"output of multiclass task {name!r} must be logits of shape [B, C, *], "
                f"got {tuple(output.shape)}"
            )
        self._check_width(output, name)
        expected = output.shape[:1] + output.shape[2:]
        if target.shape == expected:
            return output, target
        if _without_channel(target) == expected:
            return output, target.squeeze(1)
        raise ValueError(
            f"target of multiclass task {name!r} must hold class indices of shape "
            f"{list(expected)} for logits of shape {list(output.shape)} ([B, *] for [B, C, *]), "
            f"got {tuple(target.shape)}"
        )

    def _check_width(self, output: Tensor, name: str) -> None:
        if self.outputs is None or (self.outputs == 1 and self.kind != "multiclass"):
            return  # a bare kind, or one value per element: [B], [B, 1] and [B, H, W] all fit
        if output.dim() < 2 or output.shape[1] != self.outputs:
            raise ValueError(
                f"output of task {name!r} must have {self.outputs} values in dimension 1, as "
                f"its Task(outputs={self.outputs}) says, got shape {tuple(output.shape)}"
            )

    def checked_labels(self, target: Tensor, name: str) -> Tensor:
        """The labelled elements of ``target``, after checking its values (this syncs)."""
        if self.kind == "multiclass":
            _check_class_values(target, name, self.outputs)
            return _class_target(target, name) != _MISSING_CLASS
        target = _float_target(target, name)
        _check_float_values(target, name, binary=self.kind == "binary")
        return ~target.isnan()


@dataclass
class _Group:
    """Tasks of one kind and shape, computed together, in task order."""

    kind: str
    indices: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    targets: list[Tensor] = field(default_factory=list)

    def add(self, index: int, name: str, output: Tensor, target: Tensor) -> None:
        self.indices.append(index)
        self.names.append(name)
        self.outputs.append(output)
        self.targets.append(target)


def _stack(tensors: list[Tensor], dim: int) -> Tensor:
    # One tensor: a view instead of stack's copy.
    return tensors[0].unsqueeze(dim) if len(tensors) == 1 else torch.stack(tensors, dim=dim)


def _without_channel(tensor: Tensor) -> torch.Size | None:
    """The shape of ``tensor`` without its dimension 1 if that has size 1, else None."""
    if tensor.dim() < 2 or tensor.shape[1] != 1:
        return None
    return tensor.shape[:1] + tensor.shape[2:]


def _loss_dtype(output: Tensor) -> torch.dtype:
    # At least float32, as autocast gives these losses anyway: bfloat16 and float16 cannot
    # sum a large batch exactly, and torch < 2.6 has no bfloat16 mse_loss on the CPU.
    return torch.promote_types(output.dtype, torch.float32)


def _reduce(
    losses: Tensor, labelled: Tensor, element_weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per task of ``[B, K, *]`` element losses (0 where missing): the mean and the samples.

    The mean divides by the labelled elements, or by their summed ``element_weights``; the
    samples (float32) are those with a labelled element. A task without any gives 0, with a
    gradient path to its losses.
    """
    samples = _labelled_samples(labelled, every=False, tasks=True)
    dims = [0, *range(2, losses.dim())]
    total = losses.sum(dim=dims)
    if element_weights is not None:
        # Also 0 where all labelled elements weigh 0, where F.cross_entropy gives NaN.
        weight_sums = element_weights.sum(dim=dims)
        present = weight_sums > 0
        return torch.where(present, total, 0.0) / torch.where(present, weight_sums, 1.0), samples
    # One element per sample ([B, K]): the sample counts are the element counts.
    elements = samples if labelled.dim() == 2 else labelled.sum(dim=dims)
    return total / elements.clamp(min=1), samples


def _labelled_samples(labelled: Tensor, *, every: bool, tasks: bool = False) -> Tensor:
    """Per sample (and task, for ``[B, K, *]`` with ``tasks``): labelled elements counted.

    ``every``: a sample counts only if all its elements are labelled, else if any is. With
    ``tasks``, returns the float32 ``[K]`` sample counts instead of the ``[B]`` mask.
    """
    start = 2 if tasks else 1
    if labelled.dim() > start:
        flat = labelled.flatten(start)
        labelled = flat.all(dim=start) if every else flat.any(dim=start)
    return labelled.sum(dim=0, dtype=torch.float32) if tasks else labelled


def _masked_means(
    per_sample: Callable[[Tensor, Tensor], Tensor], outputs: Tensor, targets: Tensor
) -> tuple[Tensor, Tensor]:
    """Mean of a callable's per-sample losses over the samples without a missing entry.

    Missing entries (NaN, or -1 for integer targets) are replaced by 0 before ``per_sample``
    sees them, so neither the loss nor its gradient can become NaN.
    """
    labelled = _labelled_entries(targets)
    losses = per_sample(outputs, torch.where(labelled, targets, torch.zeros_like(targets)))
    samples = _labelled_samples(labelled, every=True)
    losses = torch.where(samples, losses, 0.0)
    counts = samples.sum(dtype=torch.float32)
    return losses.sum(dtype=_loss_dtype(losses)) / counts.clamp(min=1), counts


def _labelled_entries(targets: Tensor) -> Tensor:
    return ~targets.isnan() if targets.is_floating_point() else targets != _MISSING_CLASS


def _per_sample_callable(loss: PerSampleLoss, name: str) -> Callable[[Tensor, Tensor], Tensor]:
    def checked(outputs: Tensor, targets: Tensor) -> Tensor:
        values = loss(outputs, targets)
        if values.shape != targets.shape[:1]:
            raise ValueError(
                f"the loss of task {name!r} must return one value per sample, shape "
                f"({targets.shape[0]},) (use reduction='none'), got {tuple(values.shape)}"
            )
        return values

    return checked


def _per_sample_target(target: Tensor, name: str, batch: int) -> Tensor:
    if target.dim() == 0 or target.shape[0] != batch:
        raise ValueError(
            f"target of task {name!r} must have the batch size {batch} first, "
            f"got shape {tuple(target.shape)}"
        )
    return target


def _check_float_values(target: Tensor, name: str, *, binary: bool) -> None:
    if bool(target.isinf().any()):
        raise ValueError(f"target of task {name!r} holds an infinite value; use NaN for missing")
    if not binary:
        return
    outside = target[(target < 0) | (target > 1)]  # NaN is neither
    if outside.numel():
        raise ValueError(
            f"binary target of task {name!r} holds {torch.unique(outside)[:5].tolist()} outside "
            "[0, 1]; map the labels to 0 and 1 (e.g. (labels + 1) / 2 for -1/1 labels) and "
            "mark a missing one with NaN"
        )


def _check_class_values(target: Tensor, name: str, classes: int | None) -> None:
    if target.is_floating_point():
        labels = target[~target.isnan()]
        bad = labels[(labels < _MISSING_CLASS) | (labels != labels.floor()) | labels.isinf()]
    else:
        labels = _class_target(target, name)
        bad = labels[labels < _MISSING_CLASS]
    if classes is not None:
        bad = torch.cat([bad.to(labels.dtype), labels[labels >= classes]])
    if bad.numel():
        valid = "[0, C)" if classes is None else f"[0, {classes})"
        raise ValueError(
            f"multiclass target of task {name!r} holds {torch.unique(bad)[:5].tolist()}, which are "
            f"not class indices; use whole numbers in {valid}, and -1 or NaN for a missing label"
        )


def _class_index_error(group: _Group, classes: int, error: IndexError) -> IndexError:
    """Name the tasks whose class indices are out of range (an error path: it may sync)."""
    for name, target in zip(group.names, group.targets, strict=True):
        bad = target[(target < _MISSING_CLASS) | (target >= classes)]
        if bad.numel():
            return IndexError(
                f"multiclass target of task {name!r} holds {torch.unique(bad)[:5].tolist()}, "
                f"outside the class indices [0, {classes}) of its {classes} logits; mark a "
                "missing label with -1 (or NaN in a floating target)"
            )
    return IndexError(f"multiclass tasks {group.names}: {error}")


def _batch_size(output: Tensor, name: str) -> int:
    if output.dim() == 0:
        raise ValueError(f"output of task {name!r} must have a batch dimension, got a scalar")
    return output.shape[0]


def _float_target(target: Tensor, name: str) -> Tensor:
    if not target.is_floating_point():
        raise TypeError(
            f"target of task {name!r} must be floating point with NaN for missing labels, "
            f"got {target.dtype}; convert it with .float()"
        )
    return target


def _class_target(target: Tensor, name: str) -> Tensor:
    """``target`` as int64 class indices with -1 for missing, from any real dtype."""
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(
            f"target of task {name!r} must hold class indices (integers, -1 for missing), "
            f"got {target.dtype}"
        )
    if target.is_floating_point():
        # A [B, K] target tensor mixing kinds is floating; class indices then arrive as
        # floats, with NaN or -1 for a missing label.
        target = torch.where(target.isnan(), _MISSING_CLASS, target)
    # int64 for cross_entropy, from any integer width (int8 ... uint8 ... int32).
    return target.long()
