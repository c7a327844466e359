"""Per-kind evaluation over a whole split, counted on the device and read once at the end.

* binary (logit > 0 is positive): accuracy, balanced accuracy (mean recall over the classes
  present, as scikit-learn computes it) and F1;
* multiclass (arg-max): accuracy;
* regression: MAE and RMSE.

Only labelled samples count (NaN targets, and -1 for classes, are missing). A task with no
labelled sample in the split gets NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from dstmtl.loss import MaskedMultiTaskLoss
from dstmtl.multihead import MultiHeadNet
from dstmtl.study.config import StudyTask

__all__ = ["evaluate", "metrics_from_sums"]

# Columns of the per-task sums: binary TP, FP, FN, TN; multiclass correct, labelled;
# regression |error| sum, squared error sum, labelled.
_SUMS = 4


def evaluate(
    model: MultiHeadNet,
    batches: Iterable[tuple[Tensor, Tensor]],
    tasks: Mapping[str, StudyTask],
    loss_fn: MaskedMultiTaskLoss,
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """The metrics of every task and its mean loss over the labelled samples of a split."""
    names = list(tasks)
    model.eval()
    sums = torch.zeros(len(names), _SUMS, dtype=torch.float64)
    loss_sums = torch.zeros(len(names), dtype=torch.float64)
    labelled_total = torch.zeros(len(names), dtype=torch.float64)
    with torch.no_grad():
        for inputs, targets in batches:
            if sums.device != targets.device:  # kept on the data's device until the end
                sums, loss_sums, labelled_total = (
                    t.to(targets.device) for t in (sums, loss_sums, labelled_total)
                )
            outputs = model(inputs)
            losses = loss_fn(outputs, targets)
            counts = loss_fn.label_counts.to(torch.float64)
            loss_sums += losses.double() * counts
            labelled_total += counts
            for j, name in enumerate(names):
                sums[j] += _batch_sums(tasks[name].kind, outputs[name], targets[:, j])
    model.train()
    values = sums.cpu()
    loss_means = (loss_sums / labelled_total).cpu().tolist()
    metrics = {name: metrics_from_sums(tasks[name].kind, values[j]) for j, name in enumerate(names)}
    return metrics, dict(zip(names, loss_means, strict=True))


def metrics_from_sums(kind: str, sums: Tensor) -> dict[str, float]:
    """The metrics of one task from its column sums (NaN where nothing was labelled)."""
    s = [float(value) for value in sums.tolist()]
    if kind == "binary":
        tp, fp, fn, tn = s
        labelled = tp + fp + fn + tn
        positives, negatives = tp + fn, tn + fp
        recalls = [tp / positives] if positives else []
        recalls += [tn / negatives] if negatives else []
        return {
            "accuracy": (tp + tn) / labelled if labelled else math.nan,
            "balanced_accuracy": sum(recalls) / len(recalls) if recalls else math.nan,
            "f1": 2 * tp / (2 * tp + fp + fn)
            if 2 * tp + fp + fn
            else (0.0 if labelled else math.nan),
        }
    if kind == "multiclass":
        correct, labelled = s[0], s[1]
        return {"accuracy": correct / labelled if labelled else math.nan}
    absolute, squared, labelled = s[0], s[1], s[2]
    if not labelled:
        return {"mae": math.nan, "rmse": math.nan}
    return {"mae": absolute / labelled, "rmse": math.sqrt(squared / labelled)}


def _batch_sums(kind: str, output: Tensor, target: Tensor) -> Tensor:
    sums = torch.zeros(_SUMS, dtype=torch.float64, device=output.device)
    if kind == "multiclass":
        labelled = ~target.isnan() & (target >= 0)
        predicted = output.argmax(dim=-1)
        correct = labelled & (predicted == torch.nan_to_num(target, nan=-1).long())
        sums[0], sums[1] = correct.sum(), labelled.sum()
        return sums
    value = output.reshape(target.shape[0], -1)[:, 0].double()
    labelled = ~target.isnan()
    truth = torch.nan_to_num(target.double())
    if kind == "binary":
        predicted, positive = value > 0, truth == 1
        sums[0] = (labelled & predicted & positive).sum()
        sums[1] = (labelled & predicted & ~positive).sum()
        sums[2] = (labelled & ~predicted & positive).sum()
        sums[3] = (labelled & ~predicted & ~positive).sum()
        return sums
    error = torch.where(labelled, value - truth, torch.zeros_like(value))
    sums[0], sums[1], sums[2] = error.abs().sum(), error.square().sum(), labelled.sum()
    return sums
