"""Hugging Face ``Trainer``: a :class:`~dstmtl.TaskDropScheduler` in the loss, stepped,
checkpointed and logged.

Needs ``transformers`` and ``accelerate`` (``pip install 'dstmtl[huggingface]'``); tested
with ``transformers`` 4.48.3, 4.51.3, 4.57.6 and 5.25.0, and ``accelerate`` 1.3.0 and 1.16.0.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dstmtl.integrations._values import _framework_log_values
from dstmtl.loss import MaskedMultiTaskLoss
from dstmtl.scheduler import TaskDropScheduler

try:
    from transformers import (
        Trainer,
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as error:  # pragma: no cover - the message is tested in a fresh import
    raise ImportError(
        "dstmtl.integrations.huggingface needs Hugging Face transformers and accelerate: "
        "pip install 'dstmtl[huggingface]'"
    ) from error

__all__ = ["SCHEDULER_STATE_FILE", "TaskDropCallback", "TaskDropTrainer"]

SCHEDULER_STATE_FILE = "task_drop_scheduler.pt"
"""The scheduler's ``state_dict`` in each checkpoint folder (``torch.save``)."""


class TaskDropCallback(TrainerCallback):
    """Ends each epoch with ``scheduler.step()`` and saves the scheduler with each checkpoint.

    :class:`TaskDropTrainer` adds one for you. Add it yourself to another ``Trainer`` whose
    ``compute_loss`` applies the scheduler to the per-task losses:

    * ``on_epoch_end``: :meth:`~dstmtl.TaskDropScheduler.step`, then ``log`` (e.g.
      ``trainer.log``, which hands the values to every reporting integration) of
      ``keep_probability/<task>``, ``gate/<task>``, ``term/<metric>/<task>``,
      ``epoch_loss/<task>``, ``label_count/<task>`` and ``loss_weight/<task>``;
    * ``on_save``: the scheduler's ``state_dict`` into the checkpoint folder, as
      :data:`SCHEDULER_STATE_FILE`;
    * resuming: :meth:`load_checkpoint` restores it. Training that starts past step 0
      without it raises :class:`RuntimeError`, since a scheduler back at its warm-up epoch
      next to a resumed model would silently train another schedule.

    Args:
        scheduler: The scheduler the loss calls.
        log: Where the read-out goes after each ``step()``; ``None`` logs nothing.
    """

    def __init__(
        self, scheduler: TaskDropScheduler, log: Callable[[dict[str, float]], None] | None = None
    ) -> None:
        if not isinstance(scheduler, TaskDropScheduler):
            raise TypeError(
                f"TaskDropCallback expects a dstmtl.TaskDropScheduler, got "
                f"{type(scheduler).__name__}; pass the scheduler your loss calls"
            )
        self.scheduler = scheduler
        self.log = log
        self._restored = False

    def load_checkpoint(self, checkpoint: str | os.PathLike[str]) -> None:
        """Restore the scheduler from a checkpoint folder saved with this callback."""
        path = Path(checkpoint) / SCHEDULER_STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: the checkpoint {str(checkpoint)!r} was not saved with "
                "dstmtl's TaskDropCallback, so the scheduler's state cannot be restored; resume "
                "from a checkpoint written while the callback was in the trainer"
            )
        self.scheduler.load_state_dict(torch.load(path, weights_only=True))
        self._restored = True

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step > 0 and not self._restored:
            raise RuntimeError(
                f"training resumes at step {state.global_step} but the TaskDropScheduler was not "
                "restored; call TaskDropCallback.load_checkpoint(checkpoint) before "
                "trainer.train(resume_from_checkpoint=checkpoint), or use TaskDropTrainer, "
                "which does it"
            )
        self._restored = False

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.scheduler.step()
        if self.log is not None:
            self.log(_framework_log_values(self.scheduler))

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not args.should_save:
            return
        folder = Path(args.output_dir or "") / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():
            raise RuntimeError(
                f"TaskDropCallback cannot save the scheduler: the checkpoint folder {folder} does "
                "not exist (hyperparameter search runs save elsewhere and are not supported)"
            )
        torch.save(self.scheduler.state_dict(), folder / SCHEDULER_STATE_FILE)


class TaskDropTrainer(Trainer):
    r"""A ``Trainer`` whose training loss is :math:`\sum_j g_j w_j L_j` over per-task losses.

    ``compute_loss`` pops ``labels`` from the batch, runs the model on the rest, gets the
    per-task losses ``[K]`` from ``loss_fn(outputs, labels)`` and returns
    ``scheduler(losses, label_counts)`` (the label counts when ``loss_fn`` is a
    :class:`~dstmtl.MaskedMultiTaskLoss`). In evaluation it returns the plain sum of the
    per-task losses and leaves the scheduler's statistics alone. A :class:`TaskDropCallback`
    logging through ``Trainer.log`` steps the scheduler at each epoch end and saves it with each
    checkpoint; ``train(resume_from_checkpoint=...)`` restores it.

    Args:
        *args: As for ``Trainer``.
        scheduler: The :class:`~dstmtl.TaskDropScheduler` (not a learning-rate scheduler).
        loss_fn: Maps the model's outputs and the labels to the per-task losses ``[K]``, in
            the scheduler's task order, e.g. :class:`~dstmtl.MaskedMultiTaskLoss`.
        **kwargs: As for ``Trainer``.
    """

    # The loss is a mean over this batch, so the Trainer divides it by the gradient
    # accumulation steps (transformers >= 5; older releases read model_accepts_loss_kwargs).
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        scheduler: TaskDropScheduler,
        loss_fn: Callable[[Any, Any], Tensor],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if any(isinstance(cb, TaskDropCallback) for cb in self.callback_handler.callbacks):
            raise ValueError(
                "TaskDropTrainer adds its own TaskDropCallback; remove the one in callbacks, "
                "or the scheduler would step twice per epoch"
            )
        self.task_drop_callback = TaskDropCallback(scheduler, log=self.log)
        self.add_callback(self.task_drop_callback)
        self.loss_fn = loss_fn
        self.model_accepts_loss_kwargs = False
        if self.args.label_names is None:
            # Keeps `labels` through the Trainer's removal of inputs the forward does not take.
            self.label_names = ["labels"]

    @property
    def task_drop_scheduler(self) -> TaskDropScheduler:
        return self.task_drop_callback.scheduler

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        if "labels" not in inputs:
            raise KeyError(
                f"TaskDropTrainer needs the targets under 'labels' in each batch; the batch has "
                f"{sorted(inputs)}"
            )
        features = {key: value for key, value in inputs.items() if key != "labels"}
        outputs = model(**features)
        losses = self.loss_fn(outputs, inputs["labels"])
        if model.training:
            counts = (
                self.loss_fn.label_counts if isinstance(self.loss_fn, MaskedMultiTaskLoss) else None
            )
            loss = self.task_drop_scheduler(losses, counts)
        else:
            loss = losses.sum()
        return (loss, outputs) if return_outputs else loss

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """``Trainer.train``; a resumed run also restores the scheduler from the checkpoint."""
        checkpoint: str | bool | None = resume_from_checkpoint
        if checkpoint is True:
            # get_last_checkpoint has no annotations; it returns a folder path or None.
            last: str | None = get_last_checkpoint(self.args.output_dir)  # type: ignore[no-untyped-call, unused-ignore]
            checkpoint = last or True  # with no checkpoint, Trainer.train raises its own error
        if isinstance(checkpoint, str):
            self.task_drop_callback.load_checkpoint(checkpoint)
        return super().train(checkpoint, *args, **kwargs)
