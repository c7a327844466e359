"""Tests for the results folder: metrics.json, results.md, the figures and the summary."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import matplotlib.image
import pytest
import reporting
from PIL import Image
from reporting import EpochRecord, EvaluationMetrics, Results, RunResult

from dstmtl.study.statistics import PairedComparison, Summary

TASKS = ["Male", "Smiling", "Young"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Test accuracies chosen so the ranks are easy by hand, with a tie on Male:
#   Male:    dst 1, equal 2.5, uw 2.5
#   Smiling: equal 1, dst 2, uw 3
#   Young:   dst 1, uw 2, equal 3
ACCURACY = {
    "equal": {"Male": 0.90, "Smiling": 0.85, "Young": 0.70},
    "dst": {"Male": 0.92, "Smiling": 0.84, "Young": 0.75},
    "uw": {"Male": 0.90, "Smiling": 0.80, "Young": 0.72},
}
# equal and dst tie for the best balanced accuracy on Male.
BALANCED = {
    "equal": {"Male": 0.88, "Smiling": 0.83, "Young": 0.60},
    "dst": {"Male": 0.88, "Smiling": 0.82, "Young": 0.66},
    "uw": {"Male": 0.85, "Smiling": 0.79, "Young": 0.62},
}
F1 = {
    "equal": {"Male": 0.87, "Smiling": 0.84, "Young": 0.80},
    "dst": {"Male": 0.89, "Smiling": 0.83, "Young": 0.83},
    "uw": {"Male": 0.86, "Smiling": 0.78, "Young": 0.81},
}
DST_TERMS = {
    1: {
        "network_depth": {"Male": 0.2, "Smiling": 0.4, "Young": 0.6},
        "task_incompleteness": {"Male": 0.5, "Smiling": 0.5, "Young": 0.5},
    },
    2: {
        "network_depth": {"Male": 0.1, "Smiling": 0.5, "Young": 0.9},
        "task_incompleteness": {"Male": 0.25, "Smiling": 0.5, "Young": 0.75},
    },
}
DST_KEEP = {
    0: {"Male": 1.0, "Smiling": 1.0, "Young": 1.0},
    1: {"Male": 0.8, "Smiling": 0.7, "Young": 0.4},
    2: {"Male": 0.9, "Smiling": 0.6, "Young": 0.3},
}


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)


def _epoch(run: str, epoch: int) -> EpochRecord:
    losses = {task: 0.7 - 0.1 * epoch - 0.01 * index for index, task in enumerate(TASKS)}
    if run == "dst" and epoch == 1:
        losses["Young"] = math.nan  # a dropped task has no loss that epoch
    dst = run == "dst"
    keep = DST_KEEP[epoch] if dst else dict.fromkeys(TASKS, 1.0)
    valid = dict.fromkeys(TASKS, 0.6 + 0.05 * epoch)
    return {
        "epoch": epoch,
        "train_loss": losses,
        "keep_probabilities": keep,
        "gates": {task: p > 0.5 for task, p in keep.items()},
        "terms": DST_TERMS.get(epoch, {}) if dst else {},
        "loss_weights": dict.fromkeys(TASKS, 1.0),
        "valid": {"accuracy": valid, "mean_accuracy": _mean(valid)},
        "seconds": 30.0 + epoch,
    }


def _run(name: str, description: str, wall_seconds: float) -> RunResult:
    test: EvaluationMetrics = {
        "accuracy": ACCURACY[name],
        "balanced_accuracy": BALANCED[name],
        "f1": F1[name],
        "mean_accuracy": _mean(ACCURACY[name]),
        "mean_balanced_accuracy": _mean(BALANCED[name]),
        "mean_f1": _mean(F1[name]),
    }
    return {
        "method": name,
        "seed": 1234,
        "description": description,
        "epochs": [_epoch(name, epoch) for epoch in range(3)],
        "selected_epoch": 1,
        "test": test,
        "wall_seconds": wall_seconds,
    }


def _results() -> Results:
    return {
        "study": {
            "command": "python examples/celeba/run.py --demo --epochs 3 --methods equal,dst,uw",
            "argv": ["--demo", "--epochs", "3", "--methods", "equal,dst,uw"],
            "dstmtl_version": "0.1.0",
            "torch_version": "2.5.1",
            "seed": 1234,
            "seeds": [1234],
            "hardware": {
                "device": "cpu",
                "device_name": "cpu",
                "cpu": "Test CPU",
                "gpus": 0,
                "processes": 1,
            },
            "dataset": "demo",
            "root": "/tmp/demo",
            "attributes": list(TASKS),
            "image_size": 64,
            "batch_size": 32,
            "effective_batch_size": 32,
            "epochs": 3,
            "started": "2024-01-01T00:00:00",
            "finished": "2024-01-01T00:05:00",
            "resumed": [],
            "network_depth": dict.fromkeys(TASKS, 18),
            "load_average": {"start": [1.0, 2.0, 3.0], "end": [4.0, 2.5, 3.0]},
        },
        "majority_baseline": {"Male": 0.58, "Smiling": 0.52, "Young": 0.77},
        "test_positive_rate": {"Male": 0.42, "Smiling": 0.48, "Young": 0.77},
        "runs": {
            "equal": _run("equal", "Equal weights", 95.0),
            "dst": _run("dst", "DST, task incompleteness", 180.0),
            "uw": _run("uw", "Uncertainty weighting", 120.5),
        },
    }


@pytest.fixture
def results() -> Results:
    return _results()


@pytest.fixture
def report(results: Results, tmp_path: Path) -> list[Path]:
    return reporting.write_report(results, tmp_path / "out")


def _section(markdown: str, heading: str) -> str:
    """The text under ``## heading`` up to the next second-level heading."""
    start = markdown.index(f"## {heading}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end >= 0 else len(markdown)]


def _row(section: str, label: str) -> list[str]:
    """The cells of the table row whose first cell is ``label``, without the label."""
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in:\n{section}")


def test_mean_ranks_by_hand(results: Results) -> None:
    ranks = reporting.mean_ranks(results)
    assert ranks == pytest.approx({"equal": 6.5 / 3, "dst": 4 / 3, "uw": 7.5 / 3})


def test_mean_ranks_all_tied(results: Results) -> None:
    for run in results["runs"].values():
        run["test"]["accuracy"] = dict.fromkeys(TASKS, 0.5)
    assert reporting.mean_ranks(results) == {"equal": 2.0, "dst": 2.0, "uw": 2.0}


def test_metrics_json_round_trips_with_null_for_nan(results: Results, report: list[Path]) -> None:
    path = report[0]
    assert path.name == "metrics.json"

    def reject(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    with path.open() as file:
        loaded = json.load(file, parse_constant=reject)
    assert list(loaded["runs"]) == ["equal", "dst", "uw"]
    for name, run in loaded["runs"].items():
        assert set(run["test"]["accuracy"]) == set(TASKS)
        assert run["test"]["accuracy"] == results["runs"][name]["test"]["accuracy"]
    assert loaded["runs"]["dst"]["epochs"][1]["train_loss"]["Young"] is None
    assert loaded["runs"]["dst"]["epochs"][2]["terms"] == DST_TERMS[2]
    assert loaded["study"] == results["study"]


def test_report_rendered_again_from_metrics_json_is_identical(
    results: Results, report: list[Path]
) -> None:
    loaded = json.loads(report[0].read_text())
    assert reporting.markdown_report(loaded) == reporting.markdown_report(results)


def test_markdown_has_header_and_every_table(results: Results) -> None:
    markdown = reporting.markdown_report(results)
    for text in [results["study"]["command"], "seed: 1234", "image size: 64", "torch 2.5.1"]:
        assert text.lower() in markdown.lower()
    headings = [
        "Test accuracy per task",
        "Balanced accuracy",
        "F1",
        "Method comparison",
        "Keep probabilities per epoch: dst",
        "Terms at epoch 2: dst",
        "Training loss per epoch: equal",
        "Training loss per epoch: dst",
        "Training loss per epoch: uw",
    ]
    for heading in headings:
        assert f"## {heading}\n" in markdown
    # Runs without terms get no DST tables.
    assert "Keep probabilities per epoch: equal" not in markdown
    assert "Terms at epoch 2: uw" not in markdown
    for task in TASKS:
        assert _row(_section(markdown, "Test accuracy per task"), task)


def test_network_depth_table(results: Results) -> None:
    results["study"]["network_depth"] = {"Male": 18, "Smiling": 18, "Young": 12}
    section = _section(reporting.markdown_report(results), "Network depth")
    assert _row(section, "Male") == ["18", "1.0000"]
    assert _row(section, "Young") == ["12", "0.6667"]
    assert "same depth" not in section
    results["study"]["network_depth"] = dict.fromkeys(TASKS, 18)
    section = _section(reporting.markdown_report(results), "Network depth")
    assert "the term is 1 for every task" in section


def test_header_lists_each_resumed_session(results: Results) -> None:
    hardware = {"device": "cuda:0", "device_name": "NVIDIA H100", "cpu": "x86_64", "gpus": 1}
    results["study"]["resumed"] = [
        {
            "command": "python run.py --resume --out runs/x",
            "argv": ["--resume", "--out", "runs/x"],
            "started": "2024-01-02T10:00:00",
            "hardware": hardware,  # type: ignore[typeddict-item]
        }
    ]
    header = reporting.markdown_report(results).split("\n## ")[0]
    assert results["study"]["command"] in header  # the first start's command stays
    assert "Resumed 2024-01-02T10:00:00 on cuda:0 (NVIDIA H100):" in header
    assert "python run.py --resume --out runs/x" in header


def test_best_run_per_row_is_bold(results: Results) -> None:
    markdown = reporting.markdown_report(results)
    accuracy = _section(markdown, "Test accuracy per task")
    # Columns: equal, dst, uw, majority class, test positive rate.
    assert _row(accuracy, "Male") == ["0.9000", "**0.9200**", "0.9000", "0.5800", "0.4200"]
    assert _row(accuracy, "Smiling")[:3] == ["**0.8500**", "0.8400", "0.8000"]
    equal, dst, uw = (f"{_mean(ACCURACY[name]):.4f}" for name in ["equal", "dst", "uw"])
    assert _row(accuracy, "mean") == [equal, f"**{dst}**", uw, "0.6233", "0.5567"]

    balanced = _section(markdown, "Balanced accuracy")
    assert _row(balanced, "Male") == ["**0.8800**", "**0.8800**", "0.8500", "0.5000"]
    assert _row(balanced, "mean")[-1] == "0.5000"

    f1 = _section(markdown, "F1")
    assert _row(f1, "Young") == ["0.8000", "**0.8300**", "0.8100"]  # no majority column


def test_method_comparison(results: Results) -> None:
    comparison = _section(reporting.markdown_report(results), "Method comparison")
    assert "Δ mean accuracy vs equal" in comparison
    equal, dst, uw = (_row(comparison, name) for name in ["equal", "dst", "uw"])
    # method, description, accuracy, balanced, F1, rank, epoch, seconds, minutes, difference
    assert equal[5:] == ["2.17", "1", "95.0", "1.58", "reference"]
    assert dst[:2] == ["dst", "DST, task incompleteness"]
    assert dst[5:] == ["1.33", "1", "180.0", "3.00", "+0.0200 †"]  # selected before a drop
    assert uw[5] == "2.50"
    assert uw[-1] == f"{_mean(ACCURACY['uw']) - _mean(ACCURACY['equal']):+.4f}"
    assert dst[2:5] == [f"{_mean(table['dst']):.4f}" for table in (ACCURACY, BALANCED, F1)]


def test_terms_and_keep_probability_tables(results: Results) -> None:
    markdown = reporting.markdown_report(results)
    terms = _section(markdown, "Terms at epoch 2: dst")
    assert _row(terms, "task") == ["network_depth", "task_incompleteness", "keep probability"]
    assert _row(terms, "Young") == ["0.9000", "0.7500", "0.3000"]
    assert _row(terms, "Male") == ["0.1000", "0.2500", "0.9000"]

    earlier = _section(reporting.markdown_report(results, terms_epoch=1), "Terms at epoch 1: dst")
    assert _row(earlier, "Young") == ["0.6000", "0.5000", "0.4000"]

    missing = reporting.markdown_report(results, terms_epoch=0)
    assert "No terms were recorded at epoch 0" in _section(missing, "Terms at epoch 0: dst")

    keep = _section(markdown, "Keep probabilities per epoch: dst")
    assert _row(keep, "0") == ["1.0000", "1.0000", "1.0000"]
    assert _row(keep, "1") == ["0.8000", "0.7000", "0.4000 (dropped)"]  # gates: p > 0.5


def test_training_loss_table_shows_nan_and_selected_epoch(results: Results) -> None:
    losses = _section(reporting.markdown_report(results), "Training loss per epoch: dst")
    # Tasks, then the validation mean accuracy and the epoch's seconds.
    assert _row(losses, "1 (selected)") == ["0.6000", "0.5900", "n/a", "0.6500", "31.0"]
    assert _row(losses, "0")[:3] == ["0.7000", "0.6900", "0.6800"]


def test_write_report_files(results: Results, tmp_path: Path, report: list[Path]) -> None:
    out = tmp_path / "out"
    names = [path.name for path in report]
    assert names == [
        "metrics.json",
        "results.md",
        "accuracy.png",
        "training_loss_equal.png",
        "training_loss_dst.png",
        "keep_probabilities_dst.png",
        "training_loss_uw.png",
    ]
    assert sorted(os.listdir(out)) == sorted(names)  # no temporary files left behind
    markdown = (out / "results.md").read_text()
    assert markdown.startswith(reporting.markdown_report(results))
    assert "![accuracy](accuracy.png)" in markdown

    for path in report[2:]:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as image:
            width, height = image.size
        assert 500 <= width <= 3000
        assert 300 <= height <= 1500
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[:2] == (height, width)
        assert pixels.std() > 0.01  # something was drawn


def test_atomic_write_keeps_old_file_when_interrupted(
    results: Results, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "metrics.json"
    path.write_text("old")

    def fail(source: object, destination: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        reporting.write_json(results, path)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_no_runs_is_an_error(results: Results, tmp_path: Path) -> None:
    results["runs"] = {}
    with pytest.raises(ValueError, match="no runs"):
        reporting.write_report(results, tmp_path)


def test_summary_fits_on_one_screen(results: Results, tmp_path: Path) -> None:
    text = reporting.summary(results, out_dir=tmp_path)
    lines = text.splitlines()
    assert len(lines) <= 25
    assert lines[-1] == f"Results: {tmp_path}"
    for name in results["runs"]:
        assert any(line.startswith(name + " ") for line in lines)
    for task in TASKS:
        assert any(line.startswith(task + " ") for line in lines)
    assert "3.0 min" in text  # the DST run's 180 s
    assert "95.0 s" in text


def test_summary_with_forty_tasks_still_fits(results: Results) -> None:
    tasks = [f"Attribute_{index}" for index in range(40)]
    results["study"]["attributes"] = tasks
    results["majority_baseline"] = dict.fromkeys(tasks, 0.6)
    for run in results["runs"].values():
        run["test"]["accuracy"] = dict.fromkeys(tasks, 0.8)
    lines = reporting.summary(results).splitlines()
    assert len(lines) <= 25
    assert any("more tasks in results.md" in line for line in lines)
    assert lines[-1].startswith("mean ")


def test_the_dst_drops_section_warns_when_the_selected_epoch_predates_the_first_drop(
    results: Results,
) -> None:
    # The fixture's DST draw at the end of epoch 1 drops Young, so epoch 2 is the first with
    # a task dropped, and the selected epoch is 1.
    run = results["runs"]["dst"]
    assert reporting.dst_drops(run) == ([2], True)
    markdown = reporting.markdown_report(results)
    drops = _section(markdown, "DST drops")
    assert "| dst " in drops
    assert "these weights are an equal-weight run's" in drops
    comparison = _section(markdown, "Method comparison")
    assert "†" in _row(comparison, "dst")[-1]
    run["selected_epoch"] = 2
    assert reporting.dst_drops(run) == ([2], False)
    assert "equal-weight run's" not in _section(reporting.markdown_report(results), "DST drops")


def test_a_draw_that_no_epoch_applies_is_not_marked_dropped(results: Results) -> None:
    keep = _section(reporting.markdown_report(results), "Keep probabilities per epoch: dst")
    assert _row(keep, "1")[-1] == "0.4000 (dropped)"  # applied in epoch 2
    assert _row(keep, "2")[-1] == "0.3000"  # the run ended: no epoch applied it


def test_wall_time_is_flagged_as_the_hosts_load(results: Results) -> None:
    note = _section(reporting.markdown_report(results), "Method comparison")
    assert "not a cost comparison on a shared host" in note
    assert "at the start 1.00/2.00/3.00, at the end 4.00/2.50/3.00" in note


def test_twelve_runs_get_twelve_colours() -> None:
    for count in (3, 12, 20):
        colours = reporting.run_colours(count)
        assert len(set(map(str, colours))) == count


def test_the_keep_probability_figure_marks_the_draws_that_dropped_a_task(
    results: Results,
) -> None:
    run = results["runs"]["dst"]
    # Young's keep probability is below 0.5 at epochs 1 and 2; epoch 2's draw is the last.
    assert reporting.dropping_draws(run, "Young") == [1]
    assert reporting.dropping_draws(run, "Male") == []


def test_the_seeds_section_by_hand(results: Results) -> None:
    one_seed = reporting.markdown_report(results)
    assert "## Seeds" not in one_seed
    base = results["runs"]
    runs: dict[str, RunResult] = {}
    # Mean accuracies over tasks: equal 0.80, 0.82, 0.84; dst 0.81, 0.84, 0.86.
    for seed, (equal, dst) in enumerate([(0.80, 0.81), (0.82, 0.84), (0.84, 0.86)]):
        for name, value in (("equal", equal), ("dst", dst)):
            run = json.loads(json.dumps(base[name]))
            run["seed"] = seed
            run["test"]["accuracy"] = dict.fromkeys(TASKS, value)
            run["test"]["mean_accuracy"] = value
            runs[f"{name}/seed{seed}"] = run
    results["runs"] = runs
    statistics = reporting.seed_statistics(results)
    assert list(statistics) == ["equal", "dst"]
    reference = statistics["equal"]["mean_accuracy"]
    assert isinstance(reference, Summary)
    assert (reference.mean, reference.std) == pytest.approx((0.82, 0.02))
    comparison = statistics["dst"]["vs_reference"]
    assert isinstance(comparison, PairedComparison)
    # Differences 0.01, 0.02, 0.02: mean 0.05/3, s = 0.01/sqrt(3), t = 5, df 2.
    assert comparison.differences == pytest.approx((0.01, 0.02, 0.02))
    assert comparison.t == pytest.approx(5.0)
    assert (comparison.wins, comparison.losses) == (3, 0)
    change = statistics["dst"]["delta_m"]
    assert isinstance(change, Summary)
    assert change.mean == pytest.approx(-100 * (0.01 / 0.80 + 0.02 / 0.82 + 0.02 / 0.84) / 3)
    section = _section(reporting.markdown_report(results), "Seeds")
    row = _row(section, "dst")
    assert row[0] == "0.8367 ± 0.0252"
    assert row[3] == "3/0"
    assert row[4].startswith("0.038")  # two-sided p of t = 5 with 2 degrees of freedom
