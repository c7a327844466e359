"""TaskDropScheduler's argument checks; every message names what was found."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from dstmtl._validation import check_same_tasks
from dstmtl.metrics import Metric

EPOCH_MEANS = ("step", "label")


def check_metrics(metrics: Sequence[Metric]) -> tuple[Metric, ...]:
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


def check_metric_weights(
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


def check_optional_int(value: object, name: str, *, low: int) -> int | None:
    """``value`` if it is ``None`` or an int (not a bool) of at least ``low``."""
    return None if value is None else check_int(value, name, low=low, optional=True)


def check_int(
    value: object,
    name: str,
    *,
    low: int,
    high: int | None = None,
    high_is: str = "",
    optional: bool = False,
) -> int:
    """``value`` if it is an int (not a bool) in ``[low, high]``; ``high_is`` names ``high``."""
    if high is None:
        bounds = f"{low} or more"
    else:
        bounds = f"between {low} and {high_is + ' (' if high_is else ''}{high}{')' * bool(high_is)}"
    if isinstance(value, bool) or not isinstance(value, int):
        wanted = f"an int, {bounds}" + (", or None" if optional else "")
        raise TypeError(
            f"TaskDropScheduler: {name} must be {wanted}, got {value!r} ({type(value).__name__})"
        )
    if value < low or (high is not None and value > high):
        raise ValueError(f"TaskDropScheduler: {name} must be {bounds}, got {value}")
    return value


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(
            f"TaskDropScheduler: {name} must be True or False, got {value!r} "
            f"({type(value).__name__})"
        )
    return value


def check_epoch_mean(value: object) -> str:
    if value not in EPOCH_MEANS:
        raise ValueError(
            f"TaskDropScheduler: epoch_mean must be one of {list(EPOCH_MEANS)}, got {value!r}"
        )
    assert isinstance(value, str)
    return value


def make_generator(generator: torch.Generator | int | None) -> torch.Generator:
    """The draws' own generator. ``None`` seeds it from the operating system, leaving torch's
    global generator (initial weights, data order) untouched."""
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
            f"(a seed from the operating system), got {generator!r} "
            f"({type(generator).__name__})"
        )
    fresh = torch.Generator()
    if generator is None:
        fresh.seed()
    else:
        fresh.manual_seed(generator)
    return fresh


def check_step_input(
    losses: Tensor | Mapping[str, Tensor],
    label_counts: Tensor | None,
    task_names: Sequence[str],
    *,
    needs_counts: bool,
) -> Tensor:
    """The losses as a ``[K]`` tensor in task order; reads only types, shapes and dtypes."""
    num_tasks = len(task_names)
    if isinstance(losses, Mapping):
        check_same_tasks(task_names, losses.keys(), what="loss names")
        shapes = {name: tuple(losses[name].shape) for name in task_names}
        not_scalar = {name: shape for name, shape in shapes.items() if math.prod(shape) != 1}
        if not_scalar:
            raise ValueError(
                f"TaskDropScheduler expects one scalar loss per task name; {not_scalar} "
                "hold several values (reduce each to its mean first)"
            )
        losses = torch.stack([losses[name].reshape(()) for name in task_names])
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
            f"{list(task_names)}, got shape {tuple(losses.shape)}"
        )
    if label_counts is None and needs_counts:
        raise ValueError(
            "TaskDropScheduler(epoch_mean='label') weighs each step by its labelled "
            "samples: pass them with the losses, scheduler(losses, loss_fn.label_counts)"
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


def check_term(metric: Metric, term: object, task_names: Sequence[str]) -> Tensor:
    """A metric's term as float64 on the CPU, after checking its shape and range."""
    if not isinstance(term, Tensor) or term.shape != (len(task_names),):
        found = tuple(term.shape) if isinstance(term, Tensor) else type(term).__name__
        raise ValueError(
            f"metric {metric.name!r} must return a tensor of shape ({len(task_names)},)"
            f", one value per task, got {found}"
        )
    term = term.detach().to("cpu", torch.float64)
    if not bool(((term >= 0) & (term <= 1)).all()):
        values = dict(zip(task_names, term.tolist(), strict=True))
        raise ValueError(f"metric {metric.name!r} returned values outside [0, 1]: {values}")
    return term
