"""Turn the results of the CelebA study into a results folder.

The run script builds a :class:`Results` dict as the study goes. This module writes it as
``metrics.json`` (the complete machine-readable record), ``results.md`` (tables laid out like
the DST assignment report's) and PNG figures, and prints a short terminal summary. Every file
goes to a temporary sibling first and is then renamed into place, so an interrupted study
never leaves a truncated file where a complete one was.

Figures are drawn on :class:`~matplotlib.figure.Figure` objects with the Agg canvas rather
than through ``pyplot``: that needs no global backend switch in the importing process and
leaves no figures open between calls.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from records import (
    DatasetName,
    EpochRecord,
    EvaluationMetrics,
    Hardware,
    Results,
    RunResult,
    Session,
    Study,
    ValidationMetrics,
)

from dstmtl.study._atomic import write_bytes
from dstmtl.study.statistics import (
    PairedComparison,
    Summary,
    compare_paired,
    delta_m,
    summarize,
)

__all__ = [
    "DatasetName",
    "EpochRecord",
    "EvaluationMetrics",
    "Hardware",
    "Results",
    "RunResult",
    "Session",
    "Study",
    "ValidationMetrics",
    "markdown_report",
    "mean_ranks",
    "plot_accuracy_bars",
    "plot_keep_probabilities",
    "plot_training_losses",
    "summary",
    "write_json",
    "write_report",
]

_DPI = 120
_SUMMARY_LINES = 25
_TaskMetric = Literal["accuracy", "balanced_accuracy", "f1"]
_MeanMetric = Literal["mean_accuracy", "mean_balanced_accuracy", "mean_f1"]
_SeriesField = Literal["train_loss", "keep_probabilities"]


def write_json(results: Mapping[str, object], path: Path) -> None:
    """Write ``results`` to ``path`` atomically as standard JSON, NaN and infinities as null.

    Any mapping is accepted, so a partial record (a study still running) can be saved too.
    """
    text = json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n"
    write_bytes(path, text.encode("utf-8"))


def mean_ranks(results: Results) -> dict[str, float]:
    """Each run's test-accuracy rank averaged over tasks (1 = best; ties share their average)."""
    runs = results["runs"]
    tasks = _tasks(results)
    totals = dict.fromkeys(runs, 0.0)
    for task in tasks:
        ranks = _average_ranks({name: run["test"]["accuracy"][task] for name, run in runs.items()})
        for name, rank in ranks.items():
            totals[name] += rank
    return {name: total / len(tasks) for name, total in totals.items()}


def markdown_report(results: Results, *, terms_epoch: int | None = None) -> str:
    """The study as a Markdown document.

    Args:
        results: The study.
        terms_epoch: The epoch whose DST terms are tabulated for every run that has terms;
            by default each such run's last epoch with terms.
    """
    _check_has_runs(results)
    sections = [
        _header_section(results),
        _per_task_section(
            results,
            "Test accuracy per task",
            "accuracy",
            "mean_accuracy",
            [
                ("majority class", results["majority_baseline"]),
                ("test positive rate", results["test_positive_rate"]),
            ],
        ),
        _per_task_section(
            results,
            "Balanced accuracy",
            "balanced_accuracy",
            "mean_balanced_accuracy",
            # Always predicting one class recalls that class fully and the other not at all.
            [("majority class", dict.fromkeys(_tasks(results), 0.5))],
        ),
        _per_task_section(results, "F1", "f1", "mean_f1", []),
        _comparison_section(results),
        *([_seeds_section(results)] if len(_seeds(results)) > 1 else []),
        *([_dst_drops_section(results)] if any(map(_has_terms, results["runs"].values())) else []),
        _network_depth_section(results),
    ]
    for name, run in results["runs"].items():
        if _has_terms(run):
            sections.append(_keep_probability_section(results, name))
            sections.append(_terms_section(results, name, terms_epoch))
    sections.extend(_training_loss_section(results, name) for name in results["runs"])
    return "\n\n".join(sections) + "\n"


def write_report(results: Results, out_dir: Path, *, terms_epoch: int | None = None) -> list[Path]:
    """Write ``metrics.json``, ``results.md`` and the figures into ``out_dir``.

    Returns the paths written, ``metrics.json`` and ``results.md`` first.
    """
    _check_has_runs(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "metrics.json"
    write_json(results, json_path)

    figures = [out_dir / "accuracy.png"]
    plot_accuracy_bars(results, figures[0])
    for name, run in results["runs"].items():
        loss_path = out_dir / f"training_loss_{_file_stem(name)}.png"
        plot_training_losses(results, name, loss_path)
        figures.append(loss_path)
        if _has_terms(run):
            keep_path = out_dir / f"keep_probabilities_{_file_stem(name)}.png"
            plot_keep_probabilities(results, name, keep_path)
            figures.append(keep_path)

    markdown_path = out_dir / "results.md"
    links = "\n\n".join(f"![{path.stem}]({path.name})" for path in figures)
    document = markdown_report(results, terms_epoch=terms_epoch) + f"\n## Figures\n\n{links}\n"
    write_bytes(markdown_path, document.encode("utf-8"))
    return [json_path, markdown_path, *figures]


def plot_training_losses(results: Results, run_name: str, path: Path) -> None:
    """Per-task training loss against epoch for one run, one line per task."""
    _plot_per_task_series(
        results,
        run_name,
        path,
        "train_loss",
        title="Training loss per task",
        ylabel="training loss",
        ylim=None,
    )


def plot_keep_probabilities(results: Results, run_name: str, path: Path) -> None:
    """Per-task keep probability against epoch for one (DST) run, one line per task."""
    _plot_per_task_series(
        results,
        run_name,
        path,
        "keep_probabilities",
        title="Keep probability per task (x: the draw dropped it from the next epoch)",
        ylabel="keep probability",
        ylim=(0.0, 1.05),
    )


def plot_accuracy_bars(results: Results, path: Path) -> None:
    """Test accuracy per task and their mean, one bar per run in each group."""
    _check_has_runs(results)
    tasks = _tasks(results)
    groups = [*tasks, "mean"]
    runs = results["runs"]
    width = 0.8 / len(runs)
    values = {
        name: [*(run["test"]["accuracy"][task] for task in tasks), run["test"]["mean_accuracy"]]
        for name, run in runs.items()
    }

    # Wide enough for every bar to stay visible, capped so 40 tasks remain one image.
    figure = Figure(figsize=(min(20.0, max(6.0, len(groups) * (0.3 * len(runs) + 0.4))), 4.8))
    axes = figure.add_subplot()
    colours = run_colours(len(runs))
    for index, (name, heights) in enumerate(values.items()):
        offset = (index - (len(runs) - 1) / 2) * width
        positions = [group + offset for group in range(len(groups))]
        axes.bar(positions, heights, width, label=name, color=colours[index])
    axes.axvline(len(tasks) - 0.5, color="grey", linestyle="--", linewidth=0.8)
    # The majority class per task: the level a run must beat, on an axis not starting at 0.
    majority = [results["majority_baseline"][task] for task in tasks]
    majority.append(sum(majority) / len(majority))
    axes.hlines(
        majority,
        [group - 0.45 for group in range(len(groups))],
        [group + 0.45 for group in range(len(groups))],
        colors="black",
        linewidth=1.5,
        label="majority class",
    )

    # Runs usually differ by a point or two, invisible on an axis that starts at zero.
    finite = [v for heights in [*values.values(), majority] for v in heights if math.isfinite(v)]
    low, high = min(finite), max(finite)
    pad = max(0.01, 0.1 * (high - low))
    axes.set_ylim(max(0.0, low - pad), min(1.0, high + pad))
    axes.set_xticks(range(len(groups)), groups, rotation=45, ha="right")
    axes.set_title("Test accuracy per task (y axis does not start at 0)")
    axes.set_xlabel("task")
    axes.set_ylabel("test accuracy")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(title="run", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save_figure(figure, path)


def summary(results: Results, *, out_dir: Path | None = None) -> str:
    """A plain-text summary for the terminal, at most 25 lines.

    Args:
        results: The study.
        out_dir: The results folder, named on the last line when given.
    """
    study = results["study"]
    runs = results["runs"]
    tasks = _tasks(results)
    hardware = study["hardware"]
    lines = [
        f"CelebA study: {study['dataset']}, {len(tasks)} tasks, {study['epochs']} epochs, "
        f"{hardware['device']} ({hardware['device_name']})",
        "",
    ]

    name_width = max([len("run"), *(len(name) for name in runs)])
    lines.append(
        f"{'run':<{name_width}}  {'accuracy':>8}  {'balanced':>8}  {'F1':>8}  {'wall time':>9}"
    )
    for name, run in runs.items():
        test = run["test"]
        lines.append(
            f"{name:<{name_width}}  {_fmt(test['mean_accuracy']):>8}  "
            f"{_fmt(test['mean_balanced_accuracy']):>8}  {_fmt(test['mean_f1']):>8}  "
            f"{_duration(run['wall_seconds']):>9}"
        )
    lines.append("")

    columns = [*runs, "majority"]
    widths = [max(6, len(column)) for column in columns]
    task_width = max([len("accuracy"), *(len(task) for task in tasks)])

    def row(label: str, cells: Sequence[str]) -> str:
        padded = (f"{cell:>{width}}" for cell, width in zip(cells, widths, strict=True))
        return f"{label:<{task_width}}  " + "  ".join(padded)

    lines.append(row("accuracy", columns))
    # What remains after the table header, the mean row and the closing lines.
    closing = 2 if out_dir is not None else 0
    room = _SUMMARY_LINES - len(lines) - 1 - closing
    shown = tasks if len(tasks) <= room else tasks[: max(0, room - 1)]
    for task in shown:
        cells = [run["test"]["accuracy"][task] for run in runs.values()]
        lines.append(row(task, [_fmt(v) for v in [*cells, results["majority_baseline"][task]]]))
    if len(shown) < len(tasks):
        lines.append(f"... {len(tasks) - len(shown)} more tasks in results.md")
    means = [run["test"]["mean_accuracy"] for run in runs.values()]
    majority_mean = _mean([results["majority_baseline"][task] for task in tasks])
    lines.append(row("mean", [_fmt(v) for v in [*means, majority_mean]]))
    if out_dir is not None:
        lines.extend(["", f"Results: {out_dir}"])
    return "\n".join(lines)


def _header_section(results: Results) -> str:
    study = results["study"]
    hardware = study["hardware"]
    gpus = f", {hardware['gpus']} GPU(s)" if hardware["gpus"] else ""
    finished = study["finished"] or "not finished"
    lines = [
        "# CelebA multi-task study",
        "",
        f"- Dataset: {study['dataset']} (`{study['root']}`)",
        f"- Attributes ({len(study['attributes'])}): {', '.join(study['attributes'])}",
        f"- Image size: {study['image_size']} px; batch size: {study['batch_size']} per "
        f"process, {study.get('effective_batch_size', study['batch_size'])} per step over "
        f"{hardware.get('processes', 1)} process(es); epochs: {study['epochs']}; "
        f"seed: {study['seed']}",
        f"- Hardware: {hardware['device']} ({hardware['device_name']}){gpus}; "
        f"CPU: {hardware['cpu']}",
        f"- Versions: dstmtl {study['dstmtl_version']}, torch {study['torch_version']}",
        f"- Started: {study['started']}; finished: {finished}",
        "",
        "Command:",
        "",
        "```text",
        study["command"],
        "```",
    ]
    for session in study["resumed"]:
        where = session["hardware"]
        lines.extend(
            [
                "",
                f"Resumed {session['started']} on {where['device']} ({where['device_name']}):",
                "",
                "```text",
                session["command"],
                "```",
            ]
        )
    return "\n".join(lines)


def _network_depth_section(results: Results) -> str:
    depths = results["study"]["network_depth"]
    deepest = max(depths.values())
    rows = [[task, str(depths[task]), _fmt(depths[task] / deepest)] for task in _tasks(results)]
    table = _table(["task", "depth D_j", "network-depth term D_j / max D"], rows)
    note = (
        "Weight layers on the longest path from the input to each head's output "
        "(`MultiHeadNet.depths()`)."
    )
    if len(set(depths.values())) == 1:
        note += " Every head sits at the same depth, so the term is 1 for every task."
    return f"## Network depth\n\n{table}\n\n{note}"


def _per_task_section(
    results: Results,
    title: str,
    metric: _TaskMetric,
    mean_metric: _MeanMetric,
    references: Sequence[tuple[str, Mapping[str, float]]],
) -> str:
    """One row per task and a mean row; the best run of each row in bold, references plain."""
    runs = results["runs"]
    tasks = _tasks(results)
    rows = []
    for task in tasks:
        scores = [run["test"][metric][task] for run in runs.values()]
        rows.append([task, *_bold_best(scores), *(_fmt(ref[task]) for _, ref in references)])
    means = [run["test"][mean_metric] for run in runs.values()]
    reference_means = [_fmt(_mean([ref[task] for task in tasks])) for _, ref in references]
    rows.append(["mean", *_bold_best(means), *reference_means])
    header = ["task", *runs, *(label for label, _ in references)]
    return f"## {title}\n\n{_table(header, rows)}"


def _comparison_section(results: Results) -> str:
    runs = results["runs"]
    reference_name, reference = next(iter(runs.items()))
    ranks = mean_ranks(results)
    rows = []
    for name, run in runs.items():
        test = run["test"]
        difference = test["mean_accuracy"] - reference["test"]["mean_accuracy"]
        rows.append(
            [
                name,
                run["method"],
                run["description"],
                _fmt(test["mean_accuracy"]),
                _fmt(test["mean_balanced_accuracy"]),
                _fmt(test["mean_f1"]),
                f"{ranks[name]:.2f}",
                str(run["selected_epoch"]),
                f"{run['wall_seconds']:.1f}",
                f"{run['wall_seconds'] / 60:.2f}",
                "reference"
                if name == reference_name
                else f"{difference:+.4f}" + (" †" if _has_terms(run) and dst_drops(run)[1] else ""),
            ]
        )
    header = [
        "run",
        "method",
        "description",
        "mean accuracy",
        "mean balanced accuracy",
        "mean F1",
        "mean rank",
        "selected epoch",
        "wall time (s)",
        "wall time (min)",
        f"Δ mean accuracy vs {reference_name}",
    ]
    note = (
        "Mean rank: the run's rank by test accuracy on each task (1 = best, ties share their "
        "average rank), averaged over tasks. The selected epoch is the one with the best "
        "validation mean accuracy; its weights were tested. †: a DST run whose selected "
        "weights predate its first drop (see DST drops): the difference is not DST's. Wall "
        "time is not a cost comparison on a shared host: it follows the other processes' "
        f"load as much as the method's work (load average at the start "
        f"{_load(results['study'].get('load_average', {}).get('start'))}, at the end "
        f"{_load(results['study'].get('load_average', {}).get('end'))})."
    )
    return f"## Method comparison\n\n{_table(header, rows, labels=3)}\n\n{note}"


def run_colours(count: int) -> list[str | tuple[float, float, float, float]]:
    """One colour per run, all distinct: matplotlib's ten, then tab20's twenty, then tab20
    again (beyond 20 runs a colour repeats)."""
    if count <= 10:
        return [f"C{index}" for index in range(count)]
    from matplotlib import colormaps

    tab20 = colormaps["tab20"]
    return [tab20(index % 20) for index in range(count)]


def dropping_draws(run: RunResult, task: str) -> list[int]:
    """The epochs whose end-of-epoch draw dropped ``task`` from a following epoch (the last
    epoch's draw applies to none)."""
    return [record["epoch"] for record in run["epochs"][:-1] if not record["gates"].get(task, True)]


def dst_drops(run: RunResult) -> tuple[list[int], bool]:
    """The epochs in which DST dropped a task, and whether the selected epoch precedes the
    first of them (then the tested weights are those of an equal-weight run)."""
    epochs = run["epochs"]
    drops = [
        record["epoch"]
        for previous, record in itertools.pairwise(epochs)
        if not all(previous["gates"].values())
    ]
    return drops, not drops or run["selected_epoch"] < drops[0]


def _seeds(results: Results) -> list[int]:
    return sorted({run.get("seed", results["study"]["seed"]) for run in results["runs"].values()})


def seed_statistics(results: Results) -> dict[str, dict[str, object]]:
    """Per method, over the seeds: the mean test accuracy (mean over tasks) with its 95%
    Student-t interval, and against the first method the paired difference per seed, wins
    and losses, the paired t-test's p-value and Δm% of the per-task accuracies."""
    by_method: dict[str, dict[int, RunResult]] = {}
    for run in results["runs"].values():
        by_method.setdefault(run["method"], {})[run.get("seed", 0)] = run
    seeds = _seeds(results)
    tasks = _tasks(results)
    reference_name = next(iter(by_method))
    reference = by_method[reference_name]
    statistics: dict[str, dict[str, object]] = {}
    for method, runs in by_method.items():
        if sorted(runs) != seeds:
            continue  # a method that has not run with every seed yet
        means = [runs[seed]["test"]["mean_accuracy"] for seed in seeds]
        entry: dict[str, object] = {"mean_accuracy": summarize(means)}
        if method != reference_name:
            entry["vs_reference"] = compare_paired(
                means,
                [reference[seed]["test"]["mean_accuracy"] for seed in seeds],
                higher_is_better=True,
            )
            entry["delta_m"] = summarize(
                [
                    delta_m(
                        runs[seed]["test"]["accuracy"],
                        reference[seed]["test"]["accuracy"],
                        dict.fromkeys(tasks, True),
                    )
                    for seed in seeds
                ]
            )
        statistics[method] = entry
    return statistics


def _seeds_section(results: Results) -> str:
    statistics = seed_statistics(results)
    reference = next(iter(statistics))
    rows = []
    for method, entry in statistics.items():
        accuracy = entry["mean_accuracy"]
        assert isinstance(accuracy, Summary)
        row = [method, f"{accuracy.mean:.4f} ± {accuracy.std:.4f}", _interval(accuracy)]
        comparison = entry.get("vs_reference")
        change = entry.get("delta_m")
        if isinstance(comparison, PairedComparison) and isinstance(change, Summary):
            p = comparison.p_value
            row += [
                f"{comparison.difference.mean:+.4f} {_interval(comparison.difference)}",
                f"{comparison.wins}/{comparison.losses}",
                "-" if math.isnan(p) else f"{p:.3f}" + (" *" if comparison.beyond_noise else ""),
                f"{change.mean:+.2f} {_interval(change, digits=2)}",
            ]
        else:
            row += ["reference", "", "", ""]
        rows.append(row)
    header = [
        "method",
        "mean accuracy ± std",
        "95% interval",
        f"Δ vs {reference} [95%]",
        "wins/losses",
        "p (paired t)",
        "Δm% [95%]",
    ]
    note = (
        f"Over the seeds {', '.join(map(str, _seeds(results)))}: the mean over seeds of the "
        "test mean accuracy, its sample standard deviation and the 95% Student-t interval "
        f"of the mean; against {reference}, the difference per seed (same seed: paired), the "
        "seeds won and lost, and the two-sided paired t-test's p-value (* below 0.05: beyond "
        "seed noise). Δm% (Maninis et al. 2019, as FAMO and Nash-MTL report it) is the mean "
        "relative change of the per-task accuracies, signed so that lower is better."
    )
    return f"## Seeds\n\n{_table(header, rows, labels=1)}\n\n{note}"


def _interval(summary: Summary, digits: int = 4) -> str:
    if math.isnan(summary.low):
        return "-"
    return f"[{summary.low:+.{digits}f}, {summary.high:+.{digits}f}]"


def _dst_drops_section(results: Results) -> str:
    rows = []
    for name, run in results["runs"].items():
        if not _has_terms(run):
            continue
        drops, before = dst_drops(run)
        note = (
            "DST dropped no task before the selected epoch: these weights are an equal-weight "
            "run's, so the comparison says nothing about DST"
            if before
            else ""
        )
        rows.append(
            [
                name,
                str(len(drops)),
                str(drops[0]) if drops else "none",
                str(run["selected_epoch"]),
                note,
            ]
        )
    header = ["run", "epochs with a task dropped", "first such epoch", "selected epoch", "note"]
    text = (
        "DST keeps every task in its first two epochs (the warm-up, then the epoch its first "
        "draw is computed in), so a run needs more than three epochs for dropping to act, "
        "and the epoch selected on validation must come after the first drop."
    )
    return f"## DST drops\n\n{_table(header, rows, labels=1)}\n\n{text}"


def _load(value: list[float] | None) -> str:
    """A load-average triple as 1-, 5- and 15-minute values."""
    return "not recorded" if value is None else "/".join(f"{v:.2f}" for v in value)


def _keep_probability_section(results: Results, run_name: str) -> str:
    tasks = _tasks(results)
    records = results["runs"][run_name]["epochs"]
    rows = [
        [
            str(record["epoch"]),
            *(
                _fmt(record["keep_probabilities"].get(task))
                # The last epoch's draw applies to no epoch: the run ends first.
                + ("" if record["gates"].get(task, True) or last else " (dropped)")
                for task in tasks
            ),
        ]
        for record, last in zip(records, [False] * (len(records) - 1) + [True], strict=True)
    ]
    table = _table(["epoch", *tasks], rows)
    note = (
        'Computed at the end of each epoch; "(dropped)": the draw made then left the task '
        "out of the next epoch's updates. The last epoch's draw is not marked: no epoch "
        "applied it."
    )
    return f"## Keep probabilities per epoch: {run_name}\n\n{table}\n\n{note}"


def _terms_section(results: Results, run_name: str, terms_epoch: int | None) -> str:
    run = results["runs"][run_name]
    with_terms = [record for record in run["epochs"] if record["terms"]]
    if terms_epoch is None:
        record = with_terms[-1]
    else:
        matching = [record for record in with_terms if record["epoch"] == terms_epoch]
        if not matching:
            return (
                f"## Terms at epoch {terms_epoch}: {run_name}\n\n"
                f"No terms were recorded at epoch {terms_epoch} for this run."
            )
        record = matching[0]
    metrics = list(record["terms"])
    rows = [
        [
            task,
            *(_fmt(record["terms"][metric].get(task)) for metric in metrics),
            _fmt(record["keep_probabilities"].get(task)),
        ]
        for task in _tasks(results)
    ]
    table = _table(["task", *metrics, "keep probability"], rows)
    note = "The keep probability is the one recorded in the same epoch as the terms."
    return f"## Terms at epoch {record['epoch']}: {run_name}\n\n{table}\n\n{note}"


def _training_loss_section(results: Results, run_name: str) -> str:
    run = results["runs"][run_name]
    tasks = _tasks(results)
    rows = []
    for record in run["epochs"]:
        epoch = str(record["epoch"])
        if record["epoch"] == run["selected_epoch"]:
            epoch += " (selected)"
        losses = [_fmt(record["train_loss"].get(task)) for task in tasks]
        rows.append(
            [epoch, *losses, _fmt(record["valid"]["mean_accuracy"]), f"{record['seconds']:.1f}"]
        )
    table = _table(["epoch", *tasks, "valid mean accuracy", "seconds"], rows)
    return f"## Training loss per epoch: {run_name}\n\n{table}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, labels: int = 1) -> str:
    """A Markdown table padded to line up as plain text.

    The first ``labels`` columns hold text and are left-aligned; the rest hold numbers and
    are right-aligned so their decimal points line up.
    """
    cells = [[cell.replace("|", r"\|") for cell in row] for row in [header, *rows]]
    widths = [max(3, *(len(row[column]) for row in cells)) for column in range(len(header))]

    def line(row: Sequence[str]) -> str:
        padded = [
            cell.ljust(width) if column < labels else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        ":" + "-" * (width - 1) if column < labels else "-" * (width - 1) + ":"
        for column, width in enumerate(widths)
    ]
    return "\n".join([line(cells[0]), "| " + " | ".join(rule) + " |", *map(line, cells[1:])])


def _bold_best(values: Sequence[float]) -> list[str]:
    """Formatted values, the highest ones in bold; a single run has nothing to beat."""
    finite = [value for value in values if math.isfinite(value)]
    best = max(finite) if len(values) > 1 and finite else None
    return [f"**{_fmt(value)}**" if value == best else _fmt(value) for value in values]


def _average_ranks(scores: Mapping[str, float]) -> dict[str, float]:
    """Ranks with 1 for the highest score; tied scores share the mean of the ranks they span."""
    return {
        name: 1
        + sum(other > score for other in scores.values())
        + (sum(other == score for other in scores.values()) - 1) / 2
        for name, score in scores.items()
    }


def _plot_per_task_series(
    results: Results,
    run_name: str,
    path: Path,
    field: _SeriesField,
    *,
    title: str,
    ylabel: str,
    ylim: tuple[float, float] | None,
) -> None:
    run = results["runs"][run_name]
    tasks = _tasks(results)
    epochs = [record["epoch"] for record in run["epochs"]]
    legend_columns = 1 + (len(tasks) - 1) // 20
    # Each extra legend column gets its own width, so the axes keep theirs.
    figure = Figure(figsize=(7.5 + 2.5 * (legend_columns - 1), 4.5))
    axes = figure.add_subplot()
    for index, task in enumerate(tasks):
        values = [_as_float(record[field].get(task)) for record in run["epochs"]]
        # Ten colours, then the next line style, so up to 40 tasks stay distinguishable.
        linestyle = ("-", "--", ":", "-.")[index // 10 % 4]
        # Lines on the same values (every keep probability at 1.0) hide each other: earlier
        # tasks are drawn wider and below, so each shows as a ring around the next.
        axes.plot(
            epochs,
            values,
            marker="o",
            markersize=3 + 1.5 * (len(tasks) - 1 - index) / max(len(tasks) - 1, 1) * 3,
            linewidth=1 + 2 * (len(tasks) - 1 - index) / max(len(tasks) - 1, 1),
            color=f"C{index % 10}",
            linestyle=linestyle,
            label=task,
            zorder=2 + index,
        )
        if field == "keep_probabilities":
            dropped = dropping_draws(run, task)
            axes.plot(
                dropped,
                [values[epochs.index(epoch)] for epoch in dropped],
                linestyle="none",
                marker="x",
                markersize=9,
                color=f"C{index % 10}",
                zorder=100,
                label=None,
            )
    if ylim is not None:
        axes.set_ylim(*ylim)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(f"{title}: {run_name} ({run['description']})")
    axes.set_xlabel("epoch")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(
        title="task",
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize="small",
        ncols=legend_columns,
    )
    _save_figure(figure, path)


def _save_figure(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.tight_layout()
    # "tight" also keeps the legend placed outside the axes inside the image.
    figure.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    write_bytes(path, buffer.getvalue())


def _json_safe(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def _check_has_runs(results: Results) -> None:
    if not results["runs"]:
        raise ValueError("the results hold no runs to report")


def _tasks(results: Results) -> list[str]:
    return results["study"]["attributes"]


def _has_terms(run: RunResult) -> bool:
    return any(record["terms"] for record in run["epochs"])


def _file_stem(run_name: str) -> str:
    """The run name made safe as part of a file name (run names come from the command line)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", run_name)


def _as_float(value: float | None) -> float:
    return math.nan if value is None else value


def _fmt(value: float | None) -> str:
    number = _as_float(value)
    return f"{number:.4f}" if math.isfinite(number) else "n/a"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
