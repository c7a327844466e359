"""dstmtl.study.statistics against values computed by hand (and SciPy where it is installed)."""

from __future__ import annotations

import math

import pytest

from dstmtl.study.statistics import (
    compare_paired,
    delta_m,
    mean_ranks,
    student_t_quantile,
    student_t_two_sided_p,
    summarize,
)

# Student-t quantiles from printed tables: t_{0.975} for 1, 2, 4 and 30 degrees of freedom.
T_975 = {1: 12.7062, 2: 4.3027, 4: 2.7764, 30: 2.0423}


@pytest.mark.parametrize(("df", "quantile"), T_975.items())
def test_t_quantiles_match_the_tables(df: int, quantile: float) -> None:
    assert student_t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-4)
    assert student_t_quantile(0.025, df) == pytest.approx(-quantile, abs=1e-4)
    assert student_t_two_sided_p(quantile, df) == pytest.approx(0.05, abs=1e-5)


def test_t_with_one_degree_of_freedom_is_cauchy() -> None:
    # P(|T| >= t) = 1 - 2 atan(t) / pi for the Cauchy distribution.
    for t in (0.1, 1.0, 3.0, 50.0):
        assert student_t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi)


def test_t_distribution_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 9, 29, 200):
        for t in (0.0, 0.3, 1.0, 2.5, 7.0, 40.0):
            assert student_t_two_sided_p(t, df) == pytest.approx(
                2 * stats.t.sf(t, df), rel=1e-9, abs=1e-15
            )
        for p in (0.6, 0.9, 0.975, 0.995):
            assert student_t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_summary_by_hand() -> None:
    # mean 2, deviations -1, 0, 1: s = 1; half width t_{0.975,2} / sqrt(3).
    summary = summarize([1.0, 2.0, 3.0])
    assert summary.mean == 2
    assert summary.std == 1
    half = 4.302653 / math.sqrt(3)
    assert summary.low == pytest.approx(2 - half, abs=1e-6)
    assert summary.high == pytest.approx(2 + half, abs=1e-6)
    assert (summary.n, summary.confidence) == (3, 0.95)


def test_one_seed_has_a_mean_and_no_interval() -> None:
    summary = summarize([0.7])
    assert summary.mean == 0.7
    assert math.isnan(summary.std)
    assert math.isnan(summary.low)
    assert math.isnan(summary.high)


def test_paired_comparison_by_hand() -> None:
    # Differences 0.01, 0.03, 0.04: mean 0.08/3, s = 0.01 sqrt(7/3), t = mean / (s / sqrt 3).
    comparison = compare_paired([0.81, 0.83, 0.86], [0.80, 0.80, 0.82], higher_is_better=True)
    differences = [0.01, 0.03, 0.04]
    mean = sum(differences) / 3
    s = math.sqrt(sum((d - mean) ** 2 for d in differences) / 2)
    t = mean / (s / math.sqrt(3))
    assert comparison.differences == pytest.approx(differences)
    assert comparison.difference.mean == pytest.approx(mean)
    assert comparison.difference.std == pytest.approx(s)
    assert s == pytest.approx(0.01 * math.sqrt(7 / 3))
    assert comparison.t == pytest.approx(t)
    assert comparison.t == pytest.approx(3.0237, abs=1e-4)
    # Two-sided p between the table's 0.1 (t = 2.920) and 0.05 (t = 4.303) for 2 df.
    assert 0.05 < comparison.p_value < 0.1
    assert (comparison.wins, comparison.losses, comparison.ties) == (3, 0, 0)
    assert not comparison.beyond_noise


def test_paired_comparison_against_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    method = [0.71, 0.74, 0.69, 0.77, 0.73]
    reference = [0.70, 0.70, 0.70, 0.71, 0.72]
    expected = stats.ttest_rel(method, reference)
    comparison = compare_paired(method, reference, higher_is_better=True)
    assert comparison.t == pytest.approx(expected.statistic)
    assert comparison.p_value == pytest.approx(expected.pvalue)


def test_lower_is_better_turns_wins_and_losses_around() -> None:
    comparison = compare_paired([1.0, 2.0, 3.0], [2.0, 2.0, 2.0], higher_is_better=False)
    assert (comparison.wins, comparison.losses, comparison.ties) == (1, 1, 1)
    assert comparison.difference.mean == 0
    assert comparison.p_value == pytest.approx(1.0)


def test_a_clear_difference_is_beyond_noise() -> None:
    comparison = compare_paired(
        [0.90, 0.91, 0.92, 0.90], [0.80, 0.80, 0.81, 0.80], higher_is_better=True
    )
    assert comparison.p_value < 1e-3
    assert comparison.beyond_noise


def test_identical_and_constant_differences() -> None:
    same = compare_paired([0.5, 0.6], [0.5, 0.6], higher_is_better=True)
    assert math.isnan(same.t)
    assert math.isnan(same.p_value)
    assert not same.beyond_noise
    assert same.ties == 2
    shifted = compare_paired([0.6, 0.7], [0.5, 0.6], higher_is_better=True)
    assert shifted.t == math.inf
    assert shifted.p_value == 0
    one_seed = compare_paired([0.6], [0.5], higher_is_better=True)
    assert one_seed.wins == 1
    assert math.isnan(one_seed.p_value)


def test_delta_m_by_hand() -> None:
    # Accuracy up 0.8 -> 0.84 (+5%, counts -5), MAE up 2.0 -> 2.2 (+10%, counts +10),
    # RMSE down 4 -> 3 (-25%): (-5 + 10 - 25) / 3.
    value = delta_m(
        {"acc": 0.84, "mae": 2.2, "rmse": 3.0},
        {"acc": 0.80, "mae": 2.0, "rmse": 4.0},
        {"acc": True, "mae": False, "rmse": False},
    )
    assert value == pytest.approx(-20 / 3)
    assert delta_m({"a": 0.5}, {"a": 0.5}, {"a": True}) == 0


def test_mean_ranks_by_hand() -> None:
    scores = {
        "equal": {"a": 0.8, "b": 0.7, "mae": 1.0},
        "dst": {"a": 0.9, "b": 0.7, "mae": 2.0},
        "uw": {"a": 0.7, "b": 0.6, "mae": 0.5},
    }
    ranks = mean_ranks(scores, {"a": True, "b": True, "mae": False})
    # a: dst 1, equal 2, uw 3; b: equal and dst tie for 1-2 (1.5), uw 3; mae: uw 1, equal 2, dst 3.
    assert ranks == {"equal": (2 + 1.5 + 2) / 3, "dst": (1 + 1.5 + 3) / 3, "uw": (3 + 3 + 1) / 3}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: summarize([]), "non-empty sequence"),
        (lambda: summarize([0.5, float("nan")]), "holds NaN or infinity"),
        (lambda: summarize([0.5, 0.6], confidence=1.0), "confidence must lie strictly"),
        (
            lambda: compare_paired([0.5, 0.6], [0.5], higher_is_better=True),
            "2 scores for the method and 1 for the reference",
        ),
        (lambda: delta_m({"a": 1.0}, {"a": 0.0}, {"a": True}), "non-zero reference"),
        (lambda: delta_m({"a": 1.0}, {"b": 1.0}, {"a": True}), "same metrics to all three"),
        (lambda: mean_ranks({"m": {"a": 1.0}}, {"b": True}), "has metrics"),
        (lambda: student_t_two_sided_p(1.0, 0), "degrees of freedom must be positive"),
    ],
)
def test_bad_input_is_named(call: object, message: str) -> None:
    assert callable(call)
    with pytest.raises(ValueError, match=message):
        call()
