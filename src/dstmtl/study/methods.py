"""The multi-task methods a study compares, each owning its whole training step.

A :class:`Method` holds the model's optimizer and does forward, loss, backward, optimizer
step and any second pass (FAMO's) in :meth:`Method.step`, so the training loop has no
per-method branch. Every method gathers its per-task training losses on the device and
reads them once per epoch; only the DST methods hold a :class:`~dstmtl.TaskDropScheduler`.
A task without a labelled sample in the batch is absent from the step for every method
(see :mod:`dstmtl.study.weighting` and docs/methods.md).
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dstmtl._device_state import LABELLED_STEPS, LOSS_SUM, DeviceState
from dstmtl.loss import MaskedMultiTaskLoss
from dstmtl.metrics import (
    Constant,
    LabelCount,
    Metric,
    NetworkDepth,
    TaskIncompleteness,
    TaskStagnancy,
)
from dstmtl.multihead import MultiHeadNet
from dstmtl.scheduler import TaskDropScheduler
from dstmtl.study import weighting
from dstmtl.study._errors import StudyError

__all__ = [
    "DST_TERMS",
    "METHOD_NAMES",
    "Method",
    "check_method_names",
    "is_single_task",
    "needs_one_process",
]

DST_TERMS = ("depth", "labels", "incompleteness", "stagnancy", "constant")
"""The DST term names of ``dst-<term>+<term>`` method names."""
_BASELINES_EXTRA = "pip install 'dstmtl[baselines]'"


@dataclass(frozen=True)
class _Spec:
    description: str
    dst_terms: tuple[str, ...] | None = None
    weighting: str | None = None
    aggregator: str | None = None
    single_task: bool = False


_SPECS: dict[str, _Spec] = {
    "equal": _Spec("equal weights"),
    "dst": _Spec("DST, task incompleteness alone", ("incompleteness",)),
    "dst-all": _Spec("DST, all five terms", DST_TERMS),
    "uw": _Spec("uncertainty weighting (Kendall et al., 2018)", weighting="uw"),
    "dwa": _Spec("dynamic weight average (Liu et al., 2019)", weighting="dwa"),
    "rlw": _Spec("random loss weighting (Lin et al., 2022)", weighting="rlw"),
    "famo": _Spec("FAMO (Liu et al., 2023)", weighting="famo"),
    "upgrad": _Spec("UPGrad, Jacobian descent (Quinton & Rey, 2024)", aggregator="UPGrad"),
    "mgda": _Spec("MGDA (Sener & Koltun, 2018)", aggregator="MGDA"),
    "pcgrad": _Spec("PCGrad (Yu et al., 2020)", aggregator="PCGrad"),
    "dst+upgrad": _Spec(
        "DST (task incompleteness) composed with UPGrad", ("incompleteness",), aggregator="UPGrad"
    ),
    "stl": _Spec("single-task learning: one model per task", single_task=True),
}
METHOD_NAMES = tuple(_SPECS)
"""The names of the built-in methods."""
_WEIGHTINGS: dict[str, Callable[[int], nn.Module]] = {
    "uw": weighting.UncertaintyWeighting,
    "dwa": weighting.DynamicWeightAverage,
    "rlw": weighting.RandomWeighting,
    "famo": weighting.FAMO,
}


def check_method_names(names: Sequence[str]) -> None:
    """Refuse unknown or repeated names, and aggregators without TorchJD, before any work."""
    unknown = [name for name in names if _spec(name) is None]
    if unknown or not names:
        raise StudyError(
            f"unknown method(s) {unknown or list(names)}; valid methods: "
            f"{', '.join(METHOD_NAMES)}, or DST with chosen terms as dst-<term>+<term> from "
            f"{', '.join(DST_TERMS)}"
        )
    repeated = sorted({name for name in names if list(names).count(name) > 1})
    if repeated:
        raise StudyError(f"methods named twice: {repeated}")
    for name in names:
        spec = _spec(name)
        assert spec is not None
        _aggregator(spec.aggregator, name)


def needs_one_process(name: str) -> bool:
    """Whether the method keeps state that each torchrun process would build from its own
    shard alone: per-task gradients (the aggregators) or weights learned from the losses
    (UW, DWA, FAMO). RLW's draws come from torch's generator, seeded alike everywhere."""
    spec = _spec(name)
    assert spec is not None, f"unchecked method name {name!r}"
    return spec.aggregator is not None or spec.weighting in ("uw", "dwa", "famo")


def is_single_task(name: str) -> bool:
    """Whether the method ``name`` trains one model per task (``stl``)."""
    spec = _spec(name)
    return spec is not None and spec.single_task


def _spec(name: str) -> _Spec | None:
    if name in _SPECS:
        return _SPECS[name]
    terms = tuple(name.removeprefix("dst-").split("+"))
    if name.startswith("dst-") and all(term in DST_TERMS for term in terms):
        return _Spec(f"DST, terms: {', '.join(terms)}", terms)
    return None


class Method:
    """One method's state and its training step on one model.

    Args:
        name: A name from :data:`METHOD_NAMES` or ``dst-<term>+<term>``.
        model: The multi-task model it trains.
        loss_fn: The masked per-task losses.
        learning_rate: Adam's learning rate for the model (and UW's log-variances).
        seed: Seeds DST's draws.
        epochs: The run's length, for DST's all-task cool-down in its last epoch
            (:class:`~dstmtl.TaskDropScheduler`'s ``epochs``); ``None``: no cool-down.
        train_labels: The training targets ``[N, K]`` (NaN = missing), for DST's label
            count term.
        only_task: For single-task learning: the one task this model learns.
        network: What runs the forward pass when the method does not need the shared
            features: the model wrapped by DistributedDataParallel or ``torch.compile``
            (the model itself by default).
        autocast: A context for the forward passes (mixed precision), none by default.
    """

    def __init__(
        self,
        name: str,
        model: MultiHeadNet,
        loss_fn: MaskedMultiTaskLoss,
        *,
        learning_rate: float,
        seed: int,
        epochs: int | None = None,
        train_labels: Tensor | None = None,
        only_task: str | None = None,
        network: nn.Module | None = None,
        autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        spec = _spec(name)
        if spec is None:
            check_method_names([name])
        assert spec is not None
        self.name = name
        self.description = spec.description
        self.model = model
        self.network = model if network is None else network
        self._autocast = autocast
        self.loss_fn = loss_fn
        self.task_names = model.task_names
        self.scheduler = (
            None
            if spec.dst_terms is None
            else TaskDropScheduler(
                self.task_names,
                [_term(term, model, train_labels) for term in spec.dst_terms],
                generator=seed,
                epochs=epochs,
            )
        )
        self.drops_tasks = spec.dst_terms not in (None, ("constant",))
        self._losses = DeviceState(len(self.task_names))
        self._epoch_losses = [math.nan] * len(self.task_names)
        self.weighting = (
            None if spec.weighting is None else _WEIGHTINGS[spec.weighting](len(self.task_names))
        )
        self._famo = isinstance(self.weighting, weighting.FAMO)
        self.aggregator = _aggregator(spec.aggregator, name)
        self._only = (
            None if only_task is None else torch.tensor([t == only_task for t in self.task_names])
        )
        trained = list(model.parameters())
        if self.weighting is not None and not self._famo:  # FAMO steps its logits itself
            trained += list(self.weighting.parameters())
        self.optimizer = torch.optim.Adam(trained, lr=learning_rate)

    def to(self, device: torch.device) -> Method:
        if self.weighting is not None:
            self.weighting.to(device)
        if self._only is not None:
            self._only = self._only.to(device)
        if self.scheduler is not None:
            self.scheduler.to(device)
        self._losses.to(device)
        return self

    def step(self, inputs: Tensor, targets: Tensor | Mapping[str, Tensor]) -> None:
        """One training step on a batch already on the model's device."""
        with self._autocast():
            # The aggregators need the shared features, so they bypass the network wrapper.
            features = self.model.forward_features(inputs) if self.aggregator is not None else None
            outputs = (
                self.network(inputs) if features is None else self.model.forward_heads(features)
            )
            losses = self.loss_fn(outputs, targets)
        counts = self.loss_fn.label_counts
        if self._only is not None:
            counts = torch.where(self._only, counts, torch.zeros_like(counts))
        self._losses.record(losses, counts, by_label=False)
        self.optimizer.zero_grad(set_to_none=True)
        if self.aggregator is not None:
            assert features is not None
            self._aggregate(losses, counts, features)
        else:
            if self.weighting is not None:
                loss = self.weighting(losses, counts)
            elif self._only is not None:
                loss = torch.where(self._only, losses, torch.zeros_like(losses)).sum()
            elif self.scheduler is not None:
                loss = self.scheduler(losses, counts)  # also DST's own epoch statistics
            else:
                # Equal weights: an unlabelled task's loss is 0 (MaskedMultiTaskLoss).
                loss = losses.sum()
            torch.autograd.backward(loss)
        self.optimizer.step()
        if self._famo:
            # FAMO learns its weights from how the losses moved over the step, same batch.
            with torch.no_grad(), self._autocast():
                after = self.loss_fn(self.network(inputs), targets)
            self.weighting.update(after)  # type: ignore[union-attr,operator]

    def end_epoch(self) -> None:
        """Read the epoch's losses (one host read, summed over ranks) and let DST draw the
        next epoch's gates."""
        sums = self._losses.collect()
        steps = sums[LABELLED_STEPS]
        means = torch.where(steps > 0, sums[LOSS_SUM] / steps.clamp(min=1), math.nan)
        self._epoch_losses = means.tolist()
        if self.scheduler is not None:
            self.scheduler.step()
        if isinstance(self.weighting, weighting.DynamicWeightAverage):
            self.weighting.step()

    @property
    def epoch_losses(self) -> dict[str, float]:
        """Each task's mean training loss over the labelled steps of the last epoch."""
        return dict(zip(self.task_names, self._epoch_losses, strict=True))

    @property
    def gates(self) -> dict[str, bool]:
        """Which tasks the current (next) epoch updates."""
        if self.scheduler is None:
            return dict.fromkeys(self.task_names, True)
        return self.scheduler.gates

    @property
    def keep_probabilities(self) -> dict[str, float]:
        if self.scheduler is None:
            return dict.fromkeys(self.task_names, 1.0)
        return self.scheduler.keep_probabilities

    @property
    def terms(self) -> dict[str, dict[str, float]]:
        """Each DST term's value per task at the last draw; empty for a method that drops
        no task."""
        return self.scheduler.terms if self.scheduler is not None and self.drops_tasks else {}

    @property
    def loss_weights(self) -> dict[str, float]:
        return (
            self.scheduler.loss_weights if self.scheduler is not None and self.drops_tasks else {}
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "losses": self._losses.saved_sums(),
            "epoch_losses": list(self._epoch_losses),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "weighting": None if self.weighting is None else self.weighting.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._losses.load_sums(state["losses"].to(self._losses.device))
        self._epoch_losses = list(state["epoch_losses"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.weighting is not None:
            self.weighting.load_state_dict(state["weighting"])

    def _aggregate(
        self, losses: Tensor, counts: Tensor, features: Tensor | dict[str, Tensor]
    ) -> None:
        from torchjd.autojac import jac_to_grad, mtl_backward

        if self.scheduler is None:
            kept, active_tasks = losses, self.task_names
        else:
            kept, active_tasks = (
                self.scheduler.kept_losses(losses, counts),
                self.scheduler.active_tasks,
            )
        # The aggregators solve on the CPU and synchronise anyway, so reading which tasks
        # are labelled costs nothing more. A zero row (an unlabelled task) would make
        # MGDA's update 0 and shrink UPGrad's mean, so only labelled tasks take part.
        labelled = dict(zip(self.task_names, (counts > 0).tolist(), strict=True))
        active = [i for i, t in enumerate(active_tasks) if labelled[t]]
        if not active:
            return
        heads = [list(self.model.heads[active_tasks[i]].parameters()) for i in active]
        # The losses of one kind come from one vectorised call and share graph nodes above
        # the features, so the graph must survive the per-task backward passes.
        shared = features if isinstance(features, Tensor) else list(features.values())
        mtl_backward(
            [kept[i] for i in active], features=shared, tasks_params=heads, retain_graph=True
        )
        jac_to_grad(list(self.model.backbone.parameters()), self.aggregator)


def _term(name: str, model: MultiHeadNet, train_labels: Tensor | None) -> Metric:
    if name == "depth":
        return NetworkDepth(model)
    if name == "labels":
        if train_labels is None:
            raise ValueError("DST's 'labels' term needs the training targets")
        return LabelCount(train_labels)
    if name == "incompleteness":
        return TaskIncompleteness()
    if name == "stagnancy":
        return TaskStagnancy()
    return Constant()


def _aggregator(class_name: str | None, method: str) -> Any:
    if class_name is None:
        return None
    try:
        return getattr(importlib.import_module("torchjd.aggregation"), class_name)()
    except ImportError as error:
        raise StudyError(
            f"method {method!r} needs TorchJD and its solvers ({error}); install them with "
            f"{_BASELINES_EXTRA}"
        ) from error
