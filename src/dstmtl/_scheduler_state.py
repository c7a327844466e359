"""TaskDropScheduler's state: one record, and its conversion to and from a state_dict."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

# Keys of a wrong state_dict listed in the error; a model's state_dict has hundreds.
_SHOWN_KEYS = 10
# Marks a record field that state_dicts saved before it existed lack; loading one of those
# keeps the scheduler's own value.
_NEW = {"optional": True}


@dataclasses.dataclass
class Record:
    """Everything the scheduler knows besides the generator, the device sums and the metrics;
    :meth:`TaskDropScheduler.state_dict` saves exactly these fields."""

    metric_weights: tuple[float, ...]
    loss_scaling: bool
    min_active_tasks: int
    redraw_every: int | None
    epoch: int
    baseline: Tensor  # [K] float64; NaN until a finite, positive mean
    previous: Tensor  # [K] the last measured mean
    epoch_losses: Tensor  # [K] the last epoch's means (NaN: not measured)
    label_counts: Tensor  # [K]
    terms: dict[str, Tensor]  # metric name -> [K]
    probabilities: Tensor  # [K]
    gates: Tensor  # [K] bool
    loss_weights: Tensor  # [K]
    calls_since_draw: int  # calls, or optimizer steps with an attached optimizer
    epoch_mean: str = dataclasses.field(default="step", metadata=_NEW)
    epochs: int | None = dataclasses.field(default=None, metadata=_NEW)
    cooldown_epochs: int = dataclasses.field(default=1, metadata=_NEW)
    # Redraw units (as calls_since_draw) since the last step(), compared across ranks.
    units_this_epoch: int = dataclasses.field(default=0, metadata=_NEW)
    # [K] bool: dropped by every gate in force since the last step().
    dropped_all_epoch: Tensor = dataclasses.field(
        default_factory=lambda: torch.zeros(0, dtype=torch.bool), metadata=_NEW
    )
    # [K] the rise of the epoch mean of tasks dropped for the whole epoch (NaN otherwise).
    dropped_loss_rise: Tensor = dataclasses.field(
        default_factory=lambda: torch.zeros(0, dtype=torch.float64), metadata=_NEW
    )


def saved(record: Record) -> dict[str, Any]:
    """The record's fields as a state_dict holds them: tensor copies, lists for tuples."""
    return {field.name: _saved(getattr(record, field.name)) for field in dataclasses.fields(record)}


def restored(record: Record, state_dict: Mapping[str, Any]) -> Record:
    """``record`` with every field that ``state_dict`` holds replaced by the saved value."""
    fresh = {
        field.name: _loaded(state_dict[field.name])
        for field in dataclasses.fields(record)
        if field.name in state_dict
    }
    return dataclasses.replace(record, **fresh)


def check_keys(state_dict: Mapping[str, Any], expected: list[str]) -> None:
    """Raise the error that names a dict of something else (a whole checkpoint, a model's
    state); fields newer than the state may be missing."""
    optional = {f.name for f in dataclasses.fields(Record) if f.metadata.get("optional")}
    if any(key not in state_dict for key in expected if key not in optional):
        found = list(state_dict)
        more = f" and {len(found) - _SHOWN_KEYS} more" if len(found) > _SHOWN_KEYS else ""
        raise ValueError(
            f"this is not a TaskDropScheduler state_dict: it has the keys "
            f"{found[:_SHOWN_KEYS]}{more}, where the keys {expected} were expected; pass "
            "what TaskDropScheduler.state_dict() returned, e.g. checkpoint['scheduler']"
        )


def _saved(value: Any) -> Any:
    """A record field as a state_dict holds it: tensor copies, lists for tuples."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: _saved(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return list(value)
    return value


def _loaded(value: Any) -> Any:
    """The inverse of :func:`_saved` (metric weights are the only list)."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: _loaded(item) for key, item in value.items()}
    if isinstance(value, list):
        return tuple(float(item) for item in value)
    return value
