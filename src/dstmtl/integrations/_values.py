"""The scheduler's read-out in the form both frameworks log."""

from __future__ import annotations

from dstmtl.scheduler import TaskDropScheduler


def _framework_log_values(scheduler: TaskDropScheduler) -> dict[str, float]:
    """:meth:`~dstmtl.TaskDropScheduler.log_dict` without ``epoch``: both frameworks log
    their own epoch under that key, Lightning's counted from 0 at the end of the first epoch
    where the scheduler's is 1, so ours would either be overwritten (Hugging Face) or
    contradict the other metrics' rows.
    """
    values = scheduler.log_dict()
    del values["epoch"]
    return values
