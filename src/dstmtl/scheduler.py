"""TaskDropScheduler: the DST schedule of ``docs/algorithm.md``.

The class reads in the order of the algorithm: set-up, the per-step gated loss, the
per-epoch update (means, baselines, terms, probabilities, draw), read-outs, checkpointing,
then the draw itself. The device buffers live in :mod:`dstmtl._device_state`, the
gradient hooks in :mod:`dstmtl._head_gradients`, the state record in
:mod:`dstmtl._scheduler_state` and the argument checks in :mod:`dstmtl._scheduler_checks`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from dstmtl import _scheduler_checks as checks
from dstmtl import _scheduler_state as state
from dstmtl._device_state import (
    COUNTED_LABELS,
    COUNTED_LOSS_SUM,
    LABEL_COUNT,
    LABELLED_STEPS,
    LOSS_SUM,
    DeviceState,
)
from dstmtl._distributed import all_reduce_max, broadcast_from_first, is_distributed
from dstmtl._head_gradients import HeadGradients, check_optimizer, owners_by_parameter
from dstmtl._validation import check_task_names, per_task_tensor
from dstmtl.metrics import EpochStatistics, Metric


class TaskDropScheduler:
    r"""Drops tasks from each update with a keep probability built from DST metrics.

    Each task :math:`j` has a keep probability :math:`p_j`, the weighted mean of the enabled
    terms (:mod:`dstmtl.metrics`), and a gate :math:`g_j \sim \mathrm{Bernoulli}(p_j)`. The
    training loss is

    .. math::

        L = \sum_j g_j \, w_j \, L_j,
        \qquad p_j = \frac{\sum_m \lambda_m \, t_{m,j}}{\sum_m \lambda_m}

    where :math:`t_{m,j}` is term :math:`m` for task :math:`j`, :math:`\lambda_m` its weight
    and :math:`w_j` the loss-scaling weight (1 unless ``loss_scaling``). The loss is masked,
    not the forward pass: every head still runs, so a dropped task's loss keeps feeding the
    statistics. After :meth:`attach` the heads of dropped tasks get no gradient at all.

    Like the schedulers in :mod:`torch.optim.lr_scheduler`, it is driven by :meth:`step`,
    called once at the end of each epoch:

    * before the first :meth:`step` every gate is on and every weight is 1;
    * the first :meth:`step` records the baseline losses :math:`\bar L(0)` (and
      :math:`w_j = \mathrm{mean}_k \bar L_k(0) / \bar L_j(0)` with ``loss_scaling``) and keeps
      every gate on;
    * every later :meth:`step` asks each metric for its terms, combines them into
      :math:`p` and draws new gates, which hold until the next draw.

    Per step, ``scheduler(losses)`` returns the gated sum and accumulates the detached losses
    on their device, without synchronising with it; :meth:`step` reads them back.

    Args:
        task_names: The tasks, in the order of the loss vector.
        metrics: The enabled terms, :class:`~dstmtl.metrics.Metric` instances whose ``name``
            attributes differ; at least one (``[Constant()]`` keeps every task).
        metric_weights: :math:`\lambda_m \ge 0` per metric, in the order of ``metrics``,
            with a positive sum; equal weights by default.
        loss_scaling: Scale each task's loss by :math:`w_j` after the warm-up epoch, so that
            every task starts from the same loss level. The terms use unscaled losses.
        min_active_tasks: At least this many tasks are kept in every draw: when fewer gates
            come up, the dropped tasks with the highest :math:`p_j` are switched back on.
            ``0`` allows an update with every task dropped (its loss is then 0).
        redraw_every: Draw new gates every this many calls (or optimizer steps, once an
            optimizer is attached) instead of once per epoch (the paper's schedule). The
            probabilities still change only at :meth:`step`. The draw happens on the host,
            so this mode is not for compiled code.
        epoch_mean: How a task's epoch mean weighs the steps: ``"step"`` (the reference
            script's), each step with a labelled sample counts once; ``"label"``, each step
            counts by its labelled samples, which needs ``label_counts`` at every call.
        epochs: The run's planned number of epochs (:meth:`step` calls). With it, every task
            is kept for the last ``cooldown_epochs`` epochs.
        cooldown_epochs: Epochs at the end with every task kept when ``epochs`` is given;
            ``0`` follows the paper's schedule to the end.
        generator: The source of randomness for the draws: a ``torch.Generator`` (CPU), a
            seed, or ``None`` for a generator seeded by the operating system (torch's global
            generator is left alone).

    Raises:
        ValueError: An empty or duplicated task list, no metrics, duplicate metric names, a
            wrong number of metric weights, a negative weight or a zero sum,
            ``min_active_tasks`` outside :math:`[0, K]`, ``redraw_every < 1``, a bad
            ``epochs``, ``cooldown_epochs`` or ``epoch_mean``, or a generator on another
            device than the CPU.
        TypeError: A metric that is not a :class:`~dstmtl.metrics.Metric` instance, a single
            metric not in a list (pass ``[Constant()]``), a setting of the wrong type (a
            ``bool`` or ``1.5`` where an ``int`` is meant, a string for ``loss_scaling``),
            or a ``generator`` that is not an ``int``, a ``torch.Generator`` or ``None``.

    Under :mod:`torch.distributed`, :meth:`step` sums the epoch statistics over all ranks
    and gives every rank rank 0's generator state, so every rank draws the same gates,
    with no communication between two :meth:`step` calls.

    The read-outs (:attr:`keep_probabilities`, :attr:`gates`, :attr:`terms`, ...) are
    properties returning plain Python values, dicts keyed by task name in task order. The
    settings ``loss_scaling``, ``min_active_tasks`` and ``redraw_every`` are read-only
    properties.

    Example:
        >>> import torch
        >>> from dstmtl import TaskDropScheduler
        >>> from dstmtl.metrics import Constant, TaskIncompleteness
        >>> scheduler = TaskDropScheduler(
        ...     ["a", "b"], [TaskIncompleteness(), Constant()], generator=0
        ... )
        >>> losses = torch.tensor([0.75, 0.25], requires_grad=True)
        >>> scheduler(losses)  # every task kept during the warm-up epoch
        tensor(1., grad_fn=<SumBackward0>)
        >>> _ = scheduler.step()  # baseline = [0.75, 0.25]
        >>> scheduler.step([0.375, 0.25])["keep_probability/a"]  # A = [0.5, 1.0], mean 0.75
        0.8333333333333333
    """

    def __init__(
        self,
        task_names: Iterable[str],
        metrics: Sequence[Metric],
        *,
        metric_weights: Sequence[float] | None = None,
        loss_scaling: bool = False,
        min_active_tasks: int = 1,
        redraw_every: int | None = None,
        epoch_mean: str = "step",
        epochs: int | None = None,
        cooldown_epochs: int = 1,
        generator: torch.Generator | int | None = None,
    ) -> None:
        self._task_names = check_task_names(task_names, owner="TaskDropScheduler")
        num_tasks = len(self._task_names)
        self._metrics = checks.check_metrics(metrics)
        nan = torch.full((num_tasks,), math.nan, dtype=torch.float64)
        self._r = state.Record(
            metric_weights=checks.check_metric_weights(metric_weights, self._metrics),
            loss_scaling=checks.check_bool(loss_scaling, "loss_scaling"),
            min_active_tasks=checks.check_int(
                min_active_tasks,
                "min_active_tasks",
                low=0,
                high=num_tasks,
                high_is="the number of tasks",
            ),
            redraw_every=checks.check_optional_int(redraw_every, "redraw_every", low=1),
            epoch_mean=checks.check_epoch_mean(epoch_mean),
            epochs=checks.check_optional_int(epochs, "epochs", low=1),
            cooldown_epochs=checks.check_int(cooldown_epochs, "cooldown_epochs", low=0),
            epoch=0,
            baseline=nan.clone(),
            previous=nan.clone(),
            epoch_losses=nan.clone(),
            label_counts=torch.zeros(num_tasks, dtype=torch.float64),
            terms={},
            probabilities=torch.ones(num_tasks, dtype=torch.float64),
            gates=torch.ones(num_tasks, dtype=torch.bool),
            loss_weights=torch.ones(num_tasks, dtype=torch.float64),
            calls_since_draw=0,
            dropped_all_epoch=torch.zeros(num_tasks, dtype=torch.bool),
            dropped_loss_rise=nan.clone(),
        )
        self._generator = checks.make_generator(generator)
        self._device = DeviceState(num_tasks)
        self._heads: HeadGradients | None = None
        self._optimizer_hooks: list[Any] = []

    # ---------------------------------------------------------------- setup (host only)

    def to(self, device: torch.device | str) -> TaskDropScheduler:
        """Keep the per-step buffers on ``device`` (the CPU until then); returns ``self``.

        Call it before compiling a step, so that the compiled code sees its buffers from
        the start. A call with losses on another device moves them there too (once).
        """
        self._device.to(device)
        self._stage_gates()
        return self

    def attach(
        self, model: object | None = None, optimizer: torch.optim.Optimizer | None = None
    ) -> TaskDropScheduler:
        """Tell the scheduler which parameters belong to which task, and which optimizer
        takes the steps; returns ``self``.

        Args:
            model: A :class:`~dstmtl.MultiHeadNet` (its ``heads``) or a mapping from task
                name to a module, a parameter or an iterable of parameters. After each
                backward pass, the parameters whose tasks are all dropped get ``grad = None``
                (the gates are on the host: no synchronisation), so no optimizer moves
                them, through momentum or weight decay either. A parameter used by several
                tasks is dropped only when all of them are. Without ``model``, dropped heads
                get zero gradients, as when the scheduler is not attached.
            optimizer: The optimizer that updates the model. It makes ``redraw_every``
                count optimizer steps, and redraw only right after one, so that every
                micro-batch of a gradient-accumulation step has the same gates; and it
                clears the dropped parameters' gradients again just before each step (in
                case a wrapper such as ``DistributedDataParallel`` wrote them back).

        Calling it again replaces the previous attachment.
        """
        self.detach()
        if model is not None:
            self._heads = HeadGradients(owners_by_parameter(model, self._task_names))
            self._heads.update(self._r.gates)
        if optimizer is not None:
            optimizer = check_optimizer(optimizer)
            self._optimizer_hooks = [
                optimizer.register_step_pre_hook(self._before_optimizer_step),
                optimizer.register_step_post_hook(self._after_optimizer_step),
            ]
        return self

    def detach(self) -> None:
        """Undo :meth:`attach`: remove every hook it registered."""
        if self._heads is not None:
            self._heads.remove()
        self._heads = None
        for handle in self._optimizer_hooks:
            handle.remove()
        self._optimizer_hooks = []

    # ----------------------------------------------------------------- per step (no sync)

    def __call__(
        self,
        losses: Tensor | Mapping[str, Tensor],
        label_counts: Tensor | None = None,
        *,
        record: bool = True,
    ) -> Tensor:
        r"""Return :math:`\sum_j g_j w_j L_j` and record the losses for the epoch statistics.

        Call this, :meth:`weighted_losses` or :meth:`kept_losses` once per step, not several
        of them: each call records the losses. A dropped task contributes exactly 0, even
        when its loss is NaN or infinite, and keeps a gradient path (with zero gradient).
        The statistics are accumulated from the detached losses on their device and nothing
        is read back to the host, so the call does not synchronise with the device and
        compiles with ``torch.compile(fullgraph=True)`` (without ``redraw_every``).

        Args:
            losses: Per-task losses, shape ``[K]``, in task order, on any device and in any
                floating dtype; or a mapping from task name to a scalar loss, whose names
                are checked against the scheduler's.
            label_counts: Labelled samples per task in this batch, shape ``[K]``, e.g.
                :attr:`MaskedMultiTaskLoss.label_counts`. A task with no labelled sample in
                a step does not count towards its epoch mean. Non-finite losses never do.
            record: ``False`` returns the gated loss without recording anything or counting
                the call (e.g. on validation data).

        Raises:
            ValueError: ``losses`` or ``label_counts`` not of shape ``[K]``, or a mapping
                whose names differ from the tasks (the message names the missing and the
                unexpected ones).
            TypeError: Losses that are not a floating-point tensor (or a mapping of them), or
                ``label_counts`` that is not a tensor. These checks read only types, shapes
                and dtypes.
        """
        return self.weighted_losses(losses, label_counts, record=record).sum()

    def weighted_losses(
        self,
        losses: Tensor | Mapping[str, Tensor],
        label_counts: Tensor | None = None,
        *,
        record: bool = True,
    ) -> Tensor:
        r"""Like calling the scheduler, but return the vector :math:`g_j w_j L_j`, shape ``[K]``.

        Dropped tasks are exactly 0 (even when their loss is not finite) and keep a gradient
        path. :meth:`kept_losses` gives only the kept tasks.
        """
        losses = checks.check_step_input(
            losses, label_counts, self._task_names, needs_counts=self._r.epoch_mean == "label"
        )
        if self._device.device != losses.device:
            self.to(losses.device)
        if record:
            if self._r.redraw_every is not None and not self._optimizer_hooks:
                self._redraw_if_due()
                self._r.calls_since_draw += 1
                self._r.units_this_epoch += 1
            self._device.record(losses, label_counts, by_label=self._r.epoch_mean == "label")
        return self._device.gate(losses)

    def kept_losses(
        self,
        losses: Tensor | Mapping[str, Tensor],
        label_counts: Tensor | None = None,
        *,
        record: bool = True,
    ) -> Tensor:
        r"""Like :meth:`weighted_losses`, but only the kept tasks: :math:`w_j L_j` for
        :math:`g_j = 1`, in task order, shape ``[len(active_tasks)]``.

        This is the loss vector to hand to another multi-task method, such as a TorchJD
        aggregator or scalarizer, so that the dropped tasks never reach it (see
        ``docs/methods.md``). The selection uses an index kept on the device, so it does not
        synchronise either. With every task dropped (``min_active_tasks=0``) the vector is
        empty: skip that update (``if scheduler.active_tasks:``).
        """
        weighted = self.weighted_losses(losses, label_counts, record=record)
        return weighted.index_select(0, self._device.kept_index)

    # ------------------------------------------------------------------ per epoch (syncs)

    def step(
        self, mean_losses: Mapping[str, float] | Sequence[float] | Tensor | None = None
    ) -> dict[str, float]:
        """End an epoch: update the statistics and the terms, then draw new gates.

        Args:
            mean_losses: The epoch's mean loss per task (a mapping by task name, a sequence
                or a tensor in task order). By default, the means of what the calls since
                the last :meth:`step` recorded, summed over all ranks under
                :mod:`torch.distributed`. NaN marks a task that was not measured. Given
                means are used as they are: they are not summed over ranks, the recorded
                sums are discarded, and the epoch's label counts are 0.

        Returns:
            :meth:`log_dict`, the new state, for a logger.

        Without ``mean_losses``, warns (``UserWarning``, through ``warnings.warn``, so by
        default once per calling line) when no call since the last :meth:`step` recorded a
        finite, labelled loss (summed over ranks), since every task then counts as not
        measured: usually a sign that :meth:`step` is called more than once per epoch. Also
        warns when a task dropped for the whole epoch ended it with a higher mean loss.

        Raises:
            ValueError: ``mean_losses`` that do not match the tasks, or a metric that returns
                anything but a ``[K]`` tensor with values in ``[0, 1]``.
            TypeError: ``mean_losses`` that is a string or not iterable.
            RuntimeError: With ``redraw_every`` under :mod:`torch.distributed`, ranks that
                made different numbers of calls in the epoch.
        """
        r = self._r
        self._check_equal_units_across_ranks()
        if mean_losses is None:
            means, counts = self._collect_epoch()
        else:
            means = per_task_tensor(mean_losses, self._task_names, what="mean_losses")
            counts = torch.zeros_like(means)
            self._device.collect()
        means = torch.where(means.isfinite(), means, math.nan)

        unset = r.baseline.isnan() & means.isfinite() & (means > 0)
        r.baseline = torch.where(unset, means, r.baseline)
        if r.epoch == 0:
            if r.loss_scaling:
                r.loss_weights = _loss_scaling_weights(r.baseline)
        else:
            stats = EpochStatistics(
                task_names=self._task_names,
                epoch=r.epoch,
                losses=means,
                previous_losses=r.previous.clone(),
                baseline_losses=r.baseline.clone(),
                label_counts=counts,
            )
            r.terms = {
                metric.name: checks.check_term(metric, metric(stats), self._task_names)
                for metric in self._metrics
            }
            weights = torch.tensor(r.metric_weights, dtype=torch.float64)
            terms = torch.stack(list(r.terms.values()))
            r.probabilities = (weights @ terms / weights.sum()).clamp(0.0, 1.0)
        r.dropped_loss_rise = torch.where(r.dropped_all_epoch, means - r.previous, math.nan)
        r.previous = torch.where(means.isfinite(), means, r.previous)
        r.epoch_losses = means
        r.label_counts = counts
        r.epoch += 1
        r.calls_since_draw = 0
        r.units_this_epoch = 0
        self._share_generator()
        if r.epoch > 1:
            r.gates = self._draw_gates()
        r.dropped_all_epoch = ~r.gates
        self._stage_gates()
        self._warn_about_dropped_tasks_that_got_worse()
        return self.log_dict()

    # --------------------------------------------------------------------------- read-outs

    @property
    def task_names(self) -> tuple[str, ...]:
        """The task names, in the order of the loss vector."""
        return self._task_names

    @property
    def epoch(self) -> int:
        """Number of completed :meth:`step` calls."""
        return self._r.epoch

    @property
    def loss_scaling(self) -> bool:
        return self._r.loss_scaling

    @property
    def min_active_tasks(self) -> int:
        return self._r.min_active_tasks

    @property
    def redraw_every(self) -> int | None:
        return self._r.redraw_every

    @property
    def epoch_mean(self) -> str:
        return self._r.epoch_mean

    @property
    def epochs(self) -> int | None:
        return self._r.epochs

    @property
    def cooldown_epochs(self) -> int:
        return self._r.cooldown_epochs

    @property
    def cooling_down(self) -> bool:
        """``True`` while the current epoch is in the cool-down, where every task is kept.

        Needs ``epochs``; always ``False`` without it.
        """
        r = self._r
        return r.epochs is not None and r.epoch >= r.epochs - r.cooldown_epochs

    @property
    def keep_probabilities(self) -> dict[str, float]:
        """:math:`p_j` per task; 1 until the second :meth:`step`."""
        return self._as_dict(self._r.probabilities)

    @property
    def gates(self) -> dict[str, bool]:
        """Whether each task takes part in the updates until the next draw."""
        return {
            name: bool(gate)
            for name, gate in zip(self._task_names, self._r.gates.tolist(), strict=True)
        }

    @property
    def active_tasks(self) -> tuple[str, ...]:
        """The names of the tasks whose gate is on."""
        return tuple(name for name, gate in self.gates.items() if gate)

    @property
    def terms(self) -> dict[str, dict[str, float]]:
        """The last value of each metric's term, by metric name then task name.

        ``{}`` until the second :meth:`step`.
        """
        return {name: self._as_dict(term) for name, term in self._r.terms.items()}

    @property
    def loss_weights(self) -> dict[str, float]:
        """:math:`w_j` per task (all 1 unless ``loss_scaling``)."""
        return self._as_dict(self._r.loss_weights)

    @property
    def epoch_losses(self) -> dict[str, float]:
        """The mean (unscaled) loss per task of the last completed epoch; NaN where not measured."""
        return self._as_dict(self._r.epoch_losses)

    @property
    def label_counts(self) -> dict[str, float]:
        """Labelled samples per task in the last completed epoch, summed over all ranks.

        0 where the calls got no ``label_counts`` or :meth:`step` got explicit means.
        """
        return self._as_dict(self._r.label_counts)

    @property
    def baseline_losses(self) -> dict[str, float]:
        r""":math:`\bar L_j(0)` per task (NaN while a task has no finite, positive mean)."""
        return self._as_dict(self._r.baseline)

    @property
    def dropped_loss_rise(self) -> dict[str, float]:
        """For each task dropped during the whole last epoch, its epoch mean minus the one
        before (positive: it got worse while dropped); NaN for the other tasks."""
        return self._as_dict(self._r.dropped_loss_rise)

    def log_dict(self) -> dict[str, float]:
        """The last epoch's state as one flat ``dict[str, float]`` for any logger.

        Keys: ``"epoch"``, and per task ``"keep_probability/<task>"``, ``"gate/<task>"``
        (1.0 or 0.0: the gates of the next epoch), ``"term/<metric>/<task>"`` (from the
        second :meth:`step` on), ``"epoch_loss/<task>"``, ``"label_count/<task>"`` and
        ``"loss_weight/<task>"``. :meth:`step` returns the same dict.
        """
        values: dict[str, float] = {"epoch": float(self._r.epoch)}
        sections: dict[str, Mapping[str, float | bool]] = {
            "keep_probability": self.keep_probabilities,
            "gate": self.gates,
            **{f"term/{name}": term for name, term in self.terms.items()},
            "epoch_loss": self.epoch_losses,
            "label_count": self.label_counts,
            "loss_weight": self.loss_weights,
        }
        for section, per_task in sections.items():
            values.update({f"{section}/{task}": float(v) for task, v in per_task.items()})
        return values

    # ---------------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, the random state included; tensors are on the CPU.

        It includes the partial sums of an epoch in progress and each metric's
        :meth:`~dstmtl.metrics.Metric.state_dict`, and holds only tensors, numbers, strings,
        lists, dicts and ``None``, so it loads with ``torch.load(..., weights_only=True)``.
        Mid-epoch, the state holds this process's running sums; under
        :mod:`torch.distributed` save at epoch boundaries, where they are empty.
        """
        return {
            "task_names": list(self._task_names),
            "metric_names": [metric.name for metric in self._metrics],
            **state.saved(self._r),
            "generator": self._generator.get_state(),
            "accumulator": self._device.saved_sums(),
            "metrics": {metric.name: metric.state_dict() for metric in self._metrics},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the tasks and metrics must be the same.

        Like the schedulers in :mod:`torch.optim.lr_scheduler`, the settings (metric weights,
        loss scaling, minimum of active tasks, redraw period, epoch mean, cool-down) come
        from the state too. A state saved before ``epoch_mean``, ``epochs`` and
        ``cooldown_epochs`` existed keeps this scheduler's values for them.

        Raises:
            ValueError: Other task names or metric names (or another metric order), or a
                dict without the keys of a scheduler's state, such as a whole training
                checkpoint or a model's ``state_dict()`` (the message lists the keys found
                and those expected).
        """
        state.check_keys(state_dict, list(self.state_dict()))
        for what, names in (
            ("task", list(self._task_names)),
            ("metric", [metric.name for metric in self._metrics]),
        ):
            saved = list(state_dict[f"{what}_names"])
            if saved != names:
                raise ValueError(f"state_dict is for {what}s {saved}, this scheduler has {names}")
        self._r = state.restored(self._r, state_dict)
        if "dropped_all_epoch" not in state_dict:
            self._r.dropped_all_epoch = ~self._r.gates
        self._generator.set_state(state_dict["generator"])
        for metric in self._metrics:
            metric.load_state_dict(state_dict["metrics"][metric.name])
        saved_sums = state_dict["accumulator"]  # None in older states before the first call
        self._device.load_sums(
            saved_sums if saved_sums is not None else torch.zeros(0, len(self._task_names))
        )
        self._stage_gates()

    def __repr__(self) -> str:
        return (
            f"TaskDropScheduler(tasks={list(self._task_names)}, metrics={self._metrics}, "
            f"epoch={self._r.epoch})"
        )

    # ---------------------------------------------------------------------------- drawing

    def _draw_gates(self) -> Tensor:
        """``g_j = [U_j < p_j]``, topped up to ``min_active_tasks``; all on in the cool-down.

        Every rank holds the same generator state (see :meth:`_share_generator`), so every
        rank draws the same gates without communicating."""
        num_tasks = len(self._task_names)
        if self.cooling_down:
            return torch.ones(num_tasks, dtype=torch.bool)
        probabilities = self._r.probabilities
        draws = torch.rand(num_tasks, generator=self._generator, dtype=torch.float64)
        gates = draws < probabilities
        shortfall = self._r.min_active_tasks - int(gates.sum())
        if shortfall > 0:
            dropped = [j for j in range(num_tasks) if not gates[j]]
            dropped.sort(key=lambda j: (-float(probabilities[j]), float(draws[j])))
            gates[dropped[:shortfall]] = True
        return gates

    def _redraw_if_due(self) -> None:
        r = self._r
        assert r.redraw_every is not None
        # Probabilities exist from the second step() on; before that every task is kept.
        if r.epoch > 1 and r.calls_since_draw >= r.redraw_every:
            r.gates = self._draw_gates()
            r.dropped_all_epoch &= ~r.gates
            self._stage_gates()
            r.calls_since_draw = 0

    def _stage_gates(self) -> None:
        """Make the device buffers and the gradient hooks follow the gates and weights."""
        self._device.stage(self._r.gates, self._r.loss_weights)
        if self._heads is not None:
            self._heads.update(self._r.gates)

    def _before_optimizer_step(self, *_: object) -> None:
        if self._heads is not None:
            self._heads.clear()

    def _after_optimizer_step(self, *_: object) -> None:
        if self._r.redraw_every is not None:
            self._r.calls_since_draw += 1
            self._r.units_this_epoch += 1
            self._redraw_if_due()

    # ---------------------------------------------------------------- epoch and ranks

    def _collect_epoch(self) -> tuple[Tensor, Tensor]:
        totals = self._device.collect()
        steps = totals[LABELLED_STEPS]
        if not bool(steps.any()):
            warnings.warn(
                "TaskDropScheduler.step(): no call since the last step() recorded a finite, "
                "labelled loss, so every task counts as not measured in this epoch. step() "
                "belongs at the end of each epoch, after calling the scheduler on each "
                "step's losses (or pass the epoch's means as step(mean_losses))",
                UserWarning,
                stacklevel=3,
            )
        if self._r.epoch_mean == "label":
            total, weight = totals[COUNTED_LOSS_SUM], totals[COUNTED_LABELS]
        else:
            total, weight = totals[LOSS_SUM], steps
        means = torch.where(weight > 0, total / weight.clamp(min=1e-300), math.nan)
        return means, totals[LABEL_COUNT]

    def _check_equal_units_across_ranks(self) -> None:
        """With per-step redraws, every rank must have drawn as often, or the gates differ."""
        if self._r.redraw_every is None or not is_distributed():
            return
        units = self._r.units_this_epoch
        high, negative_low = all_reduce_max(torch.tensor([units, -units])).tolist()
        if high != -negative_low:
            unit = "optimizer steps" if self._optimizer_hooks else "scheduler calls"
            raise RuntimeError(
                f"TaskDropScheduler.step(): with redraw_every, every rank must make the same "
                f"number of {unit} per epoch, but the ranks made from {-negative_low} to "
                f"{high}, so their gates would differ. Give every rank the same number of "
                "batches: a DistributedSampler with drop_last=True, or equal batch counts"
            )

    def _share_generator(self) -> None:
        """Give every rank rank 0's generator state (a no-op outside torch.distributed)."""
        if is_distributed():
            self._generator.set_state(broadcast_from_first(self._generator.get_state()))

    def _warn_about_dropped_tasks_that_got_worse(self) -> None:
        worse = {name: value for name, value in self.dropped_loss_rise.items() if value > 0}
        if worse:
            warnings.warn(
                f"TaskDropScheduler.step(): tasks {sorted(worse)} were dropped for the whole "
                f"epoch and their mean loss rose by {worse}: a dropped task's head does not "
                "train while the shared weights move. Keep every task for the last epochs "
                "(TaskDropScheduler(..., epochs=N, cooldown_epochs=1)) so that none ends "
                "the run in this state",
                UserWarning,
                stacklevel=3,
            )

    def _as_dict(self, values: Tensor) -> dict[str, float]:
        return dict(zip(self._task_names, values.tolist(), strict=True))


def _loss_scaling_weights(baseline: Tensor) -> Tensor:
    """``w_j = mean_k Lbar_k(0) / Lbar_j(0)``, with 1 for tasks that have no baseline."""
    known = baseline.isfinite()
    if not bool(known.any()):
        return torch.ones_like(baseline)
    return torch.where(known, baseline[known].mean() / baseline, 1.0)
