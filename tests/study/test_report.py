"""dstmtl.study.report on a study built by hand: the sections and their numbers, the
figures, the colours and the terminal summary."""

from __future__ import annotations

import copy
import itertools
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from dstmtl.study.config import StudyConfig, StudyTask
from dstmtl.study.records import EpochRecord, RunResult, Session, StudyResults
from dstmtl.study.report import _colours, statistics, summary, write_report

TASKS = {"flag": StudyTask("binary"), "size": StudyTask("regression", metric="rmse")}
CONFIG = StudyConfig(tasks=TASKS, methods=("equal", "dst", "uw"), seeds=(0, 1), epochs=5)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Test scores per method and seed (seed 0, seed 1).
ACCURACY = {"equal": (0.80, 0.82), "dst": (0.84, 0.83), "uw": (0.78, 0.79)}
RMSE = {"equal": (1.0, 1.2), "dst": (0.9, 1.1), "uw": (1.3, 1.2)}

# dst/seed0: the draw at the end of epoch 1 drops "size" from epoch 2, the one at the end
# of epoch 2 drops "flag" from epoch 3, epoch 4 (the last) keeps both; the last draw turns
# "flag" off, but no epoch applies it.
KEEP = [(1.0, 1.0), (0.9, 0.4), (0.3, 0.8), (0.7, 0.6), (0.2, 0.5)]
DROPPED_SEED0: list[list[str]] = [[], [], ["size"], ["flag"], []]
GATES_SEED0 = [(True, True), (True, False), (False, True), (True, True), (False, True)]
# dst/seed1: one drop, in epoch 3, after the selected epoch 1.
DROPPED_SEED1: list[list[str]] = [[], [], [], ["size"], []]
GATES_SEED1 = [(True, True), (True, True), (True, False), (True, True), (True, True)]
TERMS_LAST = {
    "incompleteness": {"flag": 0.25, "size": 0.75},
    "depth": {"flag": 0.5, "size": 1.0},
}


def epoch_record(method: str, seed: int, epoch: int) -> EpochRecord:
    dst = method == "dst"
    dropped = (DROPPED_SEED0 if seed == 0 else DROPPED_SEED1)[epoch] if dst else []
    gates = (GATES_SEED0 if seed == 0 else GATES_SEED1)[epoch] if dst else (True, True)
    keep = KEEP[epoch] if dst else (1.0, 1.0)
    terms: dict[str, dict[str, float]] = {}
    if dst and epoch == 4:
        terms = TERMS_LAST
    elif dst and epoch > 0:
        terms = {"incompleteness": {"flag": 0.1, "size": 0.1}, "depth": {"flag": 0.5, "size": 1}}
    return {
        "epoch": epoch,
        "train_loss": {"flag": 0.7 - 0.1 * epoch, "size": 2.0 - 0.2 * epoch + seed},
        "keep_probabilities": dict(zip(TASKS, keep, strict=True)),
        "gates": dict(zip(TASKS, gates, strict=True)),
        "dropped": dropped,
        "terms": terms,
        "loss_weights": dict.fromkeys(TASKS, 1.0) if dst else {},
        "valid": {"flag": {"accuracy": 0.7}, "size": {"rmse": 1.0, "mae": 0.8}},
        "valid_loss": {"flag": 0.5, "size": 1.0},
        "valid_score": 0.1 * epoch,
        "seconds": 10.0 + epoch,
    }


def run_result(method: str, seed: int) -> RunResult:
    epochs = [epoch_record(method, seed, epoch) for epoch in range(5)]
    selected, first_drop, dropping = 3, None, 0
    if method == "dst":
        dropping = sum(bool(record["dropped"]) for record in epochs)
        first_drop = 2 if seed == 0 else 3
        selected = 3 if seed == 0 else 1
    accuracy, rmse = ACCURACY[method][seed], RMSE[method][seed]
    return {
        "method": method,
        "seed": seed,
        "description": f"the {method} method",
        "epochs": epochs,
        "selected_epoch": selected,
        "dropping_epochs": dropping,
        "first_drop_epoch": first_drop,
        "selected_before_first_drop": method == "dst" and selected < (first_drop or math.inf),
        "test": {
            "flag": {"accuracy": accuracy, "balanced_accuracy": accuracy - 0.1, "f1": 0.5},
            "size": {"rmse": rmse, "mae": rmse / 2},
        },
        "wall_seconds": 60.0,
        "peak_memory_bytes": None,
    }


def session(started: str, finished: str | None, load_at_end: list[float] | None) -> Session:
    return {
        "started": started,
        "finished": finished,
        "argv": ["study.py", "--seeds", "2"],
        "launcher": ["torchrun", "--nproc-per-node", "2"],
        "world_size": 2,
        "effective_batch_size": 64,
        "hardware": {"device": "cuda", "device_name": "Test GPU", "cpu": "Test CPU", "gpus": 2},
        "load_at_start": [1.5, 1.0, 0.5],
        "load_at_end": load_at_end,
    }


def study_results() -> StudyResults:
    results: StudyResults = {
        "config": CONFIG.to_json(),
        "info": {"dataset": "toy", "positive rate": {"flag": 0.4}},
        "environment": {"dstmtl": "0.1.0", "torch": "2.14.1"},
        "sessions": [
            session("2026-12-04T08:00:00", None, None),
            session("2026-12-04T09:00:00", "2026-12-04T09:30:00", [3.25, 2.0, 1.0]),
        ],
        "baselines": {"majority": {"flag": 0.6}},
        "runs": {
            f"{method}/seed{seed}": run_result(method, seed)
            for seed, method in itertools.product(CONFIG.seeds, CONFIG.methods)
        },
        "statistics": {},
    }
    results["statistics"] = statistics(results, CONFIG)
    return results


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], str]:
    paths = write_report(study_results(), CONFIG, tmp_path_factory.mktemp("report"))
    return paths, paths[1].read_text()


def section(markdown: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    start = markdown.index(heading + "\n")
    ends = [
        markdown.find("\n" + hashes + " ", start + 1)
        for hashes in ("#" * n for n in range(1, len(level) + 1))
    ]
    return markdown[start : min([end for end in ends if end >= 0], default=len(markdown))]


def row(text: str, label: str) -> list[str]:
    """The cells after the first of the table row whose first cell is ``label``."""
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in:\n{text}")


def test_every_file_is_written_and_every_figure_is_a_png(
    written: tuple[list[Path], str], tmp_path: Path
) -> None:
    paths, markdown = written
    names = [path.name for path in paths]
    runs = [f"{method}-seed{seed}" for seed in (0, 1) for method in ("equal", "dst", "uw")]
    expected = ["metrics.json", "results.md", "scores.png"]
    for run in runs:
        expected.append(f"training_loss_{run}.png")
        if run.startswith("dst"):
            expected.append(f"keep_probabilities_{run}.png")
    assert names == expected
    assert sorted(path.name for path in paths[0].parent.iterdir()) == sorted(expected)
    for path in paths[2:]:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 200
        assert pixels.shape[1] > 300
        assert pixels.std() > 0.01  # something was drawn
        assert f"]({path.name})" in markdown


def test_header_shows_the_callers_description_and_the_sessions(
    written: tuple[list[Path], str],
) -> None:
    _, markdown = written
    header = section(markdown, "# Multi-task study")
    assert "- dataset: toy" in header
    assert "- positive rate: flag 0.4" in header
    sessions = section(markdown, "## Sessions")
    assert row(sessions, "1") == [
        "2026-12-04T08:00:00",
        "not finished",
        "`torchrun --nproc-per-node 2`",
        "2",
        "64",
        "cuda (Test GPU), 2 GPU(s)",
        "Test CPU",
        "1.50/1.00/0.50",
        "not recorded",
    ]
    assert row(sessions, "2")[-1] == "3.25/2.00/1.00"
    assert "1. `torchrun --nproc-per-node 2 study.py --seeds 2`" in sessions


def test_scores_table_has_the_means_the_best_in_bold_and_the_majority_class(
    written: tuple[list[Path], str],
) -> None:
    _, markdown = written
    scores = section(markdown, "## Test scores over seeds")
    # flag: dst has the best mean accuracy, 0.835; size: dst the lowest RMSE, 1.0.
    flag, size = row(scores, "dst")
    assert flag.startswith("**0.8350 ± 0.0071 [")
    assert size.startswith("**1.0000 ± 0.1414 [")
    assert row(scores, "equal")[0].startswith("0.8100 ± ")
    assert row(scores, "majority class") == ["0.6000", "-"]
    others = section(markdown, "## Other metrics")
    assert row(others, "flag")[:2] == ["balanced_accuracy ↑", "0.7100 ± 0.0141"]
    assert "| size | mae ↓ | 0.5500 ± 0.0707 | **0.5000 ± 0.0707** | 0.6250 ± 0.0354 |" in others


def test_comparison_marks_the_equal_weight_seeds_and_explains_wall_time(
    written: tuple[list[Path], str],
) -> None:
    _, markdown = written
    comparison = section(markdown, "## Against equal")
    assert "| dst † (1/2 seeds) |" in comparison
    assert "| uw |" in comparison
    assert "Δ vs equal compares two equal-weight models" in comparison
    assert "Wall time is not a cost comparison" in comparison
    assert "load averages under Sessions" in comparison


def test_drops_section_counts_the_drops_and_says_which_run_is_an_equal_weight_model(
    written: tuple[list[Path], str],
) -> None:
    _, markdown = written
    drops = section(markdown, "## DST drops")
    assert row(drops, "dst/seed0") == ["2", "3", "4", "no", ""]  # epochs from 1
    assert row(drops, "dst/seed1") == [
        "1",
        "4",
        "2",
        "yes",
        "**selected before the first drop: its test scores are an equal-weight model's, and "
        "Δ vs equal compares two equal-weight models**",
    ]
    assert "equal/seed0" not in drops  # runs of methods that drop no task are not listed


def test_a_run_with_loss_weights_is_not_called_an_equal_weight_model(tmp_path: Path) -> None:
    results = study_results()
    for record in results["runs"]["dst/seed1"]["epochs"]:
        record["loss_weights"] = {"flag": 1.5, "size": 0.5}
    write_report(results, CONFIG, tmp_path)
    markdown = (tmp_path / "results.md").read_text()
    assert "no drop acted on these weights, but DST's loss weights did" in markdown
    assert "equal-weight model" not in markdown
    assert "| dst |" in section(markdown, "## Against equal")


def test_keep_probabilities_mark_only_the_drops_an_epoch_applied(
    written: tuple[list[Path], str],
) -> None:
    _, markdown = written
    run = section(markdown, "### dst/seed0: the dst method")
    keep = run[run.index("Keep probabilities:") : run.index("Terms at epoch")]
    assert row(keep, "2") == ["0.9000", "0.4000"]  # epoch index 1
    assert row(keep, "3") == ["0.3000", "0.8000 (dropped)"]
    assert row(keep, "4") == ["0.7000 (dropped)", "0.6000"]
    # The last epoch's draw turned "flag" off, but the run ended before any epoch applied it.
    assert row(keep, "5") == ["0.2000", "0.5000"]
    assert keep.count("(dropped)") == 2
    epochs = run[: run.index("Keep probabilities:")]
    assert row(epochs, "4 (selected)") == ["0.4000", "1.4000", "0.3000", "flag", "13.0"]
    assert row(epochs, "5")[-2:] == ["-", "14.0"]


def test_terms_table_shows_the_last_epochs_terms_keep_probability_and_loss_weight(
    written: tuple[list[Path], str],
) -> None:
    _, markdown = written
    run = section(markdown, "### dst/seed0: the dst method")
    terms = run[run.index("Terms at epoch 5:") :]
    assert "| task | incompleteness | depth | keep probability | loss weight |" in terms
    assert row(terms, "flag") == ["0.2500", "0.5000", "0.2000", "1.0000"]
    assert row(terms, "size") == ["0.7500", "1.0000", "0.5000", "1.0000"]
    equal = section(markdown, "### equal/seed0: the equal method")
    assert "Keep probabilities" not in equal
    assert "Terms" not in equal
    assert "dropped" not in equal


def test_runs_of_twelve_and_twenty_five_methods_get_distinct_colours() -> None:
    for count in (1, 10, 12, 20, 25, 60):
        colours = _colours(count)
        assert len(colours) == count
        closest = min(
            (math.dist(a[:3], b[:3]) for a, b in itertools.combinations(colours, 2)),
            default=1.0,
        )
        assert closest > 0.05, (count, closest)
    # The first ten are matplotlib's default colours, so "equal" keeps its usual blue.
    assert _colours(12)[0] == pytest.approx(matplotlib.colors.to_rgba("C0"))


def test_scores_figure_draws_the_majority_class(tmp_path: Path) -> None:
    results = study_results()
    with_majority = write_report(results, CONFIG, tmp_path / "with")[2].read_bytes()
    results["baselines"] = {"majority": {}}
    without = write_report(results, CONFIG, tmp_path / "without")[2].read_bytes()
    assert with_majority != without
    assert "majority class" not in (tmp_path / "without" / "results.md").read_text()


def test_records_without_the_new_fields_still_give_a_report(tmp_path: Path) -> None:
    results = copy.deepcopy(study_results())
    old: dict[str, object] = dict(results)
    for key in ("info", "sessions", "baselines"):
        del old[key]
    for run in results["runs"].values():
        for record in run["epochs"]:
            del record["terms"]  # type: ignore[misc]
            del record["loss_weights"]  # type: ignore[misc]
    paths = write_report(old, CONFIG, tmp_path)  # type: ignore[arg-type]
    markdown = paths[1].read_text()
    assert "No session was recorded." in markdown
    assert "Terms at epoch" not in markdown
    assert "majority class" not in markdown
    assert row(section(markdown, "## DST drops"), "dst/seed1")[3] == "yes"


def test_summary_names_the_best_method_per_task_delta_m_and_the_report() -> None:
    results = study_results()
    text = summary(results, CONFIG, out=Path("/tmp/study"))
    lines = text.splitlines()
    assert "flag accuracy ↑: best dst 0.8350, equal 0.8100" in text
    assert "size rmse ↓: best dst 1.0000, equal 1.1000" in text
    dst_delta = results["statistics"]["methods"]["dst"]["delta_m"]
    assert f"  dst: {dst_delta['mean']:.2f} ± {dst_delta['std']:.2f}" in lines
    assert "Selected before DST's first drop, so not a test of DST: dst/seed1" in lines
    assert lines[-1] == "Report: /tmp/study/results.md"
    assert len(lines) <= 25


def test_importing_the_report_and_computing_statistics_needs_no_matplotlib() -> None:
    code = (
        "import sys, dstmtl.study.report\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=None)
