"""The whole study, end to end on a tiny generated set, and every bad input of the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence, Sized
from pathlib import Path
from typing import Any
from urllib.error import URLError

import arguments
import celeba_batches
import celeba_config
import celeba_files
import celeba_study
import protocols
import pytest
import run
import torch
import torchvision

from dstmtl import FusedLinearHead, MultiHeadNet

TINY = ["--epochs", "2", "--batch-size", "16", "--image-size", "8", "--no-progress"]
PNG = b"\x89PNG\r\n\x1a\n"
RUNS = ["equal/seed0", "dst/seed0"]


def tiny_demo(out: Path, *extra: str) -> list[str]:
    return ["--demo", "--demo-images", "60", "--out", str(out), *TINY, *extra]


def on_root(root: Path, out: Path, *extra: str) -> list[str]:
    """A study of the CelebA copy ``root`` (the 120-image stand-in), one method, from scratch."""
    argv = ["--root", str(root), "--out", str(out), "--weights", "none", "--methods", "equal"]
    return [*argv, *TINY, "--epochs", "1", *extra]


def without_timings(value: Any) -> Any:
    """The results minus what depends on the clock."""
    if isinstance(value, dict):
        return {
            key: without_timings(item)
            for key, item in value.items()
            if key not in {"seconds", "wall_seconds", "started", "finished"}
        }
    if isinstance(value, list):
        return [without_timings(item) for item in value]
    return value


def metrics(out: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((out / "metrics.json").read_text())
    return loaded


def sessions(out: Path) -> list[dict[str, Any]]:
    loaded: list[dict[str, Any]] = json.loads((out / "sessions.json").read_text())
    return loaded


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("study") / "demo"
    # Four epochs: DST draws its first gates at the end of the second, drops tasks in the
    # third and keeps every task in the last (its cool-down).
    assert run.main(tiny_demo(out, "--epochs", "4")) == 0
    return out


def test_demo_study_writes_every_output(finished_study: Path) -> None:
    results = metrics(finished_study)
    tasks = list(results["config"]["tasks"])
    assert tasks == list(celeba_files.DEFAULT_ATTRIBUTES)
    assert list(results["runs"]) == RUNS
    for name, entry in results["runs"].items():
        assert f"{entry['method']}/seed{entry['seed']}" == name
        assert len(entry["epochs"]) == 4
        assert set(entry["test"]) == set(tasks)
        for scores in entry["test"].values():
            assert set(scores) == {"accuracy", "balanced_accuracy", "f1"}
            assert all(0.0 <= value <= 1.0 for value in scores.values())
        assert 0 <= entry["selected_epoch"] < 4
    dst_epoch = results["runs"]["dst/seed0"]["epochs"][1]
    assert set(dst_epoch["terms"]) == {"task_incompleteness"}
    assert all(0.0 <= p <= 1.0 for p in dst_epoch["keep_probabilities"].values())
    # What decides the numbers is in the config, the description in info.
    extra = results["config"]["extra"]
    assert extra["image_size"] == 8
    assert extra["crop"] == 178
    assert extra["weights"] is None
    assert set(extra["data_fingerprint"]) == {"list_attr_celeba.txt", "list_eval_partition.txt"}
    info = results["info"]
    assert info["network_depth"] == dict.fromkeys(tasks, 18)
    assert set(info["positive_rate"]) == {"train", "valid", "test"}
    assert info["images"] == {"train": 42, "valid": 9, "test": 9}
    (session,) = sessions(finished_study)
    assert session["world_size"] == 1
    assert session["effective_batch_size"] == 16
    # The script and its arguments, not the calling process's (pytest's) command line.
    assert Path(session["argv"][0]).name == "run.py"
    assert "--out" in session["argv"]
    assert "load_at_start" in session
    assert session["load_at_end"] is not None or not hasattr(os, "getloadavg")
    # A task counts as dropped in the epoch its gate was off, never by a draw that no epoch
    # applies: the last epoch (DST's cool-down) drops nothing.
    dst = results["runs"]["dst/seed0"]
    for before, record in zip(dst["epochs"], dst["epochs"][1:], strict=False):
        assert record["dropped"] == [task for task, kept in before["gates"].items() if not kept]
    assert dst["epochs"][0]["dropped"] == dst["epochs"][-1]["dropped"] == []
    drops = [record["epoch"] for record in dst["epochs"] if record["dropped"]]
    assert dst["dropping_epochs"] == len(drops)
    assert dst["first_drop_epoch"] == (drops[0] if drops else None)
    assert dst["selected_before_first_drop"] == (not drops or dst["selected_epoch"] < drops[0])

    report = (finished_study / "results.md").read_text()
    for task in tasks:
        assert task in report
    assert "## DST drops" in report
    pngs = sorted(finished_study.glob("*.png"))
    assert {p.name for p in pngs} >= {
        "scores.png",
        "training_loss_equal-seed0.png",
        "training_loss_dst-seed0.png",
        "keep_probabilities_dst-seed0.png",
    }
    assert all(p.read_bytes().startswith(PNG) for p in pngs)
    assert not (finished_study / "demo_data").exists()  # the data lives in the cache folder


def test_checkpoints_load_with_weights_only(finished_study: Path) -> None:
    tasks = list(metrics(finished_study)["config"]["tasks"])
    for run_name in RUNS:
        method = run_name.split("/")[0]
        state = torch.load(finished_study / "checkpoints" / f"{method}-seed0.pt", weights_only=True)
        assert set(state) == {"result", "model"}
        assert state["result"]["method"] == method
        model = MultiHeadNet.from_torchvision("resnet18", tasks)
        head = model.heads["Male"]
        assert isinstance(head, FusedLinearHead)
        untrained = head.weight.detach().clone()
        model.load_state_dict(state["model"])  # strict: a whole trained MultiHeadNet state
        assert not torch.equal(head.weight, untrained)
    assert not list(finished_study.rglob("*.tmp"))


def test_resumed_study_equals_an_uninterrupted_one(
    finished_study: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    original = celeba_batches.celeba_batches
    last_epochs = 0

    def interrupted_in_dsts_last_epoch(*args: Any, **kwargs: Any) -> dict[str, Any]:
        sources = original(*args, **kwargs)
        train = sources["train"]

        def source(*, epoch: int, seed: int, **shard: int) -> Iterable[Any]:
            nonlocal last_epochs
            if epoch == 3:
                last_epochs += 1
                if last_epochs == 2:  # equal has finished; dst has drawn its gates
                    raise KeyboardInterrupt
            batches: Iterable[Any] = train(epoch=epoch, seed=seed, **shard)
            return batches

        return {**sources, "train": source}

    # Started without --out, as a user would: the study picks its folder under ./runs.
    monkeypatch.chdir(tmp_path)
    argv = ["--demo", "--demo-images", "60", *TINY, "--epochs", "4"]
    monkeypatch.setattr(celeba_study, "celeba_batches", interrupted_in_dsts_last_epoch)
    assert run.main(argv) == 130
    monkeypatch.setattr(celeba_study, "celeba_batches", original)
    (out,) = (tmp_path / "runs").iterdir()
    resume_hint = f"run the same command with --resume --out {out.relative_to(tmp_path)}"
    assert resume_hint in capsys.readouterr().err
    interrupted = torch.load(out / "checkpoints" / "dst-seed0.pt", weights_only=True)
    assert len(interrupted["history"]) == 3
    assert interrupted["history"][-1]["dropped"]  # DST dropped a task in its last epoch
    assert run.main([*argv, "--resume", "--out", str(out)]) == 0

    resumed = metrics(out)
    assert without_timings(resumed["runs"]) == without_timings(metrics(finished_study)["runs"])
    # The record keeps the first start and lists the resume.
    assert len(sessions(out)) == 2


def test_options_that_do_not_change_the_numbers_may_change_on_resume(
    finished_study: Path, tmp_path: Path
) -> None:
    resumed = tmp_path / "resumed"
    shutil.copytree(finished_study, resumed)
    changed = ["--workers", "1", "--cache-dir", str(tmp_path / "other"), "--device", "cpu"]
    # Another cache folder: the demo data is generated there again, the same files.
    assert run.main(tiny_demo(resumed, "--epochs", "4", "--resume", *changed)) == 0
    before = without_timings(metrics(finished_study)["runs"])
    assert without_timings(metrics(resumed)["runs"]) == before


def test_all_five_terms_as_an_extra_run(tmp_path: Path) -> None:
    out = tmp_path / "all"
    argv = tiny_demo(out, "--methods", "dst", "--dst-metrics", "all", "--epochs", "3")
    assert run.main([*argv, "--terms-epoch", "2"]) == 0
    report = (out / "results.md").read_text()
    assert "Terms at epoch 2:" in report  # the chosen epoch's, not the last one's
    assert "Terms at epoch 3:" not in report
    results = metrics(out)
    assert list(results["runs"]) == ["dst/seed0", "dst-all/seed0"]
    terms = results["runs"]["dst-all/seed0"]["epochs"][1]["terms"]
    assert set(terms) == {
        "network_depth",
        "label_count",
        "task_incompleteness",
        "task_stagnancy",
        "constant",
    }
    assert set(terms["network_depth"].values()) == {1.0}  # every head on the same backbone
    probabilities = results["runs"]["dst-all/seed0"]["epochs"][1]["keep_probabilities"]
    assert all(p >= 0.2 - 1e-9 for p in probabilities.values())


def test_the_famo40_protocol_runs_its_network_on_whole_unnormalised_images(
    tmp_path: Path,
) -> None:
    out = tmp_path / "famo40"
    argv = tiny_demo(out, "--protocol", "famo40", "--methods", "equal", "--epochs", "1")
    assert run.main([*argv, "--attributes", "Male,Young"]) == 0
    results = metrics(out)
    extra = results["config"]["extra"]
    assert (extra["protocol"], extra["model"], extra["crop"]) == ("famo40", "famo_cnn", None)
    assert (extra["normalise"], extra["flip"]) == (False, False)
    assert {task: spec["metric"] for task, spec in results["config"]["tasks"].items()} == {
        "Male": "f1",
        "Young": "f1",
    }
    # Its reference, stl, is not run: the first method is.
    assert results["config"]["reference"] == "equal"
    assert results["info"]["network_depth"] == {"Male": 10, "Young": 10}


def demo_sources(
    demo_root: Path, cache_dir: Path, attributes: Sequence[str], **settings: Any
) -> dict[str, Callable[..., Iterable[Any]]]:
    """The example's batch sources on the generated stand-in at 8 px, on the CPU, without
    worker processes; ``settings`` override ``celeba_batches``' arguments."""
    files = celeba_files.locate(demo_root)
    splits = celeba_files.load_splits(files, attributes)
    chosen: dict[str, Any] = {
        "crop": 178,
        "image_size": 8,
        "batch_size": 16,
        "device": torch.device("cpu"),
        "cache_dir": cache_dir,
        "workers": 0,
        "progress": False,
        **settings,
    }
    return celeba_batches.celeba_batches(splits, files.image_dir, **chosen)


def test_the_sources_prepare_as_the_protocol_says(demo_root: Path, tmp_path: Path) -> None:
    def first_batch(**preparation: Any) -> torch.Tensor:
        train = demo_sources(demo_root, tmp_path, ["Male"], batch_size=84, **preparation)["train"]
        first: tuple[torch.Tensor, torch.Tensor] = next(iter(train(epoch=0, seed=0)))
        return first[0]

    plain = first_batch(crop=None, flip=False, normalise=False)
    assert plain.min() >= 0  # the pixel values over 255
    assert plain.max() <= 1
    # The same images, mirrored or not: the flips are the only difference.
    flipped = first_batch(crop=None, flip=True, normalise=False)
    mirrored = [not torch.equal(a, b) for a, b in zip(plain, flipped, strict=True)]
    assert 0 < sum(mirrored) < len(mirrored)
    assert all(
        torch.equal(b, a.flip(-1)) if m else torch.equal(a, b)
        for a, b, m in zip(plain, flipped, mirrored, strict=True)
    )
    assert first_batch(crop=None, flip=False, normalise=True).min() < 0  # standardised
    assert not torch.equal(first_batch(crop=100, flip=False, normalise=False), plain)


def test_methods_compared_in_one_harness(tmp_path: Path) -> None:
    pytest.importorskip("torchjd")
    out = tmp_path / "compare"
    methods = ["equal", "dst", "famo", "dst+upgrad"]
    argv = tiny_demo(out, "--methods", ",".join(methods), "--epochs", "3")
    assert run.main([*argv, "--attributes", "Male,Smiling,Young"]) == 0
    results = metrics(out)
    assert list(results["runs"]) == [f"{name}/seed0" for name in methods]
    # Same seed, data order and model: the first epoch of equal and dst is the same run.
    first = {name: run_["epochs"][0]["train_loss"] for name, run_ in results["runs"].items()}
    assert first["dst/seed0"] == first["equal/seed0"]
    # DST drew gates after its warm-up; the plain methods record no terms.
    assert results["runs"]["dst+upgrad/seed0"]["epochs"][1]["terms"]
    assert results["runs"]["famo/seed0"]["epochs"][1]["terms"] == {}
    report = (out / "results.md").read_text()
    for name in methods:
        assert f"| {name} " in report


def test_seeds_run_every_method_with_each_seed(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    argv = ["--root", str(demo_root), "--out", str(out), "--weights", "none", *TINY]
    fails([*argv, "--seeds", "a,b"], capsys, "--seeds", "do not parse")
    assert run.main([*argv, "--seeds", "2", "--epochs", "1", "--attributes", "Male,Young"]) == 0
    results = metrics(out)
    assert list(results["runs"]) == ["equal/seed0", "dst/seed0", "equal/seed1", "dst/seed1"]
    assert results["config"]["seeds"] == [0, 1]
    first = {name: run_["epochs"][0]["train_loss"] for name, run_ in results["runs"].items()}
    assert first["dst/seed0"] == first["equal/seed0"]  # same seed: same weights and data
    assert first["equal/seed1"] != first["equal/seed0"]


def test_each_epoch_prints_a_line_without_progress_bars(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run.main(on_root(demo_root, tmp_path / "o", "--epochs", "2")) == 0
    printed = capsys.readouterr().out
    for epoch in (1, 2):
        assert f"epoch {epoch}/2" in printed
    assert printed.count("train loss") == 2
    assert f"Report: {tmp_path / 'o' / 'results.md'}" in printed


# ---------------------------------------------------------------------------- settings


def settings(*argv: str) -> celeba_config.CelebARun:
    return celeba_config.CelebARun.from_args(arguments.parser().parse_args(list(argv)))


def test_the_protocol_gives_the_defaults_and_options_override_them() -> None:
    study = protocols.protocol("study")
    full = settings("--root", "/data/celeba")
    assert full.protocol == study
    assert full.attributes == celeba_files.DEFAULT_ATTRIBUTES == study.attributes
    assert full.methods == study.methods == ("equal", "dst")
    assert (full.epochs, full.batch_size, full.image_size) == (5, 256, 128)
    assert (full.learning_rate, full.weights, full.seeds) == (1e-3, "DEFAULT", (0,))
    given = settings("--root", "r", "--epochs", "7", "--lr", "0.01", "--attributes", "young")
    assert (given.epochs, given.learning_rate, given.attributes) == (7, 0.01, ("Young",))
    demo = settings("--demo")
    assert (demo.epochs, demo.batch_size, demo.image_size, demo.weights) == (5, 32, 64, None)
    assert demo.data_root.parent == demo.cache_dir
    assert settings("--demo", "--image-size", "16").image_size == 16


def test_the_study_config_holds_what_decides_the_numbers_and_only_that() -> None:
    run_a = settings("--root", "r", "--seeds", "0,4", "--methods", "dst,uw")
    config = run_a.study_config({"list_attr_celeba.txt": "abc"})
    assert config.seeds == (0, 4)
    assert config.reference == "dst"  # without the protocol's reference (equal), the first
    assert settings("--root", "r").study_config({}).reference == "equal"
    assert set(config.tasks) == set(celeba_files.DEFAULT_ATTRIBUTES)
    assert config.extra["data_fingerprint"] == {"list_attr_celeba.txt": "abc"}
    # The device, the workers, the cache folder and the bars change nothing in the config.
    run_b = settings(
        "--root", "r", "--seeds", "0,4", "--methods", "dst,uw", "--device", "cpu",
        "--workers", "3", "--cache-dir", "elsewhere", "--no-progress", "--compile",
    )  # fmt: skip
    assert run_b.study_config({"list_attr_celeba.txt": "abc"}) == config
    assert settings("--root", "r", "--no-cache").study_config({}).extra["input"] == "jpeg"


@pytest.mark.parametrize("protocol", list(protocols.PROTOCOLS))
def test_the_default_epochs_leave_dst_epochs_to_drop_in(protocol: str) -> None:
    # DST's first draw is made at the end of epoch 1 and acts from epoch 2 on; the last
    # epoch keeps every task (its cool-down): at least two epochs that drop tasks.
    for epochs in (
        settings("--root", "r", "--protocol", protocol).epochs,
        celeba_config.DEMO.epochs,
    ):
        assert epochs - 3 >= 2


def test_the_dst_metric_names_are_dstmtls_terms() -> None:
    from dstmtl.study.methods import DST_TERMS

    assert arguments.DST_METRICS == DST_TERMS
    assert celeba_config.dst_method("labels, constant") == "dst-labels+constant"
    assert celeba_config.dst_method("all") == "dst-all"
    assert settings("--root", "r", "--dst-metrics", "depth").methods == (
        "equal",
        "dst",
        "dst-depth",
    )


# ---------------------------------------------------------------------------- bad input


def fails(argv: list[str], capsys: pytest.CaptureFixture[str], *patterns: str) -> str:
    assert run.main(argv) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ")
    assert "Traceback" not in message
    assert len(message.strip().splitlines()) == 1 or "accepted layouts" in message.lower(), message
    for pattern in patterns:
        assert pattern in message, (pattern, message)
    return message


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--epochs", "0", "must be at least 1, got 0"),
        ("--batch-size", "-4", "must be at least 1, got -4"),
        ("--image-size", "0", "must be at least 1, got 0"),
        ("--lr", "-1", "must be a finite number above 0, got -1"),
        ("--lr", "nan", "must be a finite number above 0, got nan"),
        ("--workers", "-1", "must be 0 or more, got -1"),
        ("--protocol", "famo", "invalid choice: 'famo'"),
    ],
)
def test_bad_numbers_are_refused_before_any_work(
    option: str, value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run.main(tiny_demo(tmp_path / "o", option, value))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: argument {option}: {message}")
    assert len(error.strip().splitlines()) == 1, error  # no usage block first
    assert not (tmp_path / "o").exists()


def test_resume_needs_the_study_folder(capsys: pytest.CaptureFixture[str]) -> None:
    fails(["--demo", "--resume", *TINY], capsys, "--resume needs --out")


def test_missing_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fails(["--out", str(tmp_path / "o"), *TINY], capsys, "--root")
    fails(on_root(tmp_path / "nowhere", tmp_path / "p"), capsys, "nowhere")


def test_missing_files_name_the_file_and_the_layouts(
    demo_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (demo_copy / "list_eval_partition.txt").unlink()
    fails(on_root(demo_copy, tmp_path / "o"), capsys, "list_eval_partition.txt", "kaggle")


def test_unknown_attribute_lists_the_valid_ones(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = on_root(demo_root, tmp_path / "o", "--attributes", "Male,Smilng")
    fails(argv, capsys, "Smilng", "Wearing_Necktie")


def test_unknown_method_lists_the_valid_ones(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fails(
        on_root(demo_root, tmp_path / "o", "--methods", "equal,gradnorm"),
        capsys,
        "gradnorm",
        "upgrad",
        "famo",
    )
    fails(
        on_root(demo_root, tmp_path / "o", "--dst-metrics", "depth,x"),
        capsys,
        "dst-depth+x",
        "incompleteness",
    )
    assert not (tmp_path / "o").exists()


def test_a_missing_extra_names_it(
    demo_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib

    real_import = importlib.import_module

    def without_torchjd(name: str, package: str | None = None) -> Any:
        if name.startswith("torchjd"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, package)

    monkeypatch.setattr(importlib, "import_module", without_torchjd)
    argv = on_root(demo_root, tmp_path / "o", "--methods", "equal,upgrad")
    fails(argv, capsys, "dstmtl[baselines]", "upgrad")
    assert not (tmp_path / "o").exists()  # refused before "equal" trained, not after


def test_an_out_folder_with_another_study_is_refused(
    finished_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (finished_study / "study.json").read_text()
    fails(tiny_demo(finished_study, "--epochs", "4"), capsys, str(finished_study))
    fails(tiny_demo(tmp_path / "empty", "--resume"), capsys, "no study to resume")
    changed = tiny_demo(finished_study, "--epochs", "4", "--resume", "--lr", "0.5")
    fails(changed, capsys, "learning_rate: was 0.001, now 0.5")
    assert (finished_study / "study.json").read_text() == before


def test_overwrite_replaces_a_study_and_deletes_nothing_else(
    finished_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "list_attr_celeba.txt").write_text("precious")
    fails(tiny_demo(data, "--overwrite"), capsys, str(data))
    assert (data / "list_attr_celeba.txt").read_text() == "precious"

    replaced = tmp_path / "replaced"
    shutil.copytree(finished_study, replaced)
    assert run.main(tiny_demo(replaced, "--overwrite", "--methods", "equal", "--epochs", "1")) == 0
    assert list(metrics(replaced)["runs"]) == ["equal/seed0"]
    assert sorted(path.name for path in (replaced / "checkpoints").iterdir()) == ["equal-seed0.pt"]


def test_a_study_of_another_format_is_not_resumed(
    finished_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    older = tmp_path / "older"
    shutil.copytree(finished_study, older)
    saved = json.loads((older / "study.json").read_text())
    saved["format"] = 0
    (older / "study.json").write_text(json.dumps(saved))
    fails(tiny_demo(older, "--resume", "--epochs", "4"), capsys, "format")


def test_missing_weights_say_where_to_put_them(
    demo_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    argv = ["--root", str(demo_root), "--out", str(tmp_path / "o"), *TINY]
    fails(argv, capsys, str(tmp_path / "torch" / "hub" / "checkpoints"), "--weights none")
    assert not (tmp_path / "o").exists()


def test_download_failure_is_explained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Failed to download (no network)")

    monkeypatch.setattr(torchvision.datasets, "CelebA", offline)
    argv = ["--root", str(tmp_path / "data"), "--download", "--out", str(tmp_path / "o"), *TINY]
    fails(argv, capsys, "could not download CelebA", "--root")


def test_mismatched_partition_file(
    demo_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    partition = demo_copy / "list_eval_partition.txt"
    partition.write_text(partition.read_text().replace("000003.jpg", "999999.jpg"))
    fails(on_root(demo_copy, tmp_path / "o"), capsys, "999999.jpg")


def test_a_start_stopped_by_missing_data_leaves_no_study(
    demo_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    partition = demo_copy / "list_eval_partition.txt"
    partition_text = partition.read_text()
    partition.unlink()
    out = tmp_path / "study"
    argv = on_root(demo_copy, out)
    fails(argv, capsys, "list_eval_partition.txt")
    assert not out.exists()
    fails(on_root(tmp_path / "nowhere", out), capsys, "nowhere")
    assert not out.exists()

    partition.write_text(partition_text)
    # The same command, once the data is fixed: not refused as "another study".
    assert run.main(argv) == 0
    assert len(sessions(out)) == 1


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
def test_a_start_stopped_by_a_broken_image_leaves_no_study(
    cache: bool, demo_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = celeba_files.locate(demo_copy)
    test_split = celeba_files.load_splits(files, celeba_files.DEFAULT_ATTRIBUTES)["test"]
    # The last image of the last split: the check must reach it before the study starts.
    image = test_split.image_paths(files.image_dir)[-1]
    original = image.read_bytes()
    image.write_bytes(original[:300])  # truncated
    out = tmp_path / "study"
    argv = on_root(demo_copy, out, "--cache-dir", str(tmp_path / "cache"), "--workers", "0")
    argv += [] if cache else ["--no-cache"]
    message = fails(argv, capsys, f"Cannot decode image {image}")
    assert "worker" not in message
    assert not out.exists()
    image.write_bytes(original)
    assert run.main(argv) == 0
    assert len(sessions(out)) == 1


def test_a_missing_image_is_named_before_any_decoding(
    demo_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = celeba_files.locate(demo_copy)
    valid = celeba_files.load_splits(files, celeba_files.DEFAULT_ATTRIBUTES)["valid"]
    missing = valid.image_paths(files.image_dir)[0]
    missing.unlink()
    for option in ([], ["--no-cache"]):
        out = tmp_path / f"o{len(option)}"
        fails(on_root(demo_copy, out, *option), capsys, "1 of ", str(missing))
        assert not out.exists()


@pytest.mark.parametrize("parent_is", ["file", "sys"])
def test_an_out_folder_that_cannot_be_created_is_a_one_line_error(
    parent_is: str, demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "out" if parent_is == "file" else Path("/sys/dstmtl-study-test")
    if parent_is == "sys" and not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    fails(on_root(demo_root, out, "--cache-dir", str(tmp_path / "cache")), capsys, str(out))


def test_resume_refuses_changed_labels(
    demo_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    argv = on_root(demo_copy, out)
    assert run.main(argv) == 0
    attributes = demo_copy / "list_attr_celeba.txt"
    lines = attributes.read_text().splitlines()
    # Flip the first attribute column of every image (rows after the count and header).
    flipped = [
        line
        if i < 2
        else " ".join([line.split()[0], str(-int(line.split()[1])), *line.split()[2:]])
        for i, line in enumerate(lines)
    ]
    attributes.write_text("\n".join(flipped) + "\n")
    fails(
        [*argv, "--resume"],
        capsys,
        "resume needs the configuration of the interrupted study; "
        "extra.data_fingerprint.list_attr_celeba.txt: was '",
    )


# ---------------------------------------------------------------- data and processes


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
def test_ranks_share_the_training_set_without_repeating_an_image(
    demo_root: Path, tmp_path: Path, cache: bool
) -> None:
    # 84 training images among 5 ranks: each takes 16 and four sit out the epoch, as with
    # DistributedSampler(drop_last=True), rather than some ranks seeing an image twice.
    attributes = celeba_files.DEFAULT_ATTRIBUTES
    train = demo_sources(demo_root, tmp_path, attributes, batch_size=6, cache=cache)["train"]
    assert len(celeba_files.load_splits(celeba_files.locate(demo_root), attributes)["train"]) == 84
    seen: list[bytes] = []
    for rank in range(5):
        batches = train(epoch=0, seed=0, rank=rank, world_size=5)
        assert isinstance(batches, Sized)
        images = torch.cat([images for images, _ in batches])
        assert images.dtype == torch.float32  # prepared: normalised floats
        assert len(images) == 16
        assert len(batches) == 3
        # Flipped or not, an image is one of two arrays: keep the unflipped form's bytes.
        seen += [min(i.numpy().tobytes(), i.flip(-1).numpy().tobytes()) for i in images]
    assert len(set(seen)) == 80


def test_the_sources_depend_on_the_seed_and_epoch_only(demo_root: Path, tmp_path: Path) -> None:
    def sources() -> dict[str, Callable[..., Iterable[Any]]]:
        return demo_sources(demo_root, tmp_path, celeba_files.DEFAULT_ATTRIBUTES)

    def epoch(source: Callable[..., Iterable[Any]], **when: int) -> list[torch.Tensor]:
        return [
            torch.cat([images.flatten(), labels.flatten()]) for images, labels in source(**when)
        ]

    first, second = sources(), sources()
    for when in ({"epoch": 0, "seed": 0}, {"epoch": 1, "seed": 0}, {"epoch": 0, "seed": 1}):
        a, b = epoch(first["train"], **when), epoch(second["train"], **when)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(
        epoch(first["train"], epoch=0, seed=0)[0], epoch(first["train"], epoch=1, seed=0)[0]
    )
    # Evaluation neither shuffles nor flips: the same batches whatever the epoch and seed.
    valid = [epoch(first["valid"], epoch=e, seed=s) for e, s in ((0, 0), (3, 2))]
    assert all(torch.equal(x, y) for x, y in zip(*valid, strict=True))


def test_torchrun_with_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    script = Path(run.__file__)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    completed = subprocess.run(
        [*command, str(script), *tiny_demo(out, "--device", "cpu")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("Report:") == 1  # written and reported once, by rank 0
    results = metrics(out)
    assert list(results["runs"]) == RUNS
    assert all(0 <= s["accuracy"] <= 1 for s in results["runs"]["dst/seed0"]["test"].values())
    # Its own record reproduces it: the launcher, the processes and the batch per step.
    (session,) = sessions(out)
    assert session["launcher"][0] == "torchrun"
    assert "--nproc-per-node=2" in session["launcher"]
    assert session["world_size"] == 2
    assert session["effective_batch_size"] == 32


def test_the_dataloader_fallback_runs_the_study(tmp_path: Path) -> None:
    out = tmp_path / "jpeg"
    argv = tiny_demo(out, "--no-cache", "--workers", "0", "--methods", "equal", "--epochs", "1")
    assert run.main(argv) == 0
    scores = metrics(out)["runs"]["equal/seed0"]["test"]
    assert len(scores) == 8
    assert all(0.0 <= s["accuracy"] <= 1.0 for s in scores.values())


# ------------------------------------------------------------------------- the script


def _run_script(argv: list[str], missing: str) -> subprocess.CompletedProcess[str]:
    """``run.py argv`` in a fresh interpreter where ``missing`` cannot be imported."""
    script = Path(run.__file__)
    # None in sys.modules makes the import raise ModuleNotFoundError, as if not installed.
    code = (
        f"import runpy, sys; sys.modules[{missing!r}] = None; sys.argv = ['run.py', *{argv!r}]; "
        f"runpy.run_path({str(script)!r}, run_name='__main__')"
    )
    # run_path, unlike `python run.py`, does not put the script's folder on the path.
    path = os.pathsep.join(filter(None, [str(script.parent), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": path},
    )


def test_help_answers_without_importing_torch() -> None:
    completed = _run_script(["--help"], "torch")
    assert completed.returncode == 0, completed.stderr
    assert "--seeds" in completed.stdout
    assert "--protocol {study,famo40}" in completed.stdout
    assert "--terms-epoch" in completed.stdout
    refused = _run_script(["--epochs", "0"], "torch")
    assert refused.returncode == 2
    assert "must be at least 1" in refused.stderr


@pytest.mark.parametrize("module", ["matplotlib", "tqdm", "dstmtl"])
def test_a_missing_install_step_is_named(module: str, tmp_path: Path) -> None:
    completed = _run_script(["--demo", "--out", str(tmp_path / "o")], module)
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert f"needs {module!r}, which is not installed" in completed.stderr
    assert "pip install -e '.[examples]'" in completed.stderr
    assert not (tmp_path / "o").exists()


def test_no_example_module_shadows_an_installed_package() -> None:
    folder = Path(run.__file__).parent
    names = {path.stem for path in folder.glob("*.py")}
    assert not names & {
        "study",
        "methods",
        "records",
        "parallel",
        "atomic",
        "pipeline",
        "reporting",
    }
