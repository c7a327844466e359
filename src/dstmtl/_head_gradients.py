"""Clears the gradients of parameters that only dropped tasks use, so no optimizer moves them.

A dropped task's loss enters the training loss multiplied by 0, so its head gets a zero
gradient, and an optimizer with momentum or weight decay would still move it. Setting
``grad`` to ``None`` instead makes every ``torch.optim`` optimizer skip the parameter.
The decision reads only the gates, which live on the host: no device synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class HeadGradients:
    """The parameters of each task, and the hooks that drop their gradients."""

    def __init__(self, owners: Sequence[tuple[nn.Parameter, frozenset[int]]]) -> None:
        self._owners = owners
        self._dropped: tuple[bool, ...] = ()
        self._handles = [self._register(parameter, tasks) for parameter, tasks in owners]

    def update(self, gates: Tensor) -> None:
        """Follow new gates (a host bool tensor in task order)."""
        self._dropped = tuple(not gate for gate in gates.tolist())

    def clear(self) -> None:
        """Set ``grad`` to ``None`` on every parameter whose tasks are all dropped."""
        for parameter, tasks in self._owners:
            if self._all_dropped(tasks):
                parameter.grad = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _all_dropped(self, tasks: frozenset[int]) -> bool:
        return bool(self._dropped) and all(self._dropped[j] for j in tasks)

    def _register(self, parameter: nn.Parameter, tasks: frozenset[int]) -> RemovableHandle:
        def hook(parameter: Tensor) -> None:
            if self._all_dropped(tasks):
                parameter.grad = None

        # torch does not annotate this method; the variable gives the call a type.
        register: Callable[[Callable[[Tensor], None]], RemovableHandle] = (
            parameter.register_post_accumulate_grad_hook
        )
        return register(hook)


def owners_by_parameter(
    parameters: object, task_names: Sequence[str]
) -> list[tuple[nn.Parameter, frozenset[int]]]:
    """Each parameter with the indices of the tasks that use it.

    ``parameters`` is a module with a ``heads`` mapping by task name (a ``MultiHeadNet``),
    or a mapping from task name to a module, a parameter or an iterable of parameters. A
    parameter listed under several tasks belongs to all of them.
    """
    heads = getattr(parameters, "heads", parameters)
    if not isinstance(heads, (Mapping, nn.ModuleDict)):
        raise TypeError(
            "TaskDropScheduler.attach: model must be a MultiHeadNet or a mapping from task "
            f"name to a module or its parameters, got {type(parameters).__name__}; pass "
            "e.g. model (a MultiHeadNet) or {'task': model.head_of_task}"
        )
    unknown = sorted(str(name) for name in heads if name not in task_names)
    if unknown:
        raise ValueError(
            f"TaskDropScheduler.attach: {unknown} are not tasks of this scheduler "
            f"{list(task_names)}; give the parameters of its tasks only"
        )
    tasks_of: dict[nn.Parameter, set[int]] = {}
    for name, part in heads.items():
        for parameter in _parameters(part, name):
            tasks_of.setdefault(parameter, set()).add(task_names.index(name))
    return [(parameter, frozenset(tasks)) for parameter, tasks in tasks_of.items()]


def _parameters(part: object, name: str) -> Iterable[nn.Parameter]:
    if isinstance(part, nn.Module):
        return part.parameters()
    if isinstance(part, nn.Parameter):
        return [part]
    if isinstance(part, Iterable) and not isinstance(part, (Tensor, str)):
        found = list(part)
        if all(isinstance(p, nn.Parameter) for p in found):
            return found
    raise TypeError(
        f"TaskDropScheduler.attach: the parameters of task {name!r} must be a module, a "
        f"parameter or an iterable of parameters, got {type(part).__name__}"
    )


def check_optimizer(optimizer: object) -> torch.optim.Optimizer:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            "TaskDropScheduler.attach: optimizer must be a torch.optim.Optimizer, got "
            f"{type(optimizer).__name__}"
        )
    return optimizer
