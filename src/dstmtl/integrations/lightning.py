"""PyTorch Lightning: step, checkpoint and log a :class:`~dstmtl.TaskDropScheduler`.

Needs the ``lightning`` package (``pip install 'dstmtl[lightning]'``); tested with
``lightning`` 2.4.0 and 2.6.6.
"""

from __future__ import annotations

from typing import Any

from dstmtl.integrations._values import _framework_log_values
from dstmtl.scheduler import TaskDropScheduler

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - the message is tested in a fresh import
    raise ImportError(
        "dstmtl.integrations.lightning needs PyTorch Lightning (the `lightning` package): "
        "pip install 'dstmtl[lightning]'"
    ) from error

__all__ = ["TaskDropCallback"]


class TaskDropCallback(pl.Callback):
    """Ends each training epoch with ``scheduler.step()`` and keeps the scheduler in checkpoints.

    The :class:`~lightning.pytorch.LightningModule` applies the scheduler to its per-task
    losses in ``training_step`` (``return self.scheduler(losses, loss_fn.label_counts)``);
    this callback does the rest:

    * at the end of each training epoch, before checkpoint callbacks run, it calls
      :meth:`~dstmtl.TaskDropScheduler.step` and logs the keep probabilities, gates, terms,
      epoch losses, label counts and loss weights through the module's logger
      (``pl_module.log_dict``) under ``keep_probability/<task>``, ``gate/<task>``,
      ``term/<metric>/<task>``, ``epoch_loss/<task>``, ``label_count/<task>`` and
      ``loss_weight/<task>``, so they land in whatever logger the trainer has;
    * its ``state_dict`` is the scheduler's, so Lightning saves it in every checkpoint and
      ``Trainer.fit(..., ckpt_path=...)`` restores it, gates and random state included.

    Args:
        scheduler: The scheduler the module's ``training_step`` calls.

    Example:
        >>> import lightning.pytorch as pl
        >>> from dstmtl import TaskDropScheduler
        >>> from dstmtl.integrations.lightning import TaskDropCallback
        >>> from dstmtl.metrics import Constant, TaskIncompleteness
        >>> scheduler = TaskDropScheduler(["a", "b"], [TaskIncompleteness(), Constant()])
        >>> trainer = pl.Trainer(callbacks=[TaskDropCallback(scheduler)], logger=False,
        ...                      accelerator="cpu", enable_progress_bar=False,
        ...                      enable_checkpointing=False, enable_model_summary=False)
    """

    def __init__(self, scheduler: TaskDropScheduler) -> None:
        if not isinstance(scheduler, TaskDropScheduler):
            raise TypeError(
                f"TaskDropCallback expects a dstmtl.TaskDropScheduler, got "
                f"{type(scheduler).__name__}; pass the scheduler your training_step calls"
            )
        self.scheduler = scheduler

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.scheduler.step()
        pl_module.log_dict(_framework_log_values(self.scheduler), on_step=False, on_epoch=True)

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)
