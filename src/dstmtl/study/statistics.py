r"""Statistics over seeds for a multi-task study, with numpy and the standard library only.

* :func:`summarize`: mean, sample standard deviation and a Student-t confidence interval of
  one score over seeds.
* :func:`compare_paired`: a method against a reference run with the same seeds: the
  difference per seed, wins and losses, its t-interval and a two-sided paired t-test.
* :func:`delta_m`: :math:`\Delta_m\%` (Maninis, Radosavovic and Kokkinos, CVPR 2019, as
  FAMO and Nash-MTL report it) against a reference method or single-task models.
* :func:`mean_ranks`: each method's rank per task, averaged over tasks.

The Student-t distribution comes from the regularised incomplete beta function, computed
here by its continued fraction (the tests compare it with SciPy), so the core install
needs no SciPy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "PairedComparison",
    "Summary",
    "compare_paired",
    "delta_m",
    "mean_ranks",
    "student_t_quantile",
    "student_t_two_sided_p",
    "summarize",
]


@dataclass(frozen=True)
class Summary:
    r"""One score over :math:`n` seeds.

    ``low`` and ``high`` bound the ``confidence`` Student-t interval
    :math:`\bar x \pm t_{n-1} s / \sqrt n`; with one seed ``std``, ``low`` and ``high`` are
    NaN (one seed says nothing about the spread).
    """

    mean: float
    std: float
    low: float
    high: float
    n: int
    confidence: float


@dataclass(frozen=True)
class PairedComparison:
    r"""A method against the reference on the same seeds (a paired comparison).

    ``differences`` are method minus reference per seed, in the seeds' order; ``wins``
    counts the seeds where the method is better (higher, or lower when lower is better),
    ``losses`` where it is worse and ``ties`` the rest. ``difference`` summarises the
    differences with a t-interval. ``t`` and ``p_value`` are those of the two-sided paired
    t-test of a zero mean difference, :math:`t = \bar d / (s_d / \sqrt n)` with
    :math:`n - 1` degrees of freedom; ``beyond_noise`` is ``p_value < alpha``. With one
    seed, or differences that are all equal, the test is not defined: ``t`` and
    ``p_value`` are NaN (equal non-zero differences: ``t`` infinite and ``p_value`` 0) and
    ``beyond_noise`` follows from them.
    """

    differences: tuple[float, ...]
    difference: Summary
    wins: int
    losses: int
    ties: int
    t: float
    p_value: float
    alpha: float
    beyond_noise: bool


def summarize(values: Sequence[float], *, confidence: float = 0.95) -> Summary:
    """Mean, sample standard deviation (``ddof=1``) and a Student-t interval over seeds.

    Example:
        >>> from dstmtl.study.statistics import summarize
        >>> s = summarize([0.80, 0.82, 0.84])
        >>> round(s.mean, 4), round(s.std, 4), round(s.low, 4), round(s.high, 4)
        (0.82, 0.02, 0.7703, 0.8697)
    """
    data = _finite_array(values, "summarize")
    _check_probability(confidence, "confidence")
    n = data.size
    mean = float(data.mean())
    if n < 2:
        return Summary(mean, math.nan, math.nan, math.nan, n, confidence)
    std = float(data.std(ddof=1))
    half = student_t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return Summary(mean, std, mean - half, mean + half, n, confidence)


def compare_paired(
    method: Sequence[float],
    reference: Sequence[float],
    *,
    higher_is_better: bool,
    alpha: float = 0.05,
) -> PairedComparison:
    """Compare two runs seed by seed with a two-sided paired t-test.

    Example:
        >>> from dstmtl.study.statistics import compare_paired
        >>> c = compare_paired([0.81, 0.83, 0.86], [0.80, 0.80, 0.82], higher_is_better=True)
        >>> c.wins, c.losses, round(c.difference.mean, 4), round(c.t, 3), round(c.p_value, 4)
        (3, 0, 0.0267, 3.024, 0.0942)
        >>> c.beyond_noise  # three seeds, all wins, and still within seed noise at 5%
        False
    """
    ours = _finite_array(method, "compare_paired: method")
    theirs = _finite_array(reference, "compare_paired: reference")
    if ours.size != theirs.size:
        raise ValueError(
            f"compare_paired: {ours.size} scores for the method and {theirs.size} for the "
            "reference; a paired comparison needs one of each per seed, in the same order"
        )
    _check_probability(alpha, "alpha")
    differences = ours - theirs
    better = differences > 0 if higher_is_better else differences < 0
    worse = differences < 0 if higher_is_better else differences > 0
    summary = summarize(differences.tolist(), confidence=1 - alpha)
    t, p_value = _paired_t(differences)
    return PairedComparison(
        differences=tuple(differences.tolist()),
        difference=summary,
        wins=int(better.sum()),
        losses=int(worse.sum()),
        ties=int(differences.size - better.sum() - worse.sum()),
        t=t,
        p_value=p_value,
        alpha=alpha,
        beyond_noise=bool(p_value < alpha),
    )


def delta_m(
    method: Mapping[str, float],
    reference: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
) -> float:
    r""":math:`\Delta_m\%`, the mean relative change against a reference, in percent.

    .. math::

        \Delta_m = \frac{100}{K} \sum_{k=1}^{K} (-1)^{\delta_k}
        \frac{M_{m,k} - M_{b,k}}{M_{b,k}}

    over the :math:`K` task metrics, :math:`\delta_k = 1` when higher is better for metric
    :math:`k`. As FAMO and Nash-MTL report it, **lower is better**: a negative value is an
    average improvement over the reference (equal weighting, or one model per task).

    Example:
        >>> from dstmtl.study.statistics import delta_m
        >>> value = delta_m(
        ...     {"acc": 0.88, "mae": 0.9},
        ...     {"acc": 0.80, "mae": 1.0},
        ...     {"acc": True, "mae": False},
        ... )
        >>> round(value, 6)  # (-10% - 10%) / 2: 10% better on both
        -10.0
    """
    if set(method) != set(reference) or set(method) != set(higher_is_better):
        raise ValueError(
            f"delta_m: the method has metrics {sorted(method)}, the reference "
            f"{sorted(reference)} and the directions {sorted(higher_is_better)}; give the same "
            "metrics to all three"
        )
    if not method:
        raise ValueError("delta_m: no metric given")
    total = 0.0
    for name, value in method.items():
        base = reference[name]
        if base == 0 or not math.isfinite(base) or not math.isfinite(value):
            raise ValueError(
                f"delta_m: metric {name!r} is {value} for the method and {base} for the "
                "reference; the relative change needs finite values and a non-zero reference"
            )
        sign = -1.0 if higher_is_better[name] else 1.0
        total += sign * (value - base) / base
    return 100 * total / len(method)


def mean_ranks(
    scores: Mapping[str, Mapping[str, float]], higher_is_better: Mapping[str, bool]
) -> dict[str, float]:
    """Each method's rank per metric (1 = best, ties share the mean of their ranks),
    averaged over the metrics.

    Args:
        scores: ``{method: {metric: value}}``, the same metrics for every method.
        higher_is_better: The direction of each metric.

    Example:
        >>> from dstmtl.study.statistics import mean_ranks
        >>> mean_ranks(
        ...     {"equal": {"a": 0.8, "mae": 2.0}, "dst": {"a": 0.9, "mae": 2.0}},
        ...     {"a": True, "mae": False},
        ... )
        {'equal': 1.75, 'dst': 1.25}
    """
    if not scores:
        raise ValueError("mean_ranks: no method given")
    metrics = set(higher_is_better)
    for name, values in scores.items():
        if set(values) != metrics:
            raise ValueError(
                f"mean_ranks: method {name!r} has metrics {sorted(values)}, expected "
                f"{sorted(metrics)}"
            )
    if not metrics:
        raise ValueError("mean_ranks: no metric given")
    totals = dict.fromkeys(scores, 0.0)
    for metric, higher in higher_is_better.items():
        sign = 1.0 if higher else -1.0
        values = {name: sign * scores[name][metric] for name in scores}
        for name, value in values.items():
            better = sum(other > value for other in values.values())
            tied = sum(other == value for other in values.values())
            totals[name] += 1 + better + (tied - 1) / 2
    return {name: total / len(metrics) for name, total in totals.items()}


def student_t_two_sided_p(t: float, df: float) -> float:
    r""":math:`P(|T| \ge |t|)` for Student's t with ``df`` degrees of freedom,
    :math:`I_{\nu/(\nu+t^2)}(\nu/2, 1/2)`.

    Example:
        >>> from dstmtl.study.statistics import student_t_two_sided_p
        >>> round(student_t_two_sided_p(2.0, 4), 6)
        0.116117
    """
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return _regularized_beta(df / 2, 0.5, df / (df + t * t))


def student_t_quantile(probability: float, df: float) -> float:
    """The ``probability`` quantile of Student's t with ``df`` degrees of freedom.

    Example:
        >>> from dstmtl.study.statistics import student_t_quantile
        >>> round(student_t_quantile(0.975, 2), 4)
        4.3027
    """
    _check_probability(probability, "probability")
    if probability == 0.5:
        return 0.0
    tail = 2 * min(probability, 1 - probability)  # two-sided tail of |T| >= q
    low, high = 0.0, 1.0
    while student_t_two_sided_p(high, df) > tail:
        high *= 2
    for _ in range(200):  # bisection to the last bit of a float
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if student_t_two_sided_p(middle, df) > tail:
            low = middle
        else:
            high = middle
    quantile = (low + high) / 2
    return quantile if probability > 0.5 else -quantile


def _paired_t(differences: npt.NDArray[np.float64]) -> tuple[float, float]:
    n = differences.size
    if n < 2:
        return math.nan, math.nan
    mean = float(differences.mean())
    std = float(differences.std(ddof=1))
    if std == 0:
        return (math.nan, math.nan) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    t = mean / (std / math.sqrt(n))
    return t, student_t_two_sided_p(t, n - 1)


def _regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) from its continued fraction, on the side where it converges fast."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1 - math.exp(log_front) * _beta_fraction(b, a, 1 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function, by the modified Lentz method."""
    tiny = 1e-300

    def guarded(value: float) -> float:
        return value if abs(value) > tiny else tiny

    c, d = 1.0, 1 / guarded(1 - (a + b) * x / (a + 1))
    fraction = d
    for m in range(1, 1000):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for coefficient in (even, odd):
            d = 1 / guarded(1 + coefficient * d)
            c = guarded(1 + coefficient / c)
            fraction *= c * d
        if abs(c * d - 1) < 1e-16:
            break
    return fraction


def _finite_array(values: Sequence[float], what: str) -> npt.NDArray[np.float64]:
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or data.size == 0:
        raise ValueError(f"{what}: expected a non-empty sequence of numbers (one per seed)")
    if not np.isfinite(data).all():
        raise ValueError(
            f"{what}: {list(data)} holds NaN or infinity; a failed run's score cannot be averaged"
        )
    return data


def _check_probability(value: float, name: str) -> None:
    if not 0 < value < 1:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value}")
