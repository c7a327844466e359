r"""Loss-weighting methods that act only on the tasks labelled in the batch.

With missing labels a task can have no labelled sample in a batch; its masked loss is then
exactly 0 (:class:`~dstmtl.MaskedMultiTaskLoss`), which the published methods read as a
perfect loss: uncertainty weighting drives that task's log-variance down, dynamic weight
average averages the zeros into the epoch loss, FAMO takes :math:`\log(0 + \epsilon)` and
shrinks the whole update by about :math:`10^{-8}`, and random weighting spends part of its
unit weight on a loss that is not there. Each method here treats such a task as absent for
that step instead: it gets no weight, no update of its state, and the present tasks are
combined as if it did not exist. With every task labelled they compute the published formulas.

Every ``forward`` takes the per-task losses ``[K]`` and the labelled samples per task ``[K]``
(:attr:`~dstmtl.MaskedMultiTaskLoss.label_counts`) and returns one loss to backpropagate.
Nothing here reads a device value on the host, so a step never synchronises with the device.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FAMO", "DynamicWeightAverage", "RandomWeighting", "UncertaintyWeighting"]


class UncertaintyWeighting(nn.Module):
    r"""Uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018) over the labelled tasks.

    .. math::

        L = \sum_{k \in P} \tfrac12 e^{-s_k} L_k + \tfrac12 s_k

    where :math:`P` is the set of tasks with a labelled sample in the batch and :math:`s_k`
    the learned log-variance of task :math:`k` (initialised to 0). An absent task's
    :math:`s_k` gets no gradient from the batch; without the mask its regulariser alone
    would pull :math:`s_k` down and raise the task's weight on every batch it misses. Train
    ``log_var`` with the model's optimizer.

    Example:
        >>> import torch
        >>> from dstmtl.study.weighting import UncertaintyWeighting
        >>> uw = UncertaintyWeighting(2)
        >>> uw(torch.tensor([0.8, 0.0]), torch.tensor([4.0, 0.0]))  # task 1 absent
        tensor(0.4000, grad_fn=<SumBackward0>)
    """

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.log_var = nn.Parameter(torch.zeros(_check_num_tasks(num_tasks)))

    def forward(self, losses: Tensor, label_counts: Tensor) -> Tensor:
        """The weighted loss of the ``[K]`` ``losses``; tasks whose count is 0 take no part."""
        present = _present(losses, label_counts, self.log_var.numel())
        terms = 0.5 * torch.exp(-self.log_var) * losses + 0.5 * self.log_var
        return torch.where(present, terms, torch.zeros_like(terms)).sum()


class DynamicWeightAverage(nn.Module):
    r"""Dynamic weight average (Liu, Johns and Davison, CVPR 2019) over the labelled tasks.

    .. math::

        L = \sum_{k \in P} \lambda_k L_k, \qquad
        \lambda_k = \frac{|P| \exp(r_k / T)}{\sum_{i \in P} \exp(r_i / T)}, \qquad
        r_k = \frac{\bar L_k(t-1)}{\bar L_k(t-2)}

    :math:`P` is the set of tasks labelled in the batch, :math:`\bar L_k(t)` the mean of
    task :math:`k`'s loss over the batches of epoch :math:`t` where it was labelled (a batch
    without its labels is not averaged in as a 0), and :math:`T` the temperature. Where a
    rate is not known (the first two epochs, or an epoch in which the task had no label)
    :math:`r_k = 1`, the rate of a loss that did not move; with every rate 1 the weights are
    all 1. Call :meth:`step` once at the end of each epoch. The epoch means are buffers, so
    ``state_dict()`` carries the whole state between epochs.

    Example:
        >>> import torch
        >>> from dstmtl.study.weighting import DynamicWeightAverage
        >>> dwa = DynamicWeightAverage(2)
        >>> for epoch_losses in ([2.0, 1.0], [1.0, 1.0]):
        ...     _ = dwa(torch.tensor(epoch_losses), torch.tensor([8.0, 0.0]))
        ...     dwa.step()
        >>> dwa.rates  # task 1 was never labelled: its rate is not known
        tensor([0.5000, 1.0000])
    """

    sums: Tensor
    batches: Tensor
    means: Tensor

    def __init__(self, num_tasks: int, temperature: float = 2.0) -> None:
        super().__init__()
        _check_num_tasks(num_tasks)
        if not temperature > 0:
            raise ValueError(
                f"DynamicWeightAverage: temperature must be positive, got {temperature}; the "
                "paper uses 2.0"
            )
        self.temperature = temperature
        self.register_buffer("sums", torch.zeros(num_tasks))
        self.register_buffer("batches", torch.zeros(num_tasks))
        # The means of the last two epochs, the older first; NaN where not known.
        self.register_buffer("means", torch.full((2, num_tasks), float("nan")))

    @property
    def rates(self) -> Tensor:
        """:math:`r_k`, 1 where not known."""
        rates = self.means[1] / self.means[0]
        return torch.where(rates.isfinite(), rates, torch.ones_like(rates))

    def forward(self, losses: Tensor, label_counts: Tensor) -> Tensor:
        """The weighted loss of the ``[K]`` ``losses``; tasks whose count is 0 take no part."""
        present = _present(losses, label_counts, self.sums.numel())
        weights = present.sum() * _masked_softmax(self.rates / self.temperature, present)
        detached = losses.detach().to(self.sums.dtype)
        self.sums += torch.where(present, detached, torch.zeros_like(detached))
        self.batches += present.to(self.batches.dtype)
        return (weights * torch.where(present, losses, torch.zeros_like(losses))).sum()

    def step(self) -> None:
        """End the epoch: its means become the newer of the two the rates are taken from."""
        means = self.sums / self.batches  # NaN for a task without a labelled batch
        self.means.copy_(torch.stack([self.means[1], means]))
        self.sums.zero_()
        self.batches.zero_()


class RandomWeighting(nn.Module):
    r"""Random loss weighting (Lin et al., TMLR 2022) over the labelled tasks.

    .. math::

        L = \sum_{k \in P} \lambda_k L_k, \qquad
        \lambda = \operatorname{softmax}_{P}(g), \quad g \sim \mathcal N(0, I_K)

    a fresh draw from torch's global generator at every call, normalised over the tasks
    :math:`P` labelled in the batch, so the weights of the present tasks sum to 1. ``K``
    numbers are drawn whatever :math:`P` is, so the draws of later steps do not depend on
    which labels were missing.

    Example:
        >>> import torch
        >>> from dstmtl.study.weighting import RandomWeighting
        >>> _ = torch.manual_seed(0)
        >>> RandomWeighting(2)(torch.tensor([0.7, 0.0]), torch.tensor([3.0, 0.0]))
        tensor(0.7000)
    """

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.num_tasks = _check_num_tasks(num_tasks)

    def forward(self, losses: Tensor, label_counts: Tensor) -> Tensor:
        """The weighted loss of the ``[K]`` ``losses``; tasks whose count is 0 take no part."""
        present = _present(losses, label_counts, self.num_tasks)
        draws = torch.randn(self.num_tasks, device=losses.device, dtype=losses.dtype)
        weights = _masked_softmax(draws, present)
        return (weights * torch.where(present, losses, torch.zeros_like(losses))).sum()


class FAMO(nn.Module):
    r"""FAMO, fast adaptive multitask optimisation (Liu et al., NeurIPS 2023), over the
    labelled tasks.

    .. math::

        L = c \sum_{k \in P} z_k \log(L_k + \epsilon), \qquad
        z = \operatorname{softmax}_P(w), \qquad
        c = \Big(\sum_{k \in P} \frac{z_k}{L_k + \epsilon}\Big)^{-1}

    with :math:`c` a constant in the backward pass and :math:`P` the tasks labelled in the
    batch. After the optimizer step, :meth:`update` takes the losses recomputed on the same
    batch and moves the logits :math:`w` with their own Adam along
    :math:`\delta_k = \log(L_k^{\text{before}} + \epsilon) - \log(L_k^{\text{after}} + \epsilon)`
    through :math:`z`: the gradient is :math:`z_k (\delta_k - \sum_{i \in P} z_i \delta_i)`
    on the present tasks, and an absent task's logit stays as it was (Adam's decay and
    momentum included). Leave ``logits`` out of the model's optimizer. The Adam state is
    part of ``state_dict()``.

    Example:
        >>> import torch
        >>> from dstmtl.study.weighting import FAMO
        >>> famo = FAMO(3)
        >>> losses = torch.tensor([0.5, 0.0, 2.0], requires_grad=True)
        >>> famo(losses, torch.tensor([4.0, 0.0, 2.0])).backward()  # task 1 absent
        >>> losses.grad  # c z_k / L_k: the update is shared by tasks 0 and 2
        tensor([0.8000, 0.0000, 0.2000])
        >>> famo.update(torch.tensor([0.4, 0.0, 1.9]))  # task 0 fell faster: less weight
        >>> famo.logits.detach()
        tensor([-0.0250,  0.0000,  0.0250])
    """

    def __init__(
        self,
        num_tasks: int,
        *,
        lr: float = 0.025,
        weight_decay: float = 1e-3,
        epsilon: float = 1e-8,
    ) -> None:
        super().__init__()
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("epsilon", epsilon)):
            if not value >= 0:
                raise ValueError(
                    f"FAMO: {name} must be >= 0, got {value}; the paper's defaults "
                    "are lr=0.025, weight_decay=1e-3, epsilon=1e-8"
                )
        self.logits = nn.Parameter(torch.zeros(_check_num_tasks(num_tasks)))
        self.epsilon = epsilon
        self._optimizer = torch.optim.Adam([self.logits], lr=lr, weight_decay=weight_decay)
        self._before: Tensor | None = None
        self._present: Tensor | None = None

    def forward(self, losses: Tensor, label_counts: Tensor) -> Tensor:
        """The weighted loss of the ``[K]`` ``losses``; tasks whose count is 0 take no part."""
        present = _present(losses, label_counts, self.logits.numel())
        weights = _masked_softmax(self.logits.detach(), present)
        shifted = torch.where(present, losses, torch.ones_like(losses)) + self.epsilon
        normaliser = (weights / shifted.detach()).sum()
        scale = weights / normaliser.clamp(min=torch.finfo(normaliser.dtype).tiny)
        self._before, self._present = shifted.detach(), present
        return (scale * torch.log(shifted)).sum()

    def update(self, losses: Tensor) -> None:
        """One Adam step of the logits from the losses after the model's step, same batch."""
        if self._before is None or self._present is None:
            raise RuntimeError("FAMO.update must follow a call of FAMO on the batch's losses")
        present = self._present
        after = torch.where(present, losses.detach(), torch.ones_like(losses)) + self.epsilon
        delta = torch.where(present, self._before.log() - after.log(), torch.zeros_like(after))
        weights = _masked_softmax(self.logits.detach(), present)
        previous = self.logits.detach().clone()
        self.logits.grad = weights * (delta - (weights * delta).sum())
        self._optimizer.step()
        self.logits.grad = None
        with torch.no_grad():
            self.logits.copy_(torch.where(present, self.logits, previous))
        self._before = self._present = None

    def get_extra_state(self) -> dict[str, Any]:
        """The state of the optimizer of ``logits``, saved with the module."""
        return self._optimizer.state_dict()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_extra_state` saved."""
        # Adam adopts the state's tensors as they are and updates them in place: a copy, so
        # that two modules loaded from one state dict do not step each other's moments.
        self._optimizer.load_state_dict(copy.deepcopy(state))


def _check_num_tasks(num_tasks: int) -> int:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
    return num_tasks


def _present(losses: Tensor, label_counts: Tensor, num_tasks: int) -> Tensor:
    if losses.shape != (num_tasks,) or label_counts.shape != (num_tasks,):
        raise ValueError(
            f"expected losses and label_counts of shape ({num_tasks},), got "
            f"{tuple(losses.shape)} and {tuple(label_counts.shape)}; pass the "
            "MaskedMultiTaskLoss output and its label_counts"
        )
    return label_counts.to(losses.device) > 0


def _masked_softmax(logits: Tensor, present: Tensor) -> Tensor:
    """softmax over the present entries, 0 elsewhere (all 0 when none is present)."""
    shifted = logits - torch.where(present, logits, torch.full_like(logits, -torch.inf)).amax()
    exp = torch.where(present, shifted.exp(), torch.zeros_like(shifted))
    return exp / exp.sum().clamp(min=torch.finfo(exp.dtype).tiny)
