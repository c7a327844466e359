"""dstmtl.study.run_study on a tiny custom dataset with missing labels (seconds)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from dstmtl import MultiHeadNet
from dstmtl.loss import MaskedMultiTaskLoss
from dstmtl.study import StudyConfig, StudyError, StudyTask, harness, parse_seeds, run_study
from dstmtl.study.evaluation import evaluate

TASKS = {
    "flag": StudyTask("binary"),
    "kind": StudyTask("multiclass", outputs=3),
    "size": StudyTask("regression", metric="rmse"),
}


def dataset(seed: int, n: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    y = torch.stack(
        [(x[:, 0] > 0).float(), (x[:, 1] > 0).float() + (x[:, 2] > 0).float(), x[:, 3] * 2],
        dim=1,
    )
    y[torch.rand(y.shape, generator=generator) < 0.3] = float("nan")
    y[: n // 4, 1] = float("nan")  # whole batches without a "kind" label
    return TensorDataset(x, y)


TRAIN, VALID, TEST = dataset(0, 96), dataset(1, 48), dataset(2, 48)


def model() -> MultiHeadNet:
    heads = {"flag": nn.Linear(16, 1), "kind": nn.Linear(16, 3), "size": nn.Linear(16, 1)}
    # The example input lets DST's depth term (dst-all) count the layers.
    backbone = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
    return MultiHeadNet(backbone, heads, example_input=torch.zeros(1, 6))


def config(**changes: Any) -> StudyConfig:
    settings: dict[str, Any] = {
        "tasks": TASKS,
        "methods": ("equal", "dst"),
        "seeds": (0, 1),
        "epochs": 4,
        "batch_size": 16,
        "learning_rate": 0.01,
        "selection": "loss",
    }
    return StudyConfig(**{**settings, **changes})


def study(out: Path, **changes: Any) -> Any:
    return run_study(config(**changes), model, TRAIN, VALID, TEST, out, progress=False)


def without_clock(results: Any) -> Any:
    """The results with the wall times and load averages left out."""
    runs = {
        name: {
            **run,
            "wall_seconds": None,
            "epochs": [{**epoch, "seconds": None} for epoch in run["epochs"]],
        }
        for name, run in results["runs"].items()
    }
    return runs


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("study") / "out"
    return out, study(out)


def test_every_method_and_seed_runs_and_is_reported(finished: tuple[Path, Any]) -> None:
    out, results = finished
    assert list(results["runs"]) == ["equal/seed0", "dst/seed0", "equal/seed1", "dst/seed1"]
    for name in ("study.json", "metrics.json", "results.md", "scores.png"):
        assert (out / name).exists(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["statistics"]["methods"]) == {"equal", "dst"}
    for run in results["runs"].values():
        assert set(run["test"]) == set(TASKS)
        assert set(run["test"]["flag"]) == {"accuracy", "balanced_accuracy", "f1"}
        assert set(run["test"]["kind"]) == {"accuracy", "miou"}
        assert set(run["test"]["size"]) == {"mae", "rmse"}
        assert all(math.isfinite(v) for m in run["test"].values() for v in m.values())
    report = (out / "results.md").read_text()
    assert "| dst |" in report
    assert "paired t-test" in report
    assert "Δm%" in report


def test_methods_of_a_seed_share_initial_weights_and_data_order(finished: tuple[Path, Any]) -> None:
    _, results = finished
    runs = results["runs"]
    # DST keeps every task in its first two epochs: the same run as equal weighting there.
    for seed in (0, 1):
        assert runs[f"dst/seed{seed}"]["epochs"][1]["train_loss"] == pytest.approx(
            runs[f"equal/seed{seed}"]["epochs"][1]["train_loss"]
        )
    assert (
        runs["equal/seed0"]["epochs"][0]["train_loss"]
        != runs["equal/seed1"]["epochs"][0]["train_loss"]
    )


def test_the_statistics_are_those_of_the_runs(finished: tuple[Path, Any]) -> None:
    _, results = finished
    stats = results["statistics"]["methods"]
    flags = [results["runs"][f"dst/seed{s}"]["test"]["flag"]["accuracy"] for s in (0, 1)]
    assert stats["dst"]["tasks"]["flag"]["mean"] == pytest.approx(sum(flags) / 2)
    reference = [results["runs"][f"equal/seed{s}"]["test"]["flag"]["accuracy"] for s in (0, 1)]
    differences = stats["dst"]["vs_reference"]["flag"]["differences"]
    assert differences == pytest.approx([a - b for a, b in zip(flags, reference, strict=True)])
    assert stats["equal"]["delta_m"]["mean"] == 0


def test_a_killed_study_resumes_to_the_same_results(
    finished: tuple[Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, uninterrupted = finished
    original = harness._save
    calls = {"n": 0}

    def killed_in_the_second_run(path: Path, state: dict[str, Any]) -> None:
        original(path, state)
        calls["n"] += 1
        if calls["n"] == 7:  # the second run (dst, seed 0), after its second epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(harness, "_save", killed_in_the_second_run)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        study(out)
    monkeypatch.setattr(harness, "_save", original)
    with pytest.raises(StudyError, match="already holds files"):
        study(out)
    resumed = run_study(config(), model, TRAIN, VALID, TEST, out, resume=True, progress=False)
    assert without_clock(resumed) == without_clock(uninterrupted)


def test_a_resume_with_another_configuration_is_refused(finished: tuple[Path, Any]) -> None:
    out, _ = finished
    before = (out / "study.json").read_text()
    with pytest.raises(StudyError, match="epochs: was 4, now 5"):
        run_study(config(epochs=5), model, TRAIN, VALID, TEST, out, resume=True, progress=False)
    assert (out / "study.json").read_text() == before


def test_resume_needs_a_study(tmp_path: Path) -> None:
    with pytest.raises(StudyError, match="holds no study to resume"):
        run_study(config(), model, TRAIN, VALID, TEST, tmp_path, resume=True, progress=False)


def test_targets_that_do_not_match_the_tasks_write_nothing(tmp_path: Path) -> None:
    two_columns = TensorDataset(torch.randn(8, 6), torch.zeros(8, 2))
    with pytest.raises(StudyError, match=r"train targets have shape \(8, 2\), expected"):
        run_study(config(), model, two_columns, VALID, TEST, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_an_output_folder_that_cannot_be_made_is_a_study_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StudyError, match="cannot create the study folder"):
        run_study(config(), model, TRAIN, VALID, TEST, blocker / "out", progress=False)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"methods": ("equal", "nope")}, r"unknown method\(s\) \['nope'\]; valid methods"),
        ({"methods": ("dst",)}, "reference method 'equal' is not among"),
        ({"seeds": ()}, "seeds must be distinct"),
        ({"epochs": 0}, "epochs must be a positive int"),
        ({"tasks": {"a": "binary"}}, "describe it as StudyTask"),
    ],
)
def test_bad_configurations_are_named(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(StudyError, match=message):
        config(**changes)


def test_task_metrics_and_kinds_are_checked() -> None:
    with pytest.raises(StudyError, match="metric 'mae' does not apply to a binary task"):
        StudyTask("binary", metric="mae")
    with pytest.raises(StudyError, match="unknown task kind 'ordinal'"):
        StudyTask("ordinal")  # type: ignore[arg-type]
    assert StudyTask("regression").metric == "mae"


def test_seeds_parse() -> None:
    assert parse_seeds("3") == (0, 1, 2)
    assert parse_seeds("0, 5,7") == (0, 5, 7)
    assert parse_seeds(2) == (0, 1)
    for bad in ("a,b", "0,0", "0", ""):
        with pytest.raises(StudyError):
            parse_seeds(bad)


def test_evaluate_counts_only_labelled_samples() -> None:
    class Fixed(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x

    heads: dict[str, nn.Module] = {
        "flag": _Columns(0, 1),
        "kind": _Columns(1, 4),
        "size": _Columns(4, 5),
    }
    net = MultiHeadNet(Fixed(), heads)
    nan = float("nan")
    # Outputs: flag logit, 3 class logits, size.
    x = torch.tensor(
        [[1.0, 0.0, 2.0, 0.0, 1.0], [-1.0, 3.0, 0.0, 0.0, 5.0], [2.0, 0.0, 0.0, 1.0, 0.0]]
    )
    y = torch.tensor([[1.0, 1.0, 2.0], [1.0, nan, nan], [nan, 0.0, 3.0]])
    loss_fn = MaskedMultiTaskLoss({name: task.kind for name, task in TASKS.items()})
    metrics, _ = evaluate(net, [(x, y)], TASKS, loss_fn)
    assert metrics["flag"]["accuracy"] == 0.5  # 1 right of 2 labelled
    assert metrics["kind"]["accuracy"] == 0.5  # row 0 right (class 1), row 2 wrong
    assert metrics["size"] == pytest.approx({"mae": 2.0, "rmse": math.sqrt(5)})


class _Columns(nn.Module):
    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, x: Tensor) -> Tensor:
        return x[:, self.start : self.stop]


def test_import_dstmtl_does_not_import_the_study() -> None:
    code = "import sys, dstmtl; print(any(m.startswith('dstmtl.study') for m in sys.modules))"
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert output.strip() == "False"


def test_the_statistics_module_needs_neither_tqdm_nor_matplotlib() -> None:
    code = (
        "import sys; sys.modules['tqdm'] = None; sys.modules['matplotlib'] = None\n"
        "from dstmtl.study.statistics import summarize; from dstmtl.study import weighting\n"
        "print(summarize([1.0, 2.0]).mean)"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert output.strip() == "1.5"


def test_every_method_runs_on_partly_labelled_data(tmp_path: Path) -> None:
    pytest.importorskip("torchjd")
    from dstmtl.study.methods import METHOD_NAMES

    results = study(tmp_path / "all", methods=(*METHOD_NAMES, "dst-labels"), seeds=(0,), epochs=3)
    for name, run in results["runs"].items():
        for task, metrics in run["test"].items():
            assert all(math.isfinite(v) for v in metrics.values()), (name, task)
    stl = results["runs"]["stl/seed0"]
    assert stl["selected_epoch"] == -1  # one model per task, each selected on its own
    assert "delta_m_vs_stl" in results["statistics"]["methods"]["equal"]


def test_batch_sources_are_called_with_the_epoch_and_seed(tmp_path: Path) -> None:
    calls: list[tuple[str, int, int]] = []

    def source(split: TensorDataset, name: str) -> Any:
        def batches(*, epoch: int, seed: int) -> list[tuple[Tensor, Tensor]]:
            calls.append((name, epoch, seed))
            x, y = split.tensors
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + epoch))
            return [(x[order[i : i + 16]], y[order[i : i + 16]]) for i in range(0, len(x), 16)]

        return batches

    results = run_study(
        config(methods=("equal",), seeds=(3,), epochs=2),
        model,
        source(TRAIN, "train"),
        source(VALID, "valid"),
        source(TEST, "test"),
        tmp_path / "o",
        progress=False,
    )
    assert ("train", 0, 3) in calls
    assert ("train", 1, 3) in calls
    run = results["runs"]["equal/seed3"]
    assert all(math.isfinite(v) for m in run["test"].values() for v in m.values())


def test_sessions_and_the_majority_baselines_are_recorded(finished: tuple[Path, Any]) -> None:
    out, results = finished
    (session,) = json.loads((out / "sessions.json").read_text())
    assert session["world_size"] == 1
    assert session["effective_batch_size"] == 16
    assert session["launcher"] == [Path(sys.executable).name]
    assert session["finished"] is not None
    assert session == results["sessions"][0]
    # flag is column 0: the training majority class, scored on the labelled test samples.
    train, test = TRAIN.tensors[1][:, 0], TEST.tensors[1][:, 0]
    train, test = train[~train.isnan()], test[~test.isnan()]
    majority = 1.0 if (train == 1).sum() >= (train == 0).sum() else 0.0
    assert results["baselines"]["majority"] == {
        "flag": pytest.approx(float((test == majority).sum()) / len(test))
    }


def test_dst_keeps_every_task_in_its_last_epoch(tmp_path: Path) -> None:
    results = study(tmp_path / "out", methods=("equal", "dst"), seeds=(0, 1), epochs=8)
    dst = [results["runs"][f"dst/seed{seed}"] for seed in (0, 1)]
    assert any(epoch["dropped"] for run in dst for epoch in run["epochs"])  # it did drop
    for run in dst:
        assert run["epochs"][-1]["dropped"] == []  # the cool-down epoch
        assert set(run["epochs"][-1]["terms"]) == {"task_incompleteness"}
    equal = results["runs"]["equal/seed0"]["epochs"][0]
    assert equal["terms"] == {}
    assert equal["loss_weights"] == {}


def test_a_resume_adds_a_session(tmp_path: Path) -> None:
    out = tmp_path / "out"
    study(out, methods=("equal",), seeds=(0,), epochs=2)
    resumed = run_study(
        config(methods=("equal",), seeds=(0,), epochs=2),
        model,
        TRAIN,
        VALID,
        TEST,
        out,
        resume=True,
        progress=False,
    )
    assert len(resumed["sessions"]) == 2
    assert len(json.loads((out / "sessions.json").read_text())) == 2


def test_overwrite_replaces_a_study_and_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "out"
    study(out, methods=("equal",), seeds=(0,), epochs=1)
    (out / "notes.txt").write_text("mine")
    short = config(methods=("equal",), seeds=(0,), epochs=2)
    run_study(short, model, TRAIN, VALID, TEST, out, overwrite=True, progress=False)
    assert not (out / "notes.txt").exists()
    assert json.loads((out / "study.json").read_text())["config"]["epochs"] == 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("1,2")
    with pytest.raises(StudyError, match="overwrite replaces only a study folder"):
        run_study(short, model, TRAIN, VALID, TEST, other, overwrite=True, progress=False)
    assert (other / "data.csv").read_text() == "1,2"


def test_one_line_per_epoch_is_printed_without_progress_bars(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study(tmp_path / "out", methods=("equal",), seeds=(0,), epochs=2)
    lines = [line for line in capsys.readouterr().out.splitlines() if "epoch" in line]
    assert [line.split(":")[0] for line in lines] == [
        "equal seed 0 epoch 1/2",
        "equal seed 0 epoch 2/2",
    ]
    assert all("train loss" in line and "valid score" in line for line in lines)


def test_the_equal_method_holds_no_scheduler_and_logs_its_mean_losses() -> None:
    from dstmtl.study.methods import Method

    torch.manual_seed(0)
    net = model()
    loss_fn = MaskedMultiTaskLoss({name: task.kind for name, task in TASKS.items()})
    method = Method("equal", net, loss_fn, learning_rate=0.01, seed=0)
    assert method.scheduler is None
    x, y = TRAIN.tensors
    y = y.clone()
    y[:16, 1] = float("nan")  # "kind" unlabelled in the first batch
    seen = []
    for start in (0, 16):
        batch = (x[start : start + 16], y[start : start + 16])
        with torch.no_grad():
            seen.append(loss_fn(net(batch[0]), batch[1]))
        method.step(*batch)
    method.end_epoch()
    expected = [
        float(seen[0][0] + seen[1][0]) / 2,  # both steps labelled
        float(seen[1][1]),  # only the second step had a label
        float(seen[0][2] + seen[1][2]) / 2,
    ]
    assert list(method.epoch_losses.values()) == pytest.approx(expected)
    assert method.gates == dict.fromkeys(TASKS, True)


def test_bfloat16_precision_trains(tmp_path: Path) -> None:
    results = study(
        tmp_path / "out", methods=("equal",), seeds=(0,), epochs=1, precision="bfloat16"
    )
    assert all(math.isfinite(v) for v in results["runs"]["equal/seed0"]["test"]["flag"].values())
    with pytest.raises(StudyError, match="precision must be 'float32' or 'bfloat16'"):
        config(precision="float16")
