"""The scheduler's read-out as flat ``name -> float`` pairs, the form every logger takes."""

from __future__ import annotations

from dstmtl.scheduler import TaskDropScheduler


def _log_values(scheduler: TaskDropScheduler) -> dict[str, float]:
    """Keep probabilities, gates, terms, epoch losses, label counts and loss weights per task.

    Keys: ``keep_probability/<task>``, ``gate/<task>`` (1.0 kept, 0.0 dropped),
    ``term/<metric>/<task>``, ``epoch_loss/<task>``, ``label_count/<task>``,
    ``loss_weight/<task>`` and ``epoch`` (completed :meth:`~TaskDropScheduler.step` calls).
    """
    per_task = {
        "keep_probability": scheduler.keep_probabilities,
        "gate": {task: float(gate) for task, gate in scheduler.gates.items()},
        **{f"term/{metric}": values for metric, values in scheduler.terms.items()},
        "epoch_loss": scheduler.epoch_losses,
        "label_count": scheduler.label_counts,
        "loss_weight": scheduler.loss_weights,
    }
    values = {
        f"{key}/{task}": float(value)
        for key, by_task in per_task.items()
        for task, value in by_task.items()
    }
    values["epoch"] = float(scheduler.epoch)
    return values


def _framework_log_values(scheduler: TaskDropScheduler) -> dict[str, float]:
    """:func:`_log_values` without ``epoch``: both frameworks log their own epoch under that
    key, Lightning's counted from 0 at the end of the first epoch where the scheduler's is 1,
    so ours would either be overwritten (Hugging Face) or contradict the other metrics' rows.
    """
    values = _log_values(scheduler)
    del values["epoch"]
    return values
