from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from dstmtl._distributed import all_reduce_sum, broadcast_from_first
from dstmtl._validation import check_same_tasks, check_task_names, per_task_tensor
from dstmtl.metrics import EpochStatistics, Metric

_LOSS_SUM, _LABELLED_STEPS, _LABEL_COUNT = 0, 1, 2
# Keys of a wrong state_dict listed in the error; a model's state_dict has hundreds.
_SHOWN_KEYS = 10


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
    not the gradient: every head still runs forward, so a dropped task's loss keeps feeding
    the statistics.

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
            Between 0 and :math:`K`; ``0`` allows an update with every task dropped (its
            loss is then 0).
        redraw_every: Draw new gates every this many calls instead of once per epoch (the
            paper's schedule). The probabilities still change only at :meth:`step`. The draw
            happens on the host inside the call, so this mode is not for compiled code.
        generator: The source of randomness for the draws: a ``torch.Generator`` (CPU), a
            seed, or ``None`` for a generator seeded from torch's global generator (so that
            :func:`torch.manual_seed` makes the draws reproducible).

    Raises:
        ValueError: An empty or duplicated task list, no metrics, duplicate metric names, a
            wrong number of metric weights, a negative weight or a zero sum,
            ``min_active_tasks`` outside :math:`[0, K]`, ``redraw_every < 1``, or a
            generator on another device than the CPU.
        TypeError: A metric that is not a :class:`~dstmtl.metrics.Metric` instance, a single
            metric not in a list (pass ``[Constant()]``), or a ``generator`` that is not an
            ``int``, a ``torch.Generator`` or ``None``.

    Under :mod:`torch.distributed`, :meth:`step` sums the epoch statistics over all ranks
    and every rank adopts rank 0's gates, so the gates agree even with different seeds.

    The read-outs (:attr:`keep_probabilities`, :attr:`gates`, :attr:`terms`, ...) are
    properties returning plain Python values, dicts keyed by task name in task order. The
    settings ``loss_scaling``, ``min_active_tasks`` and ``redraw_every`` are readable as
    attributes.

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
        >>> scheduler.step()  # baseline = [0.75, 0.25]
        >>> scheduler.step([0.375, 0.25])  # A = [0.5, 1.0], mean 0.75
        >>> scheduler.keep_probabilities
        {'a': 0.8333333333333333, 'b': 1.0}
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
        generator: torch.Generator | int | None = None,
    ) -> None:
        self._task_names = check_task_names(task_names, owner="TaskDropScheduler")
        num_tasks = len(self._task_names)
        self._metrics = _check_metrics(metrics)
        self._metric_weights = _check_metric_weights(metric_weights, self._metrics)
        if not 0 <= min_active_tasks <= num_tasks:
            raise ValueError(
                f"TaskDropScheduler: min_active_tasks must be between 0 and the number of tasks "
                f"({num_tasks}), got {min_active_tasks}"
            )
        if redraw_every is not None and redraw_every < 1:
            raise ValueError(
                f"TaskDropScheduler: redraw_every must be a positive number of steps or None, "
                f"got {redraw_every}"
            )
        self.loss_scaling = loss_scaling
        self.min_active_tasks = min_active_tasks
        self.redraw_every = redraw_every
        self._generator = _make_generator(generator)

        nan = torch.full((num_tasks,), float("nan"), dtype=torch.float64)
        self._epoch = 0
        self._baseline = nan.clone()
        self._previous = nan.clone()
        self._epoch_losses = nan.clone()
        self._label_counts = torch.zeros(num_tasks, dtype=torch.float64)
        self._terms: dict[str, Tensor] = {}
        self._probabilities = torch.ones(num_tasks, dtype=torch.float64)
        self._gates = torch.ones(num_tasks, dtype=torch.bool)
        self._loss_weights = torch.ones(num_tasks, dtype=torch.float64)
        self._calls_since_draw = 0
        # Device-side state, created on the first call on the device of the losses:
        # [3, K] running sums (loss, labelled steps, labels) and [K] gate * weight factors.
        self._accumulator: Tensor | None = None
        self._factors: Tensor | None = None
        self._kept_index: Tensor | None = None

    # ----------------------------------------------------------------- per step (no sync)

    def __call__(
        self, losses: Tensor | Mapping[str, Tensor], label_counts: Tensor | None = None
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

        Raises:
            ValueError: ``losses`` or ``label_counts`` not of shape ``[K]``, or a mapping
                whose names differ from the tasks (the message names the missing and the
                unexpected ones).
            TypeError: Losses that are not a floating-point tensor (or a mapping of them), or
                ``label_counts`` that is not a tensor. These checks read only types, shapes
                and dtypes.
        """
        return self.weighted_losses(losses, label_counts).sum()

    def weighted_losses(
        self, losses: Tensor | Mapping[str, Tensor], label_counts: Tensor | None = None
    ) -> Tensor:
        r"""Like calling the scheduler, but return the vector :math:`g_j w_j L_j`, shape ``[K]``.

        Dropped tasks are exactly 0 (even when their loss is not finite) and keep a gradient
        path. :meth:`kept_losses` gives only the kept tasks.
        """
        losses = self._check_step_input(losses, label_counts)
        if self._accumulator is None or self._accumulator.device != losses.device:
            self._move_state(losses.device)
        assert self._accumulator is not None
        assert self._factors is not None
        if self.redraw_every is not None:
            self._calls_since_draw += 1
            # Probabilities exist from the second step() on; before that every task is kept.
            if self._epoch > 1 and self._calls_since_draw > self.redraw_every:
                self._gates = self._draw_gates()
                self._refresh_device_factors()
                self._calls_since_draw = 1

        dtype = self._accumulator.dtype
        detached = losses.detach().to(dtype)
        labelled = detached.isfinite()
        if label_counts is not None:
            labelled = labelled & (label_counts > 0)
            self._accumulator[_LABEL_COUNT] += label_counts.to(dtype)
        self._accumulator[_LOSS_SUM] += torch.where(labelled, detached, 0.0)
        self._accumulator[_LABELLED_STEPS] += labelled.to(dtype)

        # A copy: autograd keeps it for the backward pass, and the device buffer is
        # rewritten in place at the next redraw or step() (gradient accumulation).
        factors = self._factors.to(losses.dtype, copy=True)
        return torch.where(factors > 0, losses * factors, torch.zeros_like(losses))

    def kept_losses(
        self, losses: Tensor | Mapping[str, Tensor], label_counts: Tensor | None = None
    ) -> Tensor:
        r"""Like :meth:`weighted_losses`, but only the kept tasks: :math:`w_j L_j` for
        :math:`g_j = 1`, in task order, shape ``[len(active_tasks)]``.

        This is the loss vector to hand to another multi-task method, such as a TorchJD
        aggregator or scalarizer, so that the dropped tasks never reach it (see
        ``docs/methods.md``). The selection uses an index kept on the device, so it does not
        synchronise either.
        """
        weighted = self.weighted_losses(losses, label_counts)
        assert self._kept_index is not None
        return weighted.index_select(0, self._kept_index)

    # ------------------------------------------------------------------ per epoch (syncs)

    def step(
        self, mean_losses: Mapping[str, float] | Sequence[float] | Tensor | None = None
    ) -> None:
        """End an epoch: update the statistics and the terms, then draw new gates.

        Args:
            mean_losses: The epoch's mean loss per task (a mapping by task name, a sequence
                or a tensor in task order). By default, the means of what the calls since
                the last :meth:`step` recorded, summed over all ranks under
                :mod:`torch.distributed`. NaN marks a task that was not measured. Given
                means are used as they are: they are not summed over ranks, the recorded
                sums are discarded, and the epoch's label counts are 0.

        Without ``mean_losses``, warns (``UserWarning``, through ``warnings.warn``, so by
        default once per calling line) when no call since the last :meth:`step` recorded a
        finite, labelled loss (summed over ranks), since every task then counts as not
        measured: usually a sign that :meth:`step` is called more than once per epoch.

        Raises:
            ValueError: ``mean_losses`` that do not match the tasks, or a metric that returns
                anything but a ``[K]`` tensor with values in ``[0, 1]``.
            TypeError: ``mean_losses`` that is a string or not iterable.
        """
        if mean_losses is None:
            means, counts = self._collect_epoch()
        else:
            means = per_task_tensor(mean_losses, self._task_names, what="mean_losses")
            counts = torch.zeros_like(means)
            self._reset_accumulator()
        means = torch.where(means.isfinite(), means, float("nan"))

        unset = self._baseline.isnan() & means.isfinite() & (means > 0)
        self._baseline = torch.where(unset, means, self._baseline)
        if self._epoch == 0:
            if self.loss_scaling:
                self._loss_weights = _loss_scaling_weights(self._baseline)
        else:
            stats = EpochStatistics(
                task_names=self._task_names,
                epoch=self._epoch,
                losses=means,
                previous_losses=self._previous.clone(),
                baseline_losses=self._baseline.clone(),
                label_counts=counts,
            )
            self._terms = {metric.name: self._evaluate(metric, stats) for metric in self._metrics}
            weights = torch.tensor(self._metric_weights, dtype=torch.float64)
            terms = torch.stack(list(self._terms.values()))
            self._probabilities = (weights @ terms / weights.sum()).clamp(0.0, 1.0)
            self._gates = self._draw_gates()
        self._previous = torch.where(means.isfinite(), means, self._previous)
        self._epoch_losses = means
        self._label_counts = counts
        self._epoch += 1
        self._calls_since_draw = 0
        self._refresh_device_factors()

    # --------------------------------------------------------------------------- read-outs

    @property
    def task_names(self) -> tuple[str, ...]:
        """The task names, in the order of the loss vector."""
        return self._task_names

    @property
    def epoch(self) -> int:
        """Number of completed :meth:`step` calls."""
        return self._epoch

    @property
    def keep_probabilities(self) -> dict[str, float]:
        """:math:`p_j` per task; 1 until the second :meth:`step`."""
        return self._as_dict(self._probabilities)

    @property
    def gates(self) -> dict[str, bool]:
        """Whether each task takes part in the updates until the next draw."""
        return {
            name: bool(gate)
            for name, gate in zip(self._task_names, self._gates.tolist(), strict=True)
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
        return {name: self._as_dict(term) for name, term in self._terms.items()}

    @property
    def loss_weights(self) -> dict[str, float]:
        """:math:`w_j` per task (all 1 unless ``loss_scaling``)."""
        return self._as_dict(self._loss_weights)

    @property
    def epoch_losses(self) -> dict[str, float]:
        """The mean (unscaled) loss per task of the last completed epoch; NaN where not measured."""
        return self._as_dict(self._epoch_losses)

    @property
    def label_counts(self) -> dict[str, float]:
        """Labelled samples per task in the last completed epoch, summed over all ranks.

        0 where the calls got no ``label_counts`` or :meth:`step` got explicit means.
        """
        return self._as_dict(self._label_counts)

    @property
    def baseline_losses(self) -> dict[str, float]:
        r""":math:`\bar L_j(0)` per task (NaN while a task has no finite, positive mean)."""
        return self._as_dict(self._baseline)

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
            "metric_weights": list(self._metric_weights),
            "loss_scaling": self.loss_scaling,
            "min_active_tasks": self.min_active_tasks,
            "redraw_every": self.redraw_every,
            "epoch": self._epoch,
            "baseline": self._baseline.clone(),
            "previous": self._previous.clone(),
            "epoch_losses": self._epoch_losses.clone(),
            "label_counts": self._label_counts.clone(),
            "terms": {name: term.clone() for name, term in self._terms.items()},
            "probabilities": self._probabilities.clone(),
            "gates": self._gates.clone(),
            "loss_weights": self._loss_weights.clone(),
            "generator": self._generator.get_state(),
            "calls_since_draw": self._calls_since_draw,
            # A copy even on the CPU, where .cpu() would return the live running sums.
            "accumulator": (
                None if self._accumulator is None else self._accumulator.to("cpu", copy=True)
            ),
            "metrics": {metric.name: metric.state_dict() for metric in self._metrics},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the tasks and metrics must be the same.

        Like the schedulers in :mod:`torch.optim.lr_scheduler`, the settings (metric weights,
        loss scaling, minimum of active tasks, redraw period) come from the state too.

        Raises:
            ValueError: Other task names or metric names (or another metric order), or a
                dict without the keys of a scheduler's state, such as a whole training
                checkpoint or a model's ``state_dict()`` (the message lists the keys found
                and those expected).
        """
        expected = list(self.state_dict())
        if any(key not in state_dict for key in expected):
            found = list(state_dict)
            more = f" and {len(found) - _SHOWN_KEYS} more" if len(found) > _SHOWN_KEYS else ""
            raise ValueError(
                f"this is not a TaskDropScheduler state_dict: it has the keys "
                f"{found[:_SHOWN_KEYS]}{more}, where the keys {expected} were expected; pass "
                "what TaskDropScheduler.state_dict() returned, e.g. checkpoint['scheduler']"
            )
        if list(state_dict["task_names"]) != list(self._task_names):
            raise ValueError(
                f"state_dict is for tasks {list(state_dict['task_names'])}, "
                f"this scheduler has {list(self._task_names)}"
            )
        metric_names = [metric.name for metric in self._metrics]
        if list(state_dict["metric_names"]) != metric_names:
            raise ValueError(
                f"state_dict is for metrics {list(state_dict['metric_names'])}, "
                f"this scheduler has {metric_names}"
            )
        self._metric_weights = tuple(float(w) for w in state_dict["metric_weights"])
        self.loss_scaling = bool(state_dict["loss_scaling"])
        self.min_active_tasks = int(state_dict["min_active_tasks"])
        redraw_every = state_dict["redraw_every"]
        self.redraw_every = None if redraw_every is None else int(redraw_every)
        self._epoch = int(state_dict["epoch"])
        self._baseline = state_dict["baseline"].clone()
        self._previous = state_dict["previous"].clone()
        self._epoch_losses = state_dict["epoch_losses"].clone()
        self._label_counts = state_dict["label_counts"].clone()
        self._terms = {name: term.clone() for name, term in state_dict["terms"].items()}
        self._probabilities = state_dict["probabilities"].clone()
        self._loss_weights = state_dict["loss_weights"].clone()
        self._generator.set_state(state_dict["generator"])
        self._calls_since_draw = int(state_dict["calls_since_draw"])
        for metric in self._metrics:
            metric.load_state_dict(state_dict["metrics"][metric.name])
        saved = state_dict["accumulator"]
        if saved is not None:
            self._move_state(
                saved.device if self._accumulator is None else self._accumulator.device
            )
            assert self._accumulator is not None
            self._accumulator.copy_(saved)
        else:
            self._reset_accumulator()
        self._gates = state_dict["gates"].clone()
        self._refresh_device_factors()

    def __repr__(self) -> str:
        return (
            f"TaskDropScheduler(tasks={list(self._task_names)}, metrics={self._metrics}, "
            f"epoch={self._epoch})"
        )

    # ---------------------------------------------------------------------------- helpers

    def _check_step_input(
        self, losses: Tensor | Mapping[str, Tensor], label_counts: Tensor | None
    ) -> Tensor:
        num_tasks = len(self._task_names)
        if isinstance(losses, Mapping):
            check_same_tasks(self._task_names, losses.keys(), what="loss names")
            shapes = {name: tuple(losses[name].shape) for name in self._task_names}
            not_scalar = {name: shape for name, shape in shapes.items() if math.prod(shape) != 1}
            if not_scalar:
                raise ValueError(
                    f"TaskDropScheduler expects one scalar loss per task name; {not_scalar} "
                    "hold several values (reduce each to its mean first)"
                )
            losses = torch.stack([losses[name].reshape(()) for name in self._task_names])
        if not isinstance(losses, Tensor):
            raise TypeError(
                f"TaskDropScheduler expects the losses as a [{num_tasks}] tensor or a mapping "
                f"from task name to loss, got {type(losses).__name__}; for a list of scalar "
                "losses, pass torch.stack(losses)"
            )
        if not losses.is_floating_point():
            raise TypeError(
                f"TaskDropScheduler expects floating-point losses, got {losses.dtype}; compute "
                "the losses in a floating dtype, e.g. losses.float()"
            )
        if losses.shape != (num_tasks,):
            raise ValueError(
                f"TaskDropScheduler expects one loss per task, shape ({num_tasks},) for tasks "
                f"{list(self._task_names)}, got shape {tuple(losses.shape)}"
            )
        if label_counts is not None and not isinstance(label_counts, Tensor):
            raise TypeError(
                f"label_counts must be a [{num_tasks}] tensor of labelled samples per task, "
                f"e.g. loss_fn.label_counts, got {label_counts!r} ({type(label_counts).__name__})"
            )
        if label_counts is not None and label_counts.shape != (num_tasks,):
            raise ValueError(
                f"label_counts must have shape ({num_tasks},), got {tuple(label_counts.shape)}"
            )
        return losses

    def _move_state(self, device: torch.device) -> None:
        previous = self._accumulator
        dtype = _device_state_dtype(device)
        self._accumulator = torch.zeros(3, len(self._task_names), dtype=dtype, device=device)
        if previous is not None:
            self._accumulator.copy_(previous)
        self._factors = torch.empty(len(self._task_names), dtype=dtype, device=device)
        self._refresh_device_factors()

    def _reset_accumulator(self) -> None:
        if self._accumulator is not None:
            self._accumulator.zero_()

    def _collect_epoch(self) -> tuple[Tensor, Tensor]:
        num_tasks = len(self._task_names)
        local = (
            self._accumulator
            if self._accumulator is not None
            else torch.zeros(3, num_tasks, dtype=torch.float64)
        )
        totals = all_reduce_sum(local.clone()).to("cpu", torch.float64)
        self._reset_accumulator()
        steps = totals[_LABELLED_STEPS]
        if not bool(steps.any()):
            warnings.warn(
                "TaskDropScheduler.step(): no call since the last step() recorded a finite, "
                "labelled loss, so every task counts as not measured in this epoch. step() "
                "belongs at the end of each epoch, after calling the scheduler on each "
                "step's losses (or pass the epoch's means as step(mean_losses))",
                UserWarning,
                stacklevel=3,
            )
        means = torch.where(steps > 0, totals[_LOSS_SUM] / steps.clamp(min=1), float("nan"))
        return means, totals[_LABEL_COUNT]

    def _evaluate(self, metric: Metric, stats: EpochStatistics) -> Tensor:
        term = metric(stats)
        if not isinstance(term, Tensor) or term.shape != (len(self._task_names),):
            found = tuple(term.shape) if isinstance(term, Tensor) else type(term).__name__
            raise ValueError(
                f"metric {metric.name!r} must return a tensor of shape ({len(self._task_names)},)"
                f", one value per task, got {found}"
            )
        term = term.detach().to("cpu", torch.float64)
        if not bool(((term >= 0) & (term <= 1)).all()):
            raise ValueError(
                f"metric {metric.name!r} returned values outside [0, 1]: {self._as_dict(term)}"
            )
        return term

    def _draw_gates(self) -> Tensor:
        draws = torch.rand(len(self._task_names), generator=self._generator, dtype=torch.float64)
        gates = draws < self._probabilities
        shortfall = self.min_active_tasks - int(gates.sum())
        if shortfall > 0:
            dropped = [j for j in range(len(gates)) if not gates[j]]
            dropped.sort(key=lambda j: (-float(self._probabilities[j]), float(draws[j])))
            gates[dropped[:shortfall]] = True
        return broadcast_from_first(gates.to(torch.uint8)).to(torch.bool)

    def _refresh_device_factors(self) -> None:
        """Make the device copies follow the gates and the loss weights."""
        if self._factors is not None:
            device = self._factors.device
            factors = (self._gates.to(torch.float64) * self._loss_weights).to(self._factors.dtype)
            self._factors.copy_(_staged(factors, device), non_blocking=True)
            kept = self._gates.nonzero().squeeze(1)
            self._kept_index = _staged(kept, device).to(device, non_blocking=True)

    def _as_dict(self, values: Tensor) -> dict[str, float]:
        return dict(zip(self._task_names, values.tolist(), strict=True))


def _check_metrics(metrics: Sequence[Metric]) -> tuple[Metric, ...]:
    if isinstance(metrics, Metric) or not isinstance(metrics, Iterable):
        example = repr(metrics) if isinstance(metrics, Metric) else "Constant()"
        raise TypeError(
            f"TaskDropScheduler: metrics must be a list of Metric instances, got "
            f"{type(metrics).__name__}; pass a list, e.g. [{example}]"
        )
    metrics = tuple(metrics)
    if not metrics:
        raise ValueError(
            "TaskDropScheduler needs at least one metric; use [Constant()] to keep every task"
        )
    for metric in metrics:
        if not isinstance(metric, Metric):
            raise TypeError(
                f"TaskDropScheduler: metrics must be dstmtl.metrics.Metric instances, got "
                f"{metric!r} ({type(metric).__name__})"
            )
        if not isinstance(getattr(metric, "name", None), str):
            raise TypeError(
                f"TaskDropScheduler: metric {type(metric).__name__} has no `name`; give the "
                "class a string attribute, e.g. name = 'my_term', its key in `terms`"
            )
    names = [metric.name for metric in metrics]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"TaskDropScheduler: metric names must differ, {repeated} appear more than once; "
            "give a custom metric its own `name`"
        )
    return metrics


def _check_metric_weights(
    weights: Sequence[float] | None, metrics: Sequence[Metric]
) -> tuple[float, ...]:
    if weights is None:
        return (1.0,) * len(metrics)
    values = tuple(float(w) for w in weights)
    if len(values) != len(metrics):
        raise ValueError(
            f"metric_weights has {len(values)} values for {len(metrics)} metrics "
            f"{[metric.name for metric in metrics]}"
        )
    if any(not 0 <= w < math.inf for w in values) or not sum(values) > 0:
        raise ValueError(
            "metric_weights must be finite and non-negative with a positive sum, "
            f"got {list(values)}"
        )
    return values


def _make_generator(generator: torch.Generator | int | None) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError(
                f"TaskDropScheduler draws on the CPU; pass a CPU generator, got one on "
                f"{generator.device}"
            )
        return generator
    if generator is not None and (isinstance(generator, bool) or not isinstance(generator, int)):
        raise TypeError(
            "TaskDropScheduler: generator must be an int seed, a CPU torch.Generator or None "
            f"(a seed from torch's global generator), got {generator!r} "
            f"({type(generator).__name__})"
        )
    seed = generator if generator is not None else int(torch.randint(2**62, ()).item())
    return torch.Generator().manual_seed(seed)


def _device_state_dtype(device: torch.device) -> torch.dtype:
    """float64, so that long epochs, label counts past 2**24 and float64 losses' weights stay
    exact; MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _staged(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` in pinned memory when it goes to a CUDA device.

    A non-blocking copy from ordinary host memory may still wait for the GPU; from pinned
    memory it does not, which matters for ``redraw_every``, where the copy is per step.
    """
    return tensor.pin_memory() if device.type == "cuda" else tensor


def _loss_scaling_weights(baseline: Tensor) -> Tensor:
    """``w_j = mean_k Lbar_k(0) / Lbar_j(0)``, with 1 for tasks that have no baseline."""
    known = baseline.isfinite()
    if not bool(known.any()):
        return torch.ones_like(baseline)
    return torch.where(known, baseline[known].mean() / baseline, 1.0)
