from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dstmtl._validation import check_mapping, check_same_tasks, check_task_names
from dstmtl.task import TaskKind

PerSampleLoss = Callable[[Tensor, Tensor], Tensor]
TaskSpec = TaskKind | PerSampleLoss

_KINDS: tuple[str, ...] = ("binary", "multiclass", "regression")
_MISSING_CLASS = -1


class MaskedMultiTaskLoss(nn.Module):
    r"""Per-task mean losses over the labelled samples only.

    For task :math:`j` with labelled samples :math:`S_j` in the batch,

    .. math::

        L_j = \frac{1}{\max(1, |S_j|)} \sum_{i \in S_j} \ell_j(\hat y_{ij}, y_{ij})

    so a task with no labelled sample gives exactly 0, keeps a gradient path to its head
    (every parameter is used, as :class:`~torch.nn.parallel.DistributedDataParallel`
    requires) and is never NaN. A missing label is NaN for ``"binary"`` and
    ``"regression"`` targets and ``-1`` (or NaN in a floating tensor) for ``"multiclass"``
    targets.

    The kinds and their per-sample losses :math:`\ell_j`:

    * ``"binary"``: :func:`~torch.nn.functional.binary_cross_entropy_with_logits`; output
      ``[B]`` or ``[B, 1]`` logits, float target in ``{0, 1}`` (soft targets work too);
    * ``"multiclass"``: :func:`~torch.nn.functional.cross_entropy`; output ``[B, C]``
      logits, class index in ``[0, C)`` (integer, or a whole number in a floating ``[B, K]``
      target that mixes kinds);
    * ``"regression"``: squared error; output ``[B]`` or ``[B, 1]``, float target;
    * a callable ``loss(output, target) -> [B]`` returning per-sample losses
      (``reduction="none"``). Its missing labels follow the target's dtype (NaN if
      floating, -1 otherwise) and are replaced by 0 before the call, so the callable never
      sees them; a sample whose target has any missing entry does not count. A callable
      that is an :class:`~torch.nn.Module` (e.g. ``nn.CrossEntropyLoss(weight=w,
      reduction="none")``) is registered under ``loss_modules``, so ``.to()`` and
      ``state_dict()`` include it.

    Only ``-1`` marks a missing class. Any other negative index, such as the ``-100`` that
    :func:`~torch.nn.functional.cross_entropy` ignores by default, is an error rather than a
    silent loss of 0: an ``IndexError`` on the CPU, a device-side assertion on CUDA. Class
    indices given as floats are cut to integers (1.7 becomes class 1) without a check,
    which would read the values on the host; :meth:`count_labels` checks them.

    All binary tasks are computed in one vectorised call over ``[B, K_binary]``, and so are
    all regression tasks. Nothing here reads tensor values on the host, so the call never
    synchronises with the device. It works under :func:`torch.autocast`: the means are
    summed and divided in at least float32, so bfloat16 or float16 outputs give float32
    losses.

    Args:
        tasks: Maps each task name to its kind or its per-sample loss, in task order.

    Attributes:
        task_names: The task names, a tuple in task order.
        loss_modules: The per-sample losses that are modules, an ``nn.ModuleDict``.

    Raises:
        ValueError: An unknown kind.
        TypeError: ``tasks`` is not a mapping by task name.

    Example:
        >>> import torch
        >>> from dstmtl import MaskedMultiTaskLoss
        >>> loss = MaskedMultiTaskLoss({"smiling": "binary", "age": "regression"})
        >>> outputs = {"smiling": torch.tensor([2.0, -1.0]), "age": torch.tensor([30.0, 41.0])}
        >>> targets = torch.tensor([[1.0, float("nan")], [float("nan"), float("nan")]])
        >>> loss(outputs, targets)  # age has no label: 0, not NaN
        tensor([0.1269, 0.0000])
        >>> loss.label_counts
        tensor([1., 0.])
    """

    def __init__(self, tasks: Mapping[str, TaskSpec]) -> None:
        super().__init__()
        check_mapping(
            tasks,
            what="MaskedMultiTaskLoss: tasks",
            expected="a mapping from task name to kind or per-sample loss",
            fix="e.g. MaskedMultiTaskLoss(dict.fromkeys(names, 'binary')) or "
            "MaskedMultiTaskLoss({'smiling': 'binary', 'age': 'regression'})",
        )
        self.task_names = check_task_names(tasks.keys(), owner="MaskedMultiTaskLoss")
        for name, spec in tasks.items():
            if not callable(spec) and spec not in _KINDS:
                raise ValueError(
                    f"MaskedMultiTaskLoss: task {name!r} has kind {spec!r}; use one of "
                    f"{list(_KINDS)} or a callable loss(output, target) -> per-sample losses"
                )
        self.tasks: dict[str, TaskSpec] = dict(tasks)
        # Module losses (CrossEntropyLoss(weight=...)) become submodules, so that .to() moves
        # their buffers and state_dict() saves them.
        self.loss_modules = nn.ModuleDict(
            {name: spec for name, spec in tasks.items() if isinstance(spec, nn.Module)}
        )
        self._binary = [j for j, spec in enumerate(tasks.values()) if spec == "binary"]
        self._regression = [j for j, spec in enumerate(tasks.values()) if spec == "regression"]
        self._label_counts: Tensor | None = None

    @property
    def label_counts(self) -> Tensor:
        """Labelled samples per task in the last call, a float32 ``[K]`` tensor.

        It is on the outputs' device; pass it to the scheduler with the losses. Reading it
        before the first call raises ``RuntimeError``.
        """
        if self._label_counts is None:
            raise RuntimeError("MaskedMultiTaskLoss.label_counts is available after the first call")
        return self._label_counts

    def forward(
        self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor] | Tensor
    ) -> Tensor:
        """Return the per-task mean losses over labelled samples, shape ``[K]``, in task order.

        A task with no labelled sample in the batch gets exactly 0 and a zero gradient.

        Args:
            outputs: Model outputs by task name (e.g. from :class:`~dstmtl.MultiHeadNet`),
                exactly the tasks.
            targets: Targets by task name (exactly the tasks), or one ``[B, K]`` tensor in
                task order. Such a tensor mixing kinds is floating: multiclass columns then
                hold class indices as floats, with NaN or ``-1`` for a missing label.

        Raises:
            ValueError: Task names that differ from the outputs' or the targets', a
                ``[B, K]`` tensor with the wrong number of columns, a wrong output or target
                shape, or a callable that does not return one value per sample.
            TypeError: ``outputs`` or ``targets`` that are not mappings by task name (for a
                model returning one ``[B, K]`` tensor ``out``, pass ``{name: out[:, j] for
                j, name in enumerate(loss_fn.task_names)}``), a binary or regression target
                that is not floating point (convert it with ``.float()``), or a boolean
                multiclass target.
        """
        check_mapping(
            outputs,
            what="MaskedMultiTaskLoss: model outputs",
            expected="a mapping from task name to output",
            fix="for a model returning one [B, K] tensor `out`, pass "
            "{name: out[:, j] for j, name in enumerate(loss_fn.task_names)}; for a list in "
            "task order, dict(zip(loss_fn.task_names, outputs))",
        )
        check_same_tasks(self.task_names, outputs.keys(), what="model outputs")
        columns = self._target_columns(targets)
        batch = _batch_size(outputs[self.task_names[0]], self.task_names[0])

        per_task: list[Tensor | None] = [None] * len(self.task_names)
        counts: list[Tensor | None] = [None] * len(self.task_names)
        for indices, per_sample in ((self._binary, _binary_losses), (self._regression, _squared)):
            if indices:
                names = [self.task_names[j] for j in indices]
                out = torch.stack([_scalar_output(outputs[n], n, batch) for n in names], dim=1)
                tgt = _group_targets(targets, columns, indices, names, batch)
                means, labelled = _masked_means(per_sample, out, tgt)
                if len(indices) == len(self.task_names):  # one kind for all: already in order
                    self._label_counts = labelled
                    return means
                for column, j in enumerate(indices):
                    per_task[j], counts[j] = means[column], labelled[column]
        for j, (name, spec) in enumerate(self.tasks.items()):
            if spec == "multiclass":
                out, tgt = outputs[name], _class_target(columns[name], name, batch)
                _check_multiclass_output(out, name, batch)
                per_task[j], counts[j] = _masked_means(_cross_entropy, out, tgt)
            elif callable(spec):
                target = _per_sample_target(columns[name], name, batch)
                per_task[j], counts[j] = _masked_means(
                    _per_sample_callable(spec, name), outputs[name], target
                )
        self._label_counts = torch.stack([c for c in counts if c is not None])
        return torch.stack([loss for loss in per_task if loss is not None])

    def count_labels(self, targets: Mapping[str, Tensor] | Tensor) -> dict[str, int]:
        """Count the labelled samples of each task, with the same rule as :meth:`forward`.

        Meant for a whole training set, e.g. ``LabelCount(loss_fn.count_labels(labels))``:
        unlike :class:`~dstmtl.metrics.LabelCount` given the raw tensor, it knows the task
        kinds, so ``-1`` in a floating multiclass column counts as missing while ``-1`` in a
        regression column is a label. It reads the counts on the host, so it synchronises
        with the device; call it once, not per step.

        Since it reads every label, it also checks the values that :meth:`forward` does not
        check (that would synchronise every step): a binary target outside ``[0, 1]`` (such
        as CelebA's ``-1`` for "no"), a class index that is not a whole number or is
        negative other than ``-1``, and an infinite target raise ``ValueError``.

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
        for name, spec in self.tasks.items():
            if spec == "multiclass":
                target = _class_target(columns[name], name, samples)
                _check_class_values(columns[name], name)
            elif callable(spec):
                target = _per_sample_target(columns[name], name, samples)
            else:
                target = _float_target(columns[name], name, samples)
                _check_float_values(target, name, binary=spec == "binary")
            counts[name] = int(_labelled_samples(_labelled_entries(target)).sum())
        return counts

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
            f"{name}={spec if isinstance(spec, str) else getattr(spec, '__name__', spec)}"
            for name, spec in self.tasks.items()
        )


def _masked_means(
    per_sample: Callable[[Tensor, Tensor], Tensor],
    outputs: Tensor,
    targets: Tensor,
) -> tuple[Tensor, Tensor]:
    """Mean of ``per_sample`` over labelled entries per column, and the labelled counts.

    ``targets`` is ``[B]`` or ``[B, K]``; missing entries (NaN, or -1 for integer targets) are
    replaced by 0 before ``per_sample`` sees them, so neither the loss nor its gradient can
    become NaN, and masked out of the sums.
    """
    labelled = _labelled_entries(targets)
    safe_targets = torch.where(labelled, targets, torch.zeros_like(targets))
    losses = per_sample(outputs, safe_targets)
    if labelled.shape != losses.shape:
        labelled = _labelled_samples(labelled)
    losses = torch.where(labelled, losses, torch.zeros_like(losses))
    # At least float32: bfloat16 and float16 cannot count or sum a large batch exactly.
    dtype = torch.promote_types(losses.dtype, torch.float32)
    counts = labelled.sum(dim=0).to(torch.float32)
    return losses.sum(dim=0, dtype=dtype) / counts.clamp(min=1), counts


def _labelled_entries(targets: Tensor) -> Tensor:
    return ~targets.isnan() if targets.is_floating_point() else targets != _MISSING_CLASS


def _labelled_samples(labelled_entries: Tensor) -> Tensor:
    """``[B]``: a sample whose target has any missing entry does not count as labelled."""
    return labelled_entries.reshape(labelled_entries.shape[0], -1).all(dim=1)


def _binary_losses(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(outputs, targets.to(outputs.dtype), reduction="none")


def _squared(outputs: Tensor, targets: Tensor) -> Tensor:
    # At least float32, as autocast gives mse_loss anyway; torch < 2.6 has no bfloat16
    # mse_loss on the CPU.
    dtype = torch.promote_types(outputs.dtype, torch.float32)
    return F.mse_loss(outputs.to(dtype), targets.to(dtype), reduction="none")


def _cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    # Missing labels (-1) were replaced by 0 already; ignore_index=-1 makes any other negative
    # index an error instead of the silent 0 loss of the default ignore_index=-100.
    return F.cross_entropy(outputs, targets, reduction="none", ignore_index=_MISSING_CLASS)


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


def _group_targets(
    targets: Mapping[str, Tensor] | Tensor,
    columns: Mapping[str, Tensor],
    indices: list[int],
    names: list[str],
    batch: int,
) -> Tensor:
    """The ``[B, len(indices)]`` targets of a group of tasks, checked.

    Consecutive columns of a ``[B, K]`` target tensor are sliced as a view; anything else
    is stacked column by column.
    """
    checked = [_float_target(columns[name], name, batch) for name in names]
    if isinstance(targets, Tensor) and indices == list(range(indices[0], indices[-1] + 1)):
        return targets[:, indices[0] : indices[-1] + 1]
    return torch.stack(checked, dim=1)


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


def _check_class_values(target: Tensor, name: str) -> None:
    if target.is_floating_point():
        labels = target[~target.isnan()]
        bad = labels[(labels < _MISSING_CLASS) | (labels != labels.floor()) | labels.isinf()]
    else:
        bad = target[target < _MISSING_CLASS]
    if bad.numel():
        raise ValueError(
            f"multiclass target of task {name!r} holds {torch.unique(bad)[:5].tolist()}, which are "
            "not class indices; use whole numbers in [0, C), and -1 or NaN for a missing label"
        )


def _batch_size(output: Tensor, name: str) -> int:
    if output.dim() == 0:
        raise ValueError(f"output of task {name!r} must have a batch dimension, got a scalar")
    return output.shape[0]


def _scalar_output(output: Tensor, name: str, batch: int) -> Tensor:
    if output.shape not in ((batch,), (batch, 1)):
        raise ValueError(
            f"output of task {name!r} must have shape [{batch}] or [{batch}, 1] (one value "
            f"per sample), got {tuple(output.shape)}"
        )
    return output.reshape(batch)


def _float_target(target: Tensor, name: str, batch: int) -> Tensor:
    if not target.is_floating_point():
        raise TypeError(
            f"target of task {name!r} must be floating point with NaN for missing labels, "
            f"got {target.dtype}; convert it with .float()"
        )
    if target.shape not in ((batch,), (batch, 1)):
        raise ValueError(
            f"target of task {name!r} must have shape [{batch}] or [{batch}, 1], "
            f"got {tuple(target.shape)}"
        )
    return target.reshape(batch)


def _class_target(target: Tensor, name: str, batch: int) -> Tensor:
    if target.is_floating_point():
        # A [B, K] target tensor mixing kinds is floating; class indices then arrive as
        # floats, with NaN or -1 for a missing label.
        target = torch.where(target.isnan(), _MISSING_CLASS, target).long()
    elif target.dtype == torch.bool or target.is_complex():
        raise TypeError(
            f"target of task {name!r} must hold class indices (integers, -1 for missing), "
            f"got {target.dtype}"
        )
    if target.shape not in ((batch,), (batch, 1)):
        raise ValueError(
            f"target of task {name!r} must have shape [{batch}] (class indices), "
            f"got {tuple(target.shape)}"
        )
    return target.reshape(batch)


def _check_multiclass_output(output: Tensor, name: str, batch: int) -> None:
    if output.dim() != 2 or output.shape[0] != batch:
        raise ValueError(
            f"output of multiclass task {name!r} must be logits of shape [{batch}, C], "
            f"got {tuple(output.shape)}"
        )
