"""The statistics over seeds and the report files: ``metrics.json``, ``results.md`` and
``scores.png``. Matplotlib is imported only to draw the figure."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dstmtl.study._atomic import write_bytes
from dstmtl.study.config import StudyConfig, higher_is_better
from dstmtl.study.records import RunResult, StudyResults
from dstmtl.study.statistics import compare_paired, delta_m, mean_ranks, summarize

__all__ = ["statistics", "write_report"]


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


def write_report(results: StudyResults, config: StudyConfig, out: Path) -> list[Path]:
    """Write ``metrics.json``, ``results.md`` and ``scores.png`` atomically into ``out``."""
    json_path, markdown_path, figure_path = (
        out / "metrics.json",
        out / "results.md",
        out / "scores.png",
    )
    text = json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n"
    write_bytes(json_path, text.encode())
    write_bytes(figure_path, _figure(results, config))
    document = markdown(results, config) + f"\n![scores]({figure_path.name})\n"
    write_bytes(markdown_path, document.encode())
    return [json_path, markdown_path, figure_path]


def markdown(results: StudyResults, config: StudyConfig) -> str:
    stats = results["statistics"]
    tasks = {name: task.metric for name, task in config.tasks.items()}
    n = len(config.seeds)
    lines = [
        "# Multi-task study",
        "",
        f"{len(config.methods)} methods x {n} seeds ({', '.join(map(str, config.seeds))}), "
        f"{config.epochs} epochs, batch {config.batch_size}, Adam lr {config.learning_rate}; "
        f"epoch selected on validation ({config.selection}), test evaluated once.",
        "",
        "## Test scores over seeds",
        "",
        f"Mean ± standard deviation over the {n} seeds, and the 95% Student-t interval of "
        "the mean. Arrows: ↑ higher is better, ↓ lower.",
        "",
        "| method | " + " | ".join(f"{t} {m} {_arrow(m)}" for t, m in tasks.items()) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for method, entry in stats["methods"].items():
        cells = [_cell(entry["tasks"][task]) for task in tasks]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Against {config.reference}",
        "",
        "Per task: the mean difference (method minus reference) with its 95% t-interval, the "
        "seeds won / lost, and the two-sided paired t-test's p-value; **bold** where p < 0.05, "
        "a difference beyond seed noise. With one seed there is no test. Δm% (Maninis et al. "
        "2019, as FAMO and Nash-MTL report it) is the mean relative change over tasks with "
        "the sign turned so that **lower is better** (negative: better than the reference), "
        "per seed, then summarised.",
        "",
        "| method | " + " | ".join(tasks) + " | Δm% | mean rank | wall time (s) | peak memory |",
        "|---" * (len(tasks) + 5) + "|",
    ]
    for method, entry in stats["methods"].items():
        if method == config.reference:
            cells = ["reference"] * len(tasks)
        else:
            cells = [_comparison_cell(entry["vs_reference"][task]) for task in tasks]
        rank = entry["mean_rank"]
        lines.append(
            f"| {method} | "
            + " | ".join(cells)
            + f" | {_cell(entry['delta_m'], digits=2)} | "
            + ("-" if rank is None else f"{rank:.2f}")
            + f" | {_cell(entry['wall_seconds'], digits=1)}"
            + f" | {_memory(entry['peak_memory_bytes'])} |"
        )
    if "stl" in config.methods:
        lines += ["", "Δm% against single-task models (`stl`):", ""]
        lines += [
            f"- {method}: {_cell(entry['delta_m_vs_stl'], digits=2)}"
            for method, entry in stats["methods"].items()
            if "delta_m_vs_stl" in entry
        ]
    load = results["environment"]
    lines += [
        "",
        "Wall time measures the host as much as the method: on a shared host it follows the "
        "load of other processes (load average at start "
        f"{_load(load.get('load_at_start'))}, at end {_load(load.get('load_at_end'))}). "
        "Peak memory is the accelerator's peak allocation (not measured on the CPU).",
        "",
        "## Runs",
        "",
        "Per run: the epoch selected on validation, the epochs in which DST dropped a task, "
        "and whether the selected weights predate the first drop (then they are those of an "
        "equal-weight run, and the comparison says nothing about DST).",
        "",
        "| run | selected epoch | epochs with a task dropped | first drop | note |",
        "|---|---|---|---|---|",
    ]
    for name, run in results["runs"].items():
        note = ""
        if run["selected_before_first_drop"]:
            note = (
                "**DST dropped no task: an equal-weight run**"
                if run["first_drop_epoch"] is None
                else "**selected before the first drop: DST never acted on these weights**"
            )
        first = "-" if run["first_drop_epoch"] is None else str(run["first_drop_epoch"])
        selected = "per task" if run["selected_epoch"] < 0 else str(run["selected_epoch"])
        lines.append(f"| {name} | {selected} | {run['dropping_epochs']} | {first} | {note} |")
    return "\n".join(lines) + "\n"


def _figure(results: StudyResults, config: StudyConfig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stats = results["statistics"]["methods"]
    tasks = {name: task.metric for name, task in config.tasks.items()}
    methods = list(stats)
    figure = Figure(figsize=(max(6.0, 1.2 * len(tasks) * max(1, len(methods)) / 2), 4))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(tasks), squeeze=False)[0]
    # tab20 has 20 distinct colours: no two methods share one up to 20 methods.
    colours = [f"C{i}" if len(methods) <= 10 else _tab20(i) for i in range(len(methods))]
    for axis, (task, metric) in zip(axes, tasks.items(), strict=True):
        for i, method in enumerate(methods):
            summary = stats[method]["tasks"][task]
            mean = summary["mean"]
            error = None
            if summary["high"] is not None and math.isfinite(summary["high"]):
                error = [[mean - summary["low"]], [summary["high"] - mean]]
            axis.bar(i, mean, yerr=error, color=colours[i], capsize=3, label=method)
        axis.set_xticks(range(len(methods)), methods, rotation=45, ha="right")
        axis.set_title(f"{task} ({metric} {_arrow(metric)})")
    axes[0].set_ylabel("test score, mean and 95% interval over seeds")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def _tab20(index: int) -> tuple[float, float, float, float]:
    from matplotlib import colormaps

    colour: tuple[float, float, float, float] = colormaps["tab20"](index % 20)
    return colour


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


def _cell(summary: Mapping[str, Any], digits: int = 4) -> str:
    mean, std = summary["mean"], summary["std"]
    if mean is None or not math.isfinite(mean):
        return "-"
    if std is None or not math.isfinite(std):
        return f"{mean:.{digits}f}"
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
    return "unknown" if value is None else "/".join(f"{v:.2f}" for v in value)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
