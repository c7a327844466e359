"""The multi-task methods the study compares, each a recipe for one training step.

Every method owns a :class:`dstmtl.TaskDropScheduler`: for DST it draws the gates, for the
other methods it keeps every task (``Constant``) and only gathers the per-task training
losses. The aggregators receive ``scheduler.kept_losses(...)``, so when DST is combined
with them the dropped tasks never reach the aggregator.

A task without a labelled sample in the batch (its masked loss is exactly 0) is absent from
that step for every method: the loss weightings of :mod:`dstmtl.study.weighting` skip it,
and the aggregators get the Jacobian of the labelled tasks only (a zero row would make
MGDA's minimum-norm combination 0 and shrink UPGrad's mean).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
from celeba_files import CelebAError
from torch import Tensor, nn

from dstmtl import MultiHeadNet, TaskDropScheduler
from dstmtl.metrics import (
    Constant,
    LabelCount,
    Metric,
    NetworkDepth,
    TaskIncompleteness,
    TaskStagnancy,
)
from dstmtl.study import weighting

if TYPE_CHECKING:
    from torchjd.aggregation import Aggregator

DEFAULT_METHODS = ("equal", "dst")
_BASELINES_EXTRA = "pip install 'dstmtl[baselines]'"

# Short names for --dst-metrics, in the order the paper lists the terms.
DST_METRICS = ("depth", "labels", "incompleteness", "stagnancy", "constant")


@dataclass(frozen=True)
class _Spec:
    description: str
    dst_metrics: tuple[str, ...] = ("constant",)
    scalarizer: str | None = None
    aggregator: str | None = None


_METHODS: dict[str, _Spec] = {
    "equal": _Spec("equal weights (the report's baseline)"),
    "dst": _Spec("DST, task incompleteness alone (the report's choice)", ("incompleteness",)),
    "dst-all": _Spec("DST, all five terms", DST_METRICS),
    "uw": _Spec("uncertainty weighting (Kendall et al., 2018)", scalarizer="UW"),
    "dwa": _Spec("dynamic weight average (Liu et al., 2019)", scalarizer="DWA"),
    "rlw": _Spec("random loss weighting (Lin et al., 2022)", scalarizer="Random"),
    "famo": _Spec("FAMO (Liu et al., 2023)", scalarizer="FAMO"),
    "upgrad": _Spec("UPGrad, Jacobian descent (Quinton & Rey, 2024)", aggregator="UPGrad"),
    "mgda": _Spec("MGDA (Sener & Koltun, 2018)", aggregator="MGDA"),
    "pcgrad": _Spec("PCGrad (Yu et al., 2020)", aggregator="PCGrad"),
    "dst+upgrad": _Spec(
        "DST (task incompleteness) composed with UPGrad", ("incompleteness",), aggregator="UPGrad"
    ),
}
METHOD_NAMES = tuple(_METHODS)
# Scalarizers that learn task weights from the losses they see: under torchrun each process
# would learn its own (RLW's draws come from torch's RNG, seeded alike on every process).
_LEARNS_WEIGHTS = ("UW", "DWA", "FAMO")
_SCALARIZERS: dict[str, Callable[[int], nn.Module]] = {
    "UW": weighting.UncertaintyWeighting,
    "DWA": weighting.DynamicWeightAverage,
    "Random": weighting.RandomWeighting,
    "FAMO": weighting.FAMO,
}


def parse_methods(spec: str) -> tuple[str, ...]:
    """Comma-separated method names: :data:`METHOD_NAMES`, or ``dst-<term>+<term>...``."""
    names = tuple(name.strip() for name in spec.split(",") if name.strip())
    unknown = [name for name in names if _spec(name) is None]
    if unknown or not names:
        raise CelebAError(
            f"unknown method(s) {unknown or [spec]}; valid methods: {', '.join(METHOD_NAMES)}, "
            f"or DST with chosen terms as dst-<term>+<term> from {', '.join(DST_METRICS)}"
        )
    if len(set(names)) != len(names):
        raise CelebAError(f"--methods names a method twice: {spec}")
    return names


def dst_method(spec: str) -> str:
    """The method name of a DST run with the terms of ``--dst-metrics`` (``all`` or a list)."""
    if spec.strip() == "all":
        return "dst-all"
    name = "dst-" + "+".join(term.strip() for term in spec.split(","))
    parse_methods(name)
    return name


def check_methods(names: Sequence[str], *, tasks: int, distributed: bool) -> None:
    """Fail now, before any data work, on a method that this install or launch cannot run."""
    for name in names:
        spec = _spec(name)
        assert spec is not None, f"unchecked method name {name!r}"
        _torchjd(spec.aggregator, name)
        _check_launch(spec, name, distributed)


def _check_launch(spec: _Spec, name: str, distributed: bool) -> None:
    if distributed and (spec.aggregator is not None or spec.scalarizer in _LEARNS_WEIGHTS):
        raise CelebAError(
            f"method {name!r} keeps TorchJD state that each torchrun process would build "
            "from its own shard alone (per-task gradients, or weights learned from the "
            "losses), so this example runs it on one process only; run it without torchrun"
        )


def _spec(name: str) -> _Spec | None:
    if name in _METHODS:
        return _METHODS[name]
    terms = tuple(name.removeprefix("dst-").split("+"))
    if name.startswith("dst-") and all(term in DST_METRICS for term in terms):
        return _Spec(f"DST, terms: {', '.join(terms)}", terms)
    return None


class Method:
    """One method's state and its training step."""

    def __init__(
        self,
        name: str,
        model: MultiHeadNet,
        train_labels: npt.NDArray[np.float32],
        *,
        seed: int,
        distributed: bool,
    ) -> None:
        spec = _spec(name)
        assert spec is not None, f"unchecked method name {name!r}"
        self.name = name
        self.description = spec.description
        self.drops_tasks = spec.dst_metrics != ("constant",)
        tasks = model.task_names
        metrics = [_metric(metric, model, train_labels) for metric in spec.dst_metrics]
        self.scheduler = TaskDropScheduler(tasks, metrics, generator=seed)
        self._scalarizer_name = spec.scalarizer
        self.scalarizer: nn.Module | None = (
            None if spec.scalarizer is None else _SCALARIZERS[spec.scalarizer](len(tasks))
        )
        self.aggregator: Aggregator | None = _torchjd(spec.aggregator, name)
        _check_launch(spec, name, distributed)
        self._model = model

    def modules(self) -> list[nn.Module]:
        """The TorchJD modules, to move to the training device."""
        return [m for m in (self.scalarizer, self.aggregator) if m is not None]

    def parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the model's optimizer (uncertainty weighting's log-variances).

        FAMO's logits are left out on purpose: FAMO updates them with its own optimizer.
        """
        if self.scalarizer is None or self._scalarizer_name == "FAMO":
            return []
        return list(self.scalarizer.parameters())

    def backward(
        self, losses: Tensor, counts: Tensor, features: Tensor | dict[str, Tensor] | None = None
    ) -> None:
        """Turn the per-task losses into gradients on the model (and method) parameters.

        The aggregator methods need ``features``, the model's shared representation.
        """
        if self.aggregator is not None:
            assert features is not None
            from torchjd.autojac import jac_to_grad, mtl_backward

            kept = self.scheduler.kept_losses(losses, counts)
            # The aggregators synchronise anyway (they solve on the CPU), so reading which
            # tasks are labelled costs nothing more.
            labelled = dict(zip(self._model.task_names, (counts > 0).tolist(), strict=True))
            active = [i for i, t in enumerate(self.scheduler.active_tasks) if labelled[t]]
            if not active:
                return  # no labelled task in the batch: no gradient, the step changes nothing
            tasks = [self.scheduler.active_tasks[i] for i in active]
            heads = [list(self._model.heads[t].parameters()) for t in tasks]
            shared = features if isinstance(features, Tensor) else list(features.values())
            # The binary losses share graph nodes above the features (one vectorised loss
            # call), so the graph must survive the per-task backward passes.
            mtl_backward(
                [kept[i] for i in active], features=shared, tasks_params=heads, retain_graph=True
            )
            jac_to_grad(list(self._model.backbone.parameters()), self.aggregator)
        elif self.scalarizer is not None:
            # UW, DWA, RLW and FAMO are not combined with DST: they see every task, every step.
            self.scheduler(losses, counts)  # the epoch's loss records
            self.scalarizer(losses, counts).backward()
        else:
            self.scheduler(losses, counts).backward()

    def after_optimizer_step(self, recompute_losses: Callable[[], Tensor]) -> None:
        """FAMO learns its weights from how the losses moved over the step, on the same batch."""
        if self.scalarizer is not None and self._scalarizer_name == "FAMO":
            with torch.no_grad():
                self.scalarizer.update(recompute_losses())  # type: ignore[operator]

    def end_epoch(self) -> None:
        self.scheduler.step()
        if self.scalarizer is not None and self._scalarizer_name == "DWA":
            self.scalarizer.step()  # type: ignore[operator]

    def state_dict(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler.state_dict(),
            "modules": [module.state_dict() for module in self.modules()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        for module, module_state in zip(self.modules(), state["modules"], strict=True):
            module.load_state_dict(module_state)


def _metric(name: str, model: MultiHeadNet, train_labels: npt.NDArray[np.float32]) -> Metric:
    if name == "depth":
        return NetworkDepth(model)
    if name == "labels":
        return LabelCount(torch.from_numpy(train_labels))
    if name == "incompleteness":
        return TaskIncompleteness()
    if name == "stagnancy":
        return TaskStagnancy()
    return Constant()


def _torchjd(class_name: str | None, method: str) -> Any:
    """A TorchJD aggregator by class name (``None`` for none)."""
    if class_name is None:
        return None
    try:
        return getattr(importlib.import_module("torchjd.aggregation"), class_name)()
    except ImportError as error:
        raise CelebAError(
            f"method {method!r} needs TorchJD and its solvers ({error}); install them with "
            f"{_BASELINES_EXTRA}"
        ) from error
