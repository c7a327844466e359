r"""Per-kind evaluation over a whole split, counted on the device and read once at the end.

Every labelled *element* counts: one per sample for a per-sample task, one per label or
value for a multi-output one (``[B, L]``, pooled), one per pixel for a dense one
(``[B, C, H, W]`` logits against a ``[B, H, W]`` map), so one code path serves them all.

* binary (logit > 0 is a positive prediction; a label above 0.5 is positive, so soft
  labels are rounded): ``accuracy``, ``balanced_accuracy`` (the mean recall over the
  classes present in the labels, as scikit-learn computes it) and ``f1`` (0 when there is
  no positive label or prediction);
* multiclass (arg-max over dimension 1): ``accuracy`` (pixel accuracy for a dense task) and
  ``miou``, the mean intersection over union from the split's confusion matrix :math:`N`
  (rows: labels, columns: predictions),

  .. math:: \mathrm{mIoU} = \frac{1}{|P|} \sum_{c \in P} \frac{N_{cc}}{\sum_k N_{ck} +
            \sum_k N_{kc} - N_{cc}}

  over the classes :math:`P` that occur in the split's labels or predictions: a class with
  an empty union is left out (it has no IoU), as the NYUv2 segmentation literature does,
  while a class predicted but never labelled counts with IoU 0;
* regression: ``mae`` (the mean absolute depth error for a depth map) and ``rmse``.

Missing labels (NaN, and -1 for a class) do not count. A task with no labelled element in
the split gets NaN for every metric.

The counts are per-task confusion matrices (binary: 2 x 2) filled by ``index_add_`` into
one bin per (label, prediction) pair, and the absolute and squared error sums; they stay on
the device and are read in one transfer at the end. Not ``torch.bincount``: on CUDA it
reads its input's minimum and maximum on the host, two synchronisations per call.
torchmetrics is not used: its ``ignore_index`` is one integer, which cannot mark the NaN
holes of binary and regression targets (and its regression metrics take no mask at all),
its argument validation reads values on the host, and its counting is this same
label x classes + prediction bincount, so it would add a dependency to save a few lines.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from dstmtl.loss import MaskedMultiTaskLoss
from dstmtl.study.config import METRICS, StudyTask

__all__ = ["Targets", "evaluate"]

Targets = Tensor | Mapping[str, Tensor]
"""The targets of a batch, ``[B, K]`` (one column per task, NaN = missing, a class index as a
float), or ``{task: tensor}`` as :class:`~dstmtl.MaskedMultiTaskLoss` takes them (dense
tasks)."""

_MISSING_CLASS = -1


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Targets]],
    tasks: Mapping[str, StudyTask],
    loss_fn: MaskedMultiTaskLoss,
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """The metrics of every task over a split, and its mean loss.

    Args:
        model: Maps a batch's inputs to ``{task: output}`` (a
            :class:`~dstmtl.MultiHeadNet`, or one wrapped in DDP); run in eval mode, then
            put back in the mode it was in.
        batches: ``(inputs, targets)`` pairs, the targets one ``[B, K]`` float tensor (NaN
            for a missing label, a class index as a float with NaN or -1 for a missing one)
            or a dict by task as :class:`~dstmtl.MaskedMultiTaskLoss` takes it (a dense
            multiclass task: ``[B, C, H, W]`` logits and a ``[B, H, W]`` class map, -1 or
            NaN in holes; a depth map: ``[B, 1, H, W]`` or ``[B, H, W]`` against ``[B, H,
            W]``, NaN in holes).
        tasks: The tasks, in the order of the loss's tasks and of the targets' columns.
        loss_fn: The loss over the same tasks; it also checks the shapes of every batch.

    Returns:
        ``({task: {metric: value}}, {task: loss})``: every metric of the task's kind (see
        :data:`~dstmtl.study.config.METRICS`), and the mean of the batch losses weighted
        by the samples labelled in each batch (NaN where none was).

    Raises:
        ValueError: ``tasks`` and the loss's tasks differ, or a task's output does not have
            the elements of its target.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dstmtl import MaskedMultiTaskLoss, MultiHeadNet, Task
        >>> from dstmtl.study import StudyTask
        >>> class Logits(nn.Module):  # the input is the logits: 2 classes on a 1 x 3 map
        ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
        ...         return x
        >>> net = MultiHeadNet(nn.Identity(), {"parts": Logits()})
        >>> logits = torch.tensor([[[[2.0, 0.0, 0.0]], [[0.0, 1.0, 1.0]]]])  # predicts 0, 1, 1
        >>> labels = torch.tensor([[[0, 0, -1]]])  # the last pixel is a hole
        >>> loss_fn = MaskedMultiTaskLoss({"parts": Task("multiclass", outputs=2)})
        >>> tasks = {"parts": StudyTask("multiclass", outputs=2)}
        >>> metrics, _ = evaluate(net, [(logits, {"parts": labels})], tasks, loss_fn)
        >>> metrics["parts"]  # IoU 1/2 for class 0, 0/1 for class 1
        {'accuracy': 0.5, 'miou': 0.25}
    """
    names = list(tasks)
    if tuple(names) != tuple(loss_fn.task_names):
        raise ValueError(
            f"evaluate: the tasks {names} differ from the loss's tasks "
            f"{list(loss_fn.task_names)}; build the loss from the same tasks, in the same order"
        )
    # The split's sums: each loss times its labelled samples, the labelled samples, then
    # each task's counts. They start as the first batch's, so they are born on the device
    # (a blocking copy from the host would synchronise).
    totals: list[Tensor] | None = None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for inputs, targets in batches:
                outputs = model(inputs)
                losses = loss_fn(outputs, targets)
                samples = loss_fn.label_counts.double()
                columns = _columns(targets, names)
                batch = [losses.double() * samples, samples]
                batch += [
                    _counts(tasks[name].kind, outputs[name], columns[name], name) for name in names
                ]
                totals = (
                    batch if totals is None else [t + b for t, b in zip(totals, batch, strict=True)]
                )
    finally:
        model.train(was_training)
    if totals is None:  # no batch at all: nothing labelled
        metrics = {
            name: dict.fromkeys(METRICS[task.kind], math.nan) for name, task in tasks.items()
        }
        return metrics, dict.fromkeys(tasks, math.nan)
    return _read(tasks, totals)


def _read(
    tasks: Mapping[str, StudyTask], totals: list[Tensor]
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """The metrics and mean losses from the split's sums, read in one transfer."""
    values = torch.cat([t.reshape(-1).double() for t in totals]).cpu()
    k = len(tasks)
    losses = (values[:k] / values[k : 2 * k]).tolist()  # 0 / 0 is NaN: nothing labelled
    metrics: dict[str, dict[str, float]] = {}
    start = 2 * k
    for (name, task), counts in zip(tasks.items(), totals[2:], strict=True):
        size = counts.numel()
        metrics[name] = _metrics(task.kind, values[start : start + size].reshape(counts.shape))
        start += size
    return metrics, dict(zip(tasks, losses, strict=True))


def _metrics(kind: str, counts: Tensor) -> dict[str, float]:
    """A task's metrics from its confusion matrix or its error sums (NaN if none labelled)."""
    if kind == "regression":
        absolute, squared, labelled = counts.tolist()
        if not labelled:
            return {"mae": math.nan, "rmse": math.nan}
        return {"mae": absolute / labelled, "rmse": math.sqrt(squared / labelled)}
    total = float(counts.sum())
    if not total:
        return dict.fromkeys(METRICS[kind], math.nan)
    hits = counts.diagonal()
    accuracy = float(hits.sum()) / total
    if kind == "binary":
        (tn, fp), (fn, tp) = counts.tolist()
        positives, negatives = tp + fn, tn + fp
        recalls = [tp / positives] if positives else []
        recalls += [tn / negatives] if negatives else []
        return {
            "accuracy": accuracy,
            "balanced_accuracy": sum(recalls) / len(recalls),
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        }
    unions = counts.sum(dim=0) + counts.sum(dim=1) - hits
    present = unions > 0
    return {"accuracy": accuracy, "miou": float((hits[present] / unions[present]).mean())}


def _columns(targets: Targets, names: list[str]) -> Mapping[str, Tensor]:
    # The loss has checked the columns or the names already.
    if isinstance(targets, Tensor):
        return {name: targets[:, j] for j, name in enumerate(names)}
    return targets


def _counts(kind: str, output: Tensor, target: Tensor, name: str) -> Tensor:
    """One batch's counts for a task: a ``[C, C]`` confusion matrix (binary: C = 2) or the
    sums of absolute and squared errors and the labelled elements (regression)."""
    if kind == "multiclass":
        predicted, labels = _same_elements(output.argmax(dim=1), target, name)
        if labels.is_floating_point():  # a column of a [B, K] tensor: NaN or -1 missing
            labels = torch.nan_to_num(labels, nan=_MISSING_CLASS)
        # Cut to whole classes as the loss does (1.7 is class 1).
        labels = labels.long()
        return _confusion(labels, predicted, labels != _MISSING_CLASS, output.shape[1])
    value, truth = _same_elements(output, target, name)
    labelled = ~truth.isnan()
    if kind == "binary":
        return _confusion((truth > 0.5).long(), (value > 0).long(), labelled, 2)
    error = torch.where(labelled, value.double() - truth.double(), 0.0)
    return torch.stack([error.abs().sum(), error.square().sum(), labelled.sum().double()])


def _confusion(truth: Tensor, predicted: Tensor, labelled: Tensor, classes: int) -> Tensor:
    """The ``[C, C]`` counts of (label, prediction) pairs over the labelled elements."""
    bins = classes * classes
    # Missing elements go to one extra bin, dropped after: no data-dependent shape, no sync.
    index = torch.where(labelled, truth * classes + predicted, bins)
    counts = torch.zeros(bins + 1, dtype=torch.int64, device=index.device)
    counts.index_add_(0, index, torch.ones_like(index))
    return counts[:bins].reshape(classes, classes)


def _same_elements(output: Tensor, target: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """``output`` and ``target`` flattened, once their shapes agree as the loss wants them:
    equal, or one of them with an extra size-1 dimension 1."""
    fits = (
        output.shape == target.shape
        or _without_channel(output) == target.shape
        or _without_channel(target) == output.shape
    )
    if not fits:
        raise ValueError(
            f"evaluate: the output of task {name!r} gives elements of shape "
            f"{tuple(output.shape)} for a target of shape {tuple(target.shape)}; give one "
            "prediction per labelled element ([B, *] or [B, 1, *] against [B, *], and "
            "[B, C, *] logits against [B, *] classes)"
        )
    return output.reshape(-1), target.reshape(-1)


def _without_channel(tensor: Tensor) -> torch.Size | None:
    """The shape of ``tensor`` without its dimension 1 if that has size 1, else None."""
    if tensor.dim() < 2 or tensor.shape[1] != 1:
        return None
    return tensor.shape[:1] + tensor.shape[2:]
