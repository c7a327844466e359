"""Argument checks shared by the public classes; every message names what was found."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

_V = TypeVar("_V")


def check_task_names(task_names: Iterable[str], *, owner: str) -> tuple[str, ...]:
    """Return ``task_names`` as a tuple after checking it is non-empty and free of duplicates."""
    if isinstance(task_names, str):
        raise TypeError(
            f"{owner}: task names must be a sequence of strings, got the string {task_names!r}"
        )
    names = tuple(task_names)
    if not names:
        raise ValueError(f"{owner}: the task list is empty; give at least one task name")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(
                f"{owner}: task names must be strings, got {name!r} ({type(name).__name__})"
            )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{owner}: duplicate task names {duplicates}")
    return names


def check_mapping(value: object, *, what: str, expected: str, fix: str) -> None:
    """Raise ``TypeError`` naming what ``value`` is when it is not a mapping.

    An ``nn.ModuleDict`` (such as ``MultiHeadNet.heads``) counts as one, though it is not a
    ``collections.abc.Mapping``.
    """
    # A tuple, not Mapping | nn.ModuleDict: torch.compile in torch 2.6 cannot trace a union.
    if not isinstance(value, (Mapping, nn.ModuleDict)):
        found = (
            f"a tensor of shape {tuple(value.shape)}"
            if isinstance(value, Tensor)
            else type(value).__name__
        )
        raise TypeError(f"{what} must be {expected}, got {found}; {fix}")


def check_same_tasks(expected: Sequence[str], found: Collection[str], *, what: str) -> None:
    """Raise an error naming the missing and the unexpected tasks when ``found`` differs."""
    missing = [name for name in expected if name not in found]
    extra = sorted(name for name in found if name not in set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        raise ValueError(f"{what} do not match the tasks {list(expected)}: {', '.join(parts)}")


def ordered_values(
    values: Mapping[str, _V] | Sequence[_V], task_names: Sequence[str], *, what: str
) -> list[_V]:
    """Return per-task ``values`` in the order of ``task_names``, from a mapping or a sequence."""
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise TypeError(
            f"{what} must hold one value per task (a mapping by task name, or a sequence or a "
            f"1-D tensor in task order), got {values!r} ({type(values).__name__})"
        )
    if isinstance(values, Mapping):
        check_same_tasks(task_names, values.keys(), what=f"{what} keys")
        return [values[name] for name in task_names]
    items = list(values)
    if len(items) != len(task_names):
        raise ValueError(
            f"{what} has {len(items)} values for {len(task_names)} tasks {list(task_names)}"
        )
    return items


def per_task_tensor(
    values: Mapping[str, float] | Sequence[float] | Tensor,
    task_names: Sequence[str],
    *,
    what: str,
) -> Tensor:
    """Return one float64 CPU value per task, from a mapping, a sequence or a 1-D tensor."""
    if isinstance(values, Tensor):
        if values.dim() != 1 or values.numel() != len(task_names):
            raise ValueError(
                f"{what} must be a 1-D tensor with one value per task ({len(task_names)}), "
                f"got shape {tuple(values.shape)}"
            )
        return values.detach().to(device="cpu", dtype=torch.float64)
    return torch.tensor(
        [float(v) for v in ordered_values(values, task_names, what=what)], dtype=torch.float64
    )
