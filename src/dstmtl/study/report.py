"""The statistics over seeds and the report files.

:func:`write_report` writes ``metrics.json`` (every record), ``results.md`` and PNG figures:
``scores.png`` (each task's test score per method over seeds, with the majority-class
accuracy where the harness measured it), and per run ``training_loss_<run>.png`` and, for a
run of a method that drops tasks, ``keep_probabilities_<run>.png``. :func:`summary` is the
few lines printed at the end of a study.

Matplotlib is imported only to draw, on ``matplotlib.figure.Figure`` objects with the
Agg canvas rather than through ``pyplot``: no global backend switch in the importing
process and no figure left open between calls.
"""

from __future__ import annotations

import colorsys
import dataclasses
import io
import json
import math
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dstmtl.study._atomic import write_bytes
from dstmtl.study.config import StudyConfig, higher_is_better
from dstmtl.study.records import RunResult, StudyResults
from dstmtl.study.statistics import compare_paired, delta_m, mean_ranks, summarize

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["statistics", "summary", "write_report"]

_DPI = 120
_SCORES = "scores.png"
_SUMMARY_TASKS = 20
_Colour = tuple[float, float, float, float]
_Field = Literal["train_loss", "keep_probabilities"]


def statistics(results: StudyResults, config: StudyConfig) -> dict[str, Any]:
    """Per method: each task's metric over seeds (mean, std, 95% t-interval), the paired
    comparison with the reference per task, Δm% against the reference (per seed, then
    summarised) and against ``stl`` when it ran, the mean rank, wall time and peak memory.
    """
    runs = results["runs"]
    tasks = {name: task.metric for name, task in config.tasks.items()}
    directions = {name: higher_is_better(metric) for name, metric in tasks.items()}

    def scores(method: str) -> list[dict[str, float]]:
        return [
            {
                task: runs[f"{method}/seed{seed}"]["test"][task][metric]
                for task, metric in tasks.items()
            }
            for seed in config.seeds
        ]

    per_method = {method: scores(method) for method in config.methods}
    means = {
        method: {task: sum(s[task] for s in seeds) / len(seeds) for task in tasks}
        for method, seeds in per_method.items()
    }
    finite = all(math.isfinite(v) for m in means.values() for v in m.values())
    ranks = mean_ranks(means, directions) if finite else {}
    out: dict[str, Any] = {"reference": config.reference, "methods": {}}
    reference = per_method[config.reference]
    for method, seeds in per_method.items():
        entry: dict[str, Any] = {
            "tasks": {task: _summary([s[task] for s in seeds]) for task in tasks},
            "wall_seconds": _summary(
                [runs[f"{method}/seed{seed}"]["wall_seconds"] for seed in config.seeds]
            ),
            "peak_memory_bytes": _max_memory(
                [runs[f"{method}/seed{seed}"] for seed in config.seeds]
            ),
            "mean_rank": ranks.get(method),
        }
        if method != config.reference:
            entry["vs_reference"] = {
                task: _comparison(
                    [s[task] for s in seeds], [r[task] for r in reference], directions[task]
                )
                for task in tasks
            }
        entry["delta_m"] = _delta_m(seeds, reference, directions)
        if "stl" in per_method and method != "stl":
            entry["delta_m_vs_stl"] = _delta_m(seeds, per_method["stl"], directions)
        out["methods"][method] = entry
    return out


def write_report(
    results: StudyResults, config: StudyConfig, out: Path, *, terms_epoch: int | None = None
) -> list[Path]:
    """Write ``metrics.json``, ``results.md`` and the figures atomically into ``out``.

    ``terms_epoch`` (numbered from 1, as the report numbers epochs) chooses the epoch of
    each DST run's terms table; the last epoch by default.

    Returns the paths written: ``metrics.json``, ``results.md``, ``scores.png``, then each
    run's figures.
    """
    paths = [out / "metrics.json", out / "results.md", out / _SCORES]
    text = json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n"
    write_bytes(paths[0], text.encode())
    write_bytes(paths[2], _scores_figure(results, config))
    tasks = list(config.tasks)
    for name, run in results["runs"].items():
        if not _has_own_epochs(run):
            continue
        for field in _figure_fields(run):
            path = out / _figure_name(field, name)
            write_bytes(path, _epochs_figure(run, name, tasks, field))
            paths.append(path)
    write_bytes(paths[1], _markdown(results, config, terms_epoch).encode())
    return paths


def summary(results: StudyResults, config: StudyConfig, *, out: Path | None = None) -> str:
    """A few lines for the terminal at the end of a study: the best method per task (mean
    over seeds), Δm% against the reference, the runs whose selected weights DST never
    touched, and, with ``out``, the path of ``results.md``."""
    stats = results["statistics"]["methods"]
    reference = config.reference
    lines = [
        f"{_count(len(config.methods), 'method')} x {_count(len(config.seeds), 'seed')}, "
        f"{_count(config.epochs, 'epoch')}; "
        f"test scores, mean over seeds (reference: {reference})"
    ]
    tasks = list(config.tasks.items())
    for task, spec in tasks[:_SUMMARY_TASKS]:
        means = {method: entry["tasks"][task]["mean"] for method, entry in stats.items()}
        best = _best(means, higher_is_better(spec.metric))
        text = f"  {task} {spec.metric} {_arrow(spec.metric)}: "
        if best is None:
            lines.append(text + "no finite score")
            continue
        text += f"best {best} {means[best]:.4f}"
        if best != reference:
            text += f", {reference} {means[reference]:.4f}"
            if stats[best]["vs_reference"][task]["beyond_noise"]:
                text += " (beyond seed noise)"
        lines.append(text)
    if len(tasks) > _SUMMARY_TASKS:
        lines.append(f"  ... {len(tasks) - _SUMMARY_TASKS} more tasks in results.md")
    lines.append(f"Δm% vs {reference} (lower is better):")
    lines += [
        f"  {method}: {_cell(entry['delta_m'], digits=2, interval=False)}"
        for method, entry in stats.items()
        if method != reference
    ]
    untouched = [name for name, run in results["runs"].items() if run["selected_before_first_drop"]]
    if untouched:
        lines.append(
            "Selected before DST's first drop, so not a test of DST: " + ", ".join(untouched)
        )
    if out is not None:
        lines.append(f"Report: {out / 'results.md'}")
    return "\n".join(lines)


def _markdown(results: StudyResults, config: StudyConfig, terms_epoch: int | None) -> str:
    sections = [
        _header_section(results, config),
        _sessions_section(results),
        _scores_section(results, config),
        _other_metrics_section(results, config),
        _comparison_section(results, config),
        _drops_section(results, config),
        _runs_section(results, config, terms_epoch),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def _header_section(results: StudyResults, config: StudyConfig) -> str:
    n = len(config.seeds)
    lines = [
        "# Multi-task study",
        "",
        f"{_count(len(config.methods), 'method')} x {_count(n, 'seed')} "
        f"({', '.join(map(str, config.seeds))}), "
        f"{_count(config.epochs, 'epoch')}, batch {config.batch_size}, "
        f"Adam lr {config.learning_rate}; "
        f"epoch selected on validation ({config.selection}), test evaluated once.",
    ]
    # Studies recorded before the harness kept the caller's description have no "info".
    described = {**results.get("info", {}), "environment": results["environment"]}
    lines += ["", *(f"- {key}: {_value(value)}" for key, value in described.items())]
    return "\n".join(lines)


def _sessions_section(results: StudyResults) -> str:
    sessions = results.get("sessions", [])
    if not sessions:
        return "## Sessions\n\nNo session was recorded."
    rows = []
    for index, session in enumerate(sessions, start=1):
        hardware = session["hardware"]
        gpus = f", {hardware['gpus']} GPU(s)" if hardware["gpus"] else ""
        rows.append(
            [
                str(index),
                session["started"],
                session["finished"] or "not finished",
                f"`{shlex.join(session['launcher'])}`",
                str(session["world_size"]),
                str(session["effective_batch_size"]),
                f"{hardware['device']} ({hardware['device_name']}){gpus}",
                hardware["cpu"],
                _load(session["load_at_start"]),
                _load(session["load_at_end"]),
            ]
        )
    header = [
        "#",
        "started",
        "finished",
        "launcher",
        "processes",
        "effective batch",
        "device",
        "CPU",
        "load at start",
        "load at end",
    ]
    commands = [
        f"{index}. `{shlex.join([*session['launcher'], *session['argv']])}`"
        for index, session in enumerate(sessions, 1)
    ]
    return (
        "## Sessions\n\nEach start of the study, the first and every resume: how the processes "
        "were launched, their number, the batch of one optimizer step over all of them, and "
        "the host's 1, 5 and 15-minute load averages.\n\n"
        + _table(header, rows)
        + "\n\nCommands:\n\n"
        + "\n".join(commands)
    )


def _scores_section(results: StudyResults, config: StudyConfig) -> str:
    stats = results["statistics"]["methods"]
    tasks = config.tasks
    n = len(config.seeds)
    columns = {
        task: _bold_best(
            {method: entry["tasks"][task] for method, entry in stats.items()},
            higher_is_better(spec.metric),
        )
        for task, spec in tasks.items()
    }
    rows = [[method, *(columns[task][method] for task in tasks)] for method in stats]
    majority = _majority(results, config)
    if majority:
        rows.append(
            ["majority class", *(_number(majority[t]) if t in majority else "-" for t in tasks)]
        )
    header = [
        "method",
        *(f"{task} {spec.metric} {_arrow(spec.metric)}" for task, spec in tasks.items()),
    ]
    note = (
        f"Mean ± standard deviation over the {n} seeds, and the 95% Student-t interval of the "
        "mean; **bold**: the best mean per task. Arrows: ↑ higher is better, ↓ lower."
    )
    if majority:
        note += (
            " Majority class: the test accuracy of always predicting the class most frequent "
            "in training, the level a model must beat."
        )
    return f"## Test scores over seeds\n\n{note}\n\n{_table(header, rows)}\n\n![scores]({_SCORES})"


def _other_metrics_section(results: StudyResults, config: StudyConfig) -> str:
    runs = results["runs"]
    rows = []
    for task, spec in config.tasks.items():
        first = runs[f"{config.methods[0]}/seed{config.seeds[0]}"]["test"][task]
        for metric in (m for m in first if m != spec.metric):
            summaries = {
                method: _summary(
                    [runs[f"{method}/seed{seed}"]["test"][task][metric] for seed in config.seeds]
                )
                for method in config.methods
            }
            cells = _bold_best(summaries, higher_is_better(metric), interval=False)
            rows.append([task, f"{metric} {_arrow(metric)}", *cells.values()])
    if not rows:
        return ""
    return (
        "## Other metrics\n\nThe metrics that select no epoch and enter no comparison, mean ± "
        "standard deviation over seeds; **bold**: the best mean.\n\n"
        + _table(["task", "metric", *config.methods], rows)
    )


def _comparison_section(results: StudyResults, config: StudyConfig) -> str:
    stats = results["statistics"]["methods"]
    tasks = list(config.tasks)
    reference = config.reference
    rows = []
    marked = False
    for method, entry in stats.items():
        if method == reference:
            cells = ["reference"] * len(tasks)
        else:
            cells = [_comparison_cell(entry["vs_reference"][task]) for task in tasks]
        equal_weight = sum(
            _equal_weight_model(results["runs"][f"{method}/seed{seed}"]) for seed in config.seeds
        )
        label = method
        if equal_weight:
            label += f" † ({equal_weight}/{len(config.seeds)} seeds)"
            marked = True
        rank = entry["mean_rank"]
        rows.append(
            [
                label,
                *cells,
                _cell(entry["delta_m"], digits=2),
                "-" if rank is None else f"{rank:.2f}",
                _cell(entry["wall_seconds"], digits=1),
                _memory(entry["peak_memory_bytes"]),
            ]
        )
    header = ["method", *tasks, "Δm%", "mean rank", "wall time (s)", "peak memory"]
    lines = [
        f"## Against {reference}",
        "",
        "Per task: the mean difference (method minus reference) with its 95% t-interval, the "
        "seeds won / lost, and the two-sided paired t-test's p-value; **bold** where p < 0.05, "
        "a difference beyond seed noise. With one seed there is no test. Δm% (Maninis et al. "
        "2019, as FAMO and Nash-MTL report it) is the mean relative change over tasks with "
        "the sign turned so that **lower is better** (negative: better than the reference), "
        "per seed, then summarised.",
        "",
        _table(header, rows),
        "",
        "Wall time is not a cost comparison: it measures the host as much as the method, and "
        "on a shared host it follows the load of other processes (see the load averages under "
        "Sessions); compare it only between runs of one session on an otherwise idle host. "
        "Peak memory is the accelerator's peak allocation (not measured on the CPU).",
    ]
    if marked:
        lines += [
            "",
            "† In the seeds counted, the epoch selected on validation came before DST's first "
            f"drop: there {_equal_weight_note(reference)} (see DST drops).",
        ]
    if "stl" in config.methods:
        lines += ["", "Δm% against single-task models (`stl`):", ""]
        lines += [
            f"- {method}: {_cell(entry['delta_m_vs_stl'], digits=2)}"
            for method, entry in stats.items()
            if "delta_m_vs_stl" in entry
        ]
    return "\n".join(lines)


def _drops_section(results: StudyResults, config: StudyConfig) -> str:
    rows = []
    for name, run in results["runs"].items():
        if not _drops_tasks(run):
            continue
        first = run["first_drop_epoch"]
        rows.append(
            [
                name,
                str(run["dropping_epochs"]),
                "none" if first is None else _epoch(first),
                _epoch(run["selected_epoch"]),
                "yes" if run["selected_before_first_drop"] else "no",
                _before_drop_note(run, config.reference),
            ]
        )
    if not rows:
        return ""
    header = [
        "run",
        "epochs with a task dropped",
        "first drop",
        "selected epoch",
        "selected before the first drop",
        "note",
    ]
    return (
        "## DST drops\n\nPer run of a method that drops tasks. DST keeps every task in its "
        "first two epochs (the warm-up, then the epoch in which its first draw is computed) "
        "and in its cool-down at the end, so it needs enough epochs for dropping to act, "
        "and the epoch selected on validation must come after the first drop for the run "
        "to say anything about DST.\n\n" + _table(header, rows)
    )


def _runs_section(results: StudyResults, config: StudyConfig, terms_epoch: int | None) -> str:
    tasks = list(config.tasks)
    parts = [
        "## Runs\n\nPer run and epoch (numbered from 1, as in the log): each task's mean "
        "training loss, the validation score "
        "that selects the epoch (higher is better), the tasks left out of the epoch's "
        "updates and the epoch's seconds. For runs that drop tasks, the keep probability "
        "computed at the end of each epoch from its losses (the draw that decides the next "
        "epoch uses it), marked (dropped) in the epochs whose updates left the task out, "
        "and the terms DST combined into it at "
        + ("the last epoch." if terms_epoch is None else f"epoch {terms_epoch}.")
    ]
    for name, run in results["runs"].items():
        title = f"### {name}: {run['description']}"
        if not _has_own_epochs(run):
            parts.append(
                f"{title}\n\nOne model per task: each task's epochs are those of its own "
                "model, in its checkpoint."
            )
            continue
        blocks = [title, _epochs_table(run, tasks)]
        if _drops_tasks(run):
            blocks.append(_keep_probability_table(run, tasks))
            blocks.append(_terms_table(run, tasks, terms_epoch))
        blocks += [
            f"![{field.replace('_', ' ')} {name}]({_figure_name(field, name)})"
            for field in _figure_fields(run)
        ]
        parts.append("\n\n".join(block for block in blocks if block))
    return "\n\n".join(parts)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _epoch(index: int) -> str:
    """An epoch as the log names it: numbered from 1."""
    return str(index + 1)


def _epochs_table(run: RunResult, tasks: list[str]) -> str:
    drops = _drops_tasks(run)
    rows = []
    for record in run["epochs"]:
        epoch = _epoch(record["epoch"])
        if record["epoch"] == run["selected_epoch"]:
            epoch += " (selected)"
        rows.append(
            [
                epoch,
                *(_number(record["train_loss"].get(task)) for task in tasks),
                _number(record["valid_score"]),
                *([", ".join(record["dropped"]) or "-"] if drops else []),
                f"{record['seconds']:.1f}",
            ]
        )
    header = [
        "epoch",
        *(f"loss {task}" for task in tasks),
        "valid score",
        *(["dropped"] if drops else []),
        "seconds",
    ]
    return _table(header, rows)


def _keep_probability_table(run: RunResult, tasks: list[str]) -> str:
    # Only the drops that an epoch applied are marked: the last epoch's draw applies to none.
    rows = [
        [
            _epoch(record["epoch"]),
            *(
                _number(record["keep_probabilities"].get(task))
                + (" (dropped)" if task in record["dropped"] else "")
                for task in tasks
            ),
        ]
        for record in run["epochs"]
    ]
    return "Keep probabilities:\n\n" + _table(["epoch", *tasks], rows)


def _terms_table(run: RunResult, tasks: list[str], epoch: int | None) -> str:
    # Records from before the harness kept the terms have none.
    with_terms = [record for record in run["epochs"] if record.get("terms")]
    if epoch is not None:
        with_terms = [record for record in with_terms if record["epoch"] + 1 == epoch]
        if not with_terms:
            return f"Terms at epoch {epoch}: none, the run has no such epoch."
    if not with_terms:
        return ""
    record = with_terms[-1]
    terms = record["terms"]
    weights = record.get("loss_weights", {})
    rows = [
        [
            task,
            *(_number(values.get(task)) for values in terms.values()),
            _number(record["keep_probabilities"].get(task)),
            _number(weights.get(task)),
        ]
        for task in tasks
    ]
    header = ["task", *terms, "keep probability", "loss weight"]
    return f"Terms at epoch {_epoch(record['epoch'])}:\n\n" + _table(header, rows)


def _before_drop_note(run: RunResult, reference: str) -> str:
    """For a run of a task-dropping method whose selected epoch came before its first drop,
    what its test scores are; empty for any other run."""
    if not run["selected_before_first_drop"]:
        return ""
    when = (
        "DST dropped no task"
        if run["first_drop_epoch"] is None
        else "selected before the first drop"
    )
    if _equal_weight_model(run):
        return f"**{when}: {_equal_weight_note(reference)}**"
    return f"**{when}: no drop acted on these weights, but DST's loss weights did**"


def _equal_weight_model(run: RunResult) -> bool:
    """Whether a run's selected weights are an equal-weight model's: selected before DST's
    first drop, with every loss weight 1 until then."""
    return run["selected_before_first_drop"] and all(
        weight == 1.0
        for record in run["epochs"]
        # The weights recorded at the end of an epoch act on the next one.
        if record["epoch"] < run["selected_epoch"]
        for weight in record.get("loss_weights", {}).values()
    )


def _equal_weight_note(reference: str) -> str:
    against = (
        "two equal-weight models"
        if reference == "equal"
        else f"an equal-weight model with {reference}"
    )
    return f"its test scores are an equal-weight model's, and Δ vs {reference} compares {against}"


def _scores_figure(results: StudyResults, config: StudyConfig) -> bytes:
    from matplotlib.figure import Figure

    stats = results["statistics"]["methods"]
    runs = results["runs"]
    methods = list(config.methods)
    majority = _majority(results, config)
    colours = _colours(len(methods))
    columns = min(len(config.tasks), 4)
    rows = -(-len(config.tasks) // columns)
    width = max(3.5, 0.45 * len(methods) + 1.5)
    figure = Figure(figsize=(columns * width, rows * 3.8 + 0.6))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, (task, spec) in zip(axes, config.tasks.items(), strict=False):
        for index, method in enumerate(methods):
            seeds = [
                runs[f"{method}/seed{seed}"]["test"][task][spec.metric] for seed in config.seeds
            ]
            axis.plot([index] * len(seeds), seeds, ".", color=colours[index], alpha=0.4)
            task_summary = stats[method]["tasks"][task]
            mean, low, high = task_summary["mean"], task_summary["low"], task_summary["high"]
            if not math.isfinite(mean):
                continue
            error = [[mean - low], [high - mean]] if math.isfinite(high) else None
            axis.errorbar(index, mean, yerr=error, fmt="o", color=colours[index], capsize=4)
        if task in majority:
            axis.axhline(
                majority[task], color="black", linestyle="--", linewidth=1, label="majority class"
            )
            axis.legend(loc="best", fontsize="small")
        axis.set_xticks(range(len(methods)), methods, rotation=45, ha="right")
        axis.set_title(f"{task} ({spec.metric} {_arrow(spec.metric)})")
        axis.grid(axis="y", alpha=0.3)
    for axis in axes[len(config.tasks) :]:
        axis.set_visible(False)
    figure.suptitle(
        "Test scores: mean and 95% interval over seeds (dots: single seeds); "
        "the y axes do not start at 0"
    )
    return _png(figure)


def _epochs_figure(run: RunResult, name: str, tasks: list[str], field: _Field) -> bytes:
    """One run's per-task ``train_loss`` or ``keep_probabilities`` against the epoch, with
    a cross on each epoch whose updates left the task out."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    records = run["epochs"]
    epochs = [record["epoch"] + 1 for record in records]
    keep = field == "keep_probabilities"
    # Keep probabilities are often equal (all 1 before the first draw): offset so that no
    # line hides another, by at most ±0.02.
    step = min(0.01, 0.04 / (len(tasks) - 1)) if keep and len(tasks) > 1 else 0.0
    legend_columns = 1 + (len(tasks) - 1) // 20
    figure = Figure(figsize=(7.5 + 2.5 * (legend_columns - 1), 4.5))
    axis = figure.add_subplot()
    colours = _colours(len(tasks))
    for index, task in enumerate(tasks):
        offset = (index - (len(tasks) - 1) / 2) * step
        values = [_as_float(record[field].get(task)) + offset for record in records]
        style = ("-", "--", "-.", ":")[index % 4]
        axis.plot(epochs, values, style, marker="o", markersize=3, color=colours[index], label=task)
        dropped = [i for i, record in enumerate(records) if task in record["dropped"]]
        axis.plot(
            [epochs[i] for i in dropped],
            [values[i] for i in dropped],
            "x",
            markersize=9,
            markeredgewidth=2,
            color=colours[index],
        )
    if any(record["dropped"] for record in records):
        axis.plot([], [], "x", color="black", label="dropped that epoch")
    if run["selected_epoch"] >= 0:
        axis.axvline(run["selected_epoch"] + 1, color="grey", linestyle=":", label="selected epoch")
    if keep:
        axis.set_ylim(-0.05, 1.05 + 0.02)
        axis.set_ylabel("keep probability (lines offset by up to ±0.02)")
        title = "Keep probability at the end of each epoch"
    else:
        axis.set_ylabel("training loss, epoch mean")
        title = "Training loss per task"
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("epoch")
    axis.set_title(f"{title}: {name}")
    axis.grid(alpha=0.3)
    axis.legend(
        loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", ncols=legend_columns
    )
    return _png(figure)


def _png(figure: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    figure.tight_layout()
    buffer = io.BytesIO()
    # "tight" keeps a legend placed outside the axes inside the image.
    figure.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    return buffer.getvalue()


def _colours(count: int) -> list[_Colour]:
    """``count`` distinct colours, so that no two methods (or tasks) share one: tab20's ten
    dark colours (matplotlib's default cycle), then its ten light ones, and beyond 20
    evenly spaced hues, alternately dark and light."""
    if count > 20:
        return [
            (*colorsys.hsv_to_rgb(i / count, 0.8, 0.9 if i % 2 else 0.6), 1.0) for i in range(count)
        ]
    from matplotlib import colormaps

    tab20 = colormaps["tab20"]
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return [tab20(order[i]) for i in range(count)]


def _figure_fields(run: RunResult) -> list[_Field]:
    """The per-epoch series drawn for a run: its training losses, and its keep
    probabilities when it drops tasks."""
    return ["train_loss", "keep_probabilities"] if _drops_tasks(run) else ["train_loss"]


def _figure_name(field: _Field, run_name: str) -> str:
    kind = "training_loss" if field == "train_loss" else field
    # Run names are "<method>/seed<seed>"; method names come from the command line.
    return f"{kind}_{re.sub(r'[^A-Za-z0-9._+-]', '-', run_name)}.png"


def _drops_tasks(run: RunResult) -> bool:
    """Whether the run's method drops tasks: its epochs record DST's terms (older records
    have none), or its drop fields say so."""
    return (
        run["first_drop_epoch"] is not None
        or run["selected_before_first_drop"]
        or any(record.get("terms") for record in run["epochs"])
    )


def _has_own_epochs(run: RunResult) -> bool:
    """False for the merged single-task (``stl``) run, whose epochs are one per task's model
    and select no epoch of their own."""
    return run["selected_epoch"] >= 0


def _majority(results: StudyResults, config: StudyConfig) -> dict[str, float]:
    """The majority-class test accuracy of each task judged by accuracy, where measured
    (studies recorded before the harness measured it have none)."""
    measured = results.get("baselines", {}).get("majority", {})
    return {
        task: measured[task]
        for task, spec in config.tasks.items()
        if spec.metric == "accuracy" and task in measured
    }


def _best(means: Mapping[str, float], higher: bool) -> str | None:
    """The name with the best finite mean, ``None`` when none is finite."""
    finite = {name: mean for name, mean in means.items() if math.isfinite(mean)}
    if not finite:
        return None
    return (max if higher else min)(finite, key=finite.__getitem__)


def _bold_best(
    summaries: Mapping[str, Mapping[str, Any]], higher: bool, *, interval: bool = True
) -> dict[str, str]:
    """Each summary as a cell, the best means in bold (a single method has nothing to beat)."""
    means = {name: summary["mean"] for name, summary in summaries.items()}
    best = _best(means, higher) if len(means) > 1 else None
    cells = {}
    for name, summary in summaries.items():
        cell = _cell(summary, interval=interval)
        cells[name] = f"**{cell}**" if best is not None and means[name] == means[best] else cell
    return cells


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join(
        "| " + " | ".join(cell.replace("|", r"\|") for cell in line) + " |" for line in lines
    )


def _value(value: Any) -> str:
    """A JSON value of the caller's description as short text."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{key} {_value(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(map(_value, value))
    return str(value)


def _summary(values: list[float]) -> dict[str, Any]:
    if not all(math.isfinite(v) for v in values):
        return {
            "mean": math.nan,
            "std": math.nan,
            "low": math.nan,
            "high": math.nan,
            "n": len(values),
        }
    summary = dataclasses.asdict(summarize(values))
    summary.pop("confidence")
    return summary


def _comparison(method: list[float], reference: list[float], higher: bool) -> dict[str, Any]:
    if not all(math.isfinite(v) for v in method + reference):
        return {"wins": 0, "losses": 0, "ties": 0, "p_value": math.nan, "beyond_noise": False}
    comparison = compare_paired(method, reference, higher_is_better=higher)
    data = dataclasses.asdict(comparison)
    data["difference"].pop("confidence")
    data["test"] = "two-sided paired t-test"
    return data


def _delta_m(
    seeds: list[dict[str, float]], reference: list[dict[str, float]], directions: dict[str, bool]
) -> dict[str, Any]:
    try:
        values = [delta_m(s, r, directions) for s, r in zip(seeds, reference, strict=True)]
    except ValueError:
        return _summary([math.nan])
    return {**_summary(values), "per_seed": values}


def _max_memory(runs: list[RunResult]) -> int | None:
    values = [run["peak_memory_bytes"] for run in runs if run["peak_memory_bytes"] is not None]
    return max(values) if values else None


def _arrow(metric: str) -> str:
    return "↑" if higher_is_better(metric) else "↓"


def _cell(summary: Mapping[str, Any], digits: int = 4, *, interval: bool = True) -> str:
    mean, std = summary["mean"], summary["std"]
    if mean is None or not math.isfinite(mean):
        return "-"
    if std is None or not math.isfinite(std):
        return f"{mean:.{digits}f}"
    if not interval:
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    low, high = summary["low"], summary["high"]
    return f"{mean:.{digits}f} ± {std:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _comparison_cell(comparison: Mapping[str, Any]) -> str:
    record = f"{comparison['wins']}/{comparison['losses']}"
    if "difference" not in comparison:
        return f"- ({record})"
    p = comparison["p_value"]
    text = f"{comparison['difference']['mean']:+.4f} ({record}"
    text += ")" if p is None or not math.isfinite(p) else f", p={p:.3f})"
    return f"**{text}**" if comparison["beyond_noise"] else text


def _memory(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


def _load(value: list[float] | None) -> str:
    return "not recorded" if value is None else "/".join(f"{v:.2f}" for v in value)


def _as_float(value: float | None) -> float:
    return math.nan if value is None else value


def _number(value: float | None) -> str:
    number = _as_float(value)
    return f"{number:.4f}" if math.isfinite(number) else "n/a"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
