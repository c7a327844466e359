"""The whole study, end to end on a tiny generated set, and every bad input of the CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.error import URLError

import arguments
import celeba_files
import pipeline
import pytest
import run
import study
import torch
import torch.distributed as dist
import torchvision
from torch.multiprocessing.spawn import spawn

from dstmtl import FusedLinearHead, MultiHeadNet

TINY = ["--epochs", "2", "--batch-size", "16", "--image-size", "32", "--no-progress"]
PNG = b"\x89PNG\r\n\x1a\n"


def tiny_demo(out: Path, *extra: str) -> list[str]:
    return ["--demo", "--demo-images", "120", "--out", str(out), *TINY, *extra]


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


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("study") / "demo"
    # Three epochs: DST draws its first gates at the end of the second.
    assert run.main(tiny_demo(out, "--epochs", "3")) == 0
    return out


def test_demo_study_writes_every_output(finished_study: Path) -> None:
    results = json.loads((finished_study / "metrics.json").read_text())
    tasks = results["study"]["attributes"]
    assert len(tasks) == 8
    assert list(results["runs"]) == ["equal", "dst"]
    for name, entry in results["runs"].items():
        assert entry["method"] == name
        assert len(entry["epochs"]) == 3
        test = entry["test"]
        for score in ("accuracy", "balanced_accuracy", "f1"):
            assert set(test[score]) == set(tasks)
            assert all(0.0 <= value <= 1.0 for value in test[score].values())
        assert test["mean_accuracy"] == pytest.approx(sum(test["accuracy"].values()) / 8)
        assert 0 <= entry["selected_epoch"] < 3
    dst_epoch = results["runs"]["dst"]["epochs"][1]
    assert set(dst_epoch["terms"]) == {"task_incompleteness"}
    assert all(0.0 <= p <= 1.0 for p in dst_epoch["keep_probabilities"].values())
    assert results["study"]["command"]
    assert results["study"]["dstmtl_version"]

    report = (finished_study / "results.md").read_text()
    for task in tasks:
        assert task in report
    pngs = sorted(finished_study.glob("*.png"))
    assert {p.name for p in pngs} >= {
        "accuracy.png",
        "training_loss_equal.png",
        "training_loss_dst.png",
    }
    assert all(p.read_bytes().startswith(PNG) for p in pngs)


def test_checkpoints_load_with_weights_only(finished_study: Path) -> None:
    tasks = json.loads((finished_study / "metrics.json").read_text())["study"]["attributes"]
    for method in ("equal", "dst"):
        state = torch.load(finished_study / "checkpoints" / f"{method}.pt", weights_only=True)
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
    saves = 0
    original = study.save_checkpoint

    def crash_in_dst_after_its_gates(
        path: Path, state: dict[str, Any], settings: study.Settings
    ) -> None:
        nonlocal saves
        original(path, state, settings)
        saves += 1
        if saves == 6:  # equal: 3 epochs + its result; dst: 2 epochs, gates drawn
            raise KeyboardInterrupt

    # Started without --out, as a user would: the study picks its folder under ./runs.
    monkeypatch.chdir(tmp_path)
    argv = ["--demo", "--demo-images", "120", *TINY, "--epochs", "3"]
    monkeypatch.setattr(study, "save_checkpoint", crash_in_dst_after_its_gates)
    assert run.main(argv) == 130
    assert saves == 6
    monkeypatch.setattr(study, "save_checkpoint", original)
    (out,) = (tmp_path / "runs").iterdir()
    resume_hint = f"run the same command with --resume --out {out.relative_to(tmp_path)}"
    assert resume_hint in capsys.readouterr().err
    interrupted = torch.load(out / "checkpoints" / "dst.pt", weights_only=True)
    assert not all(interrupted["history"][-1]["gates"].values())  # a task was dropped
    assert run.main([*argv, "--resume", "--out", str(out)]) == 0

    resumed = json.loads((out / "metrics.json").read_text())
    uninterrupted = json.loads((finished_study / "metrics.json").read_text())
    assert without_timings(resumed["runs"]) == without_timings(uninterrupted["runs"])
    # The record keeps the first start and lists the resume.
    assert "--resume" not in resumed["study"]["argv"]
    assert [session["argv"][-3:] for session in resumed["study"]["resumed"]] == [
        ["--resume", "--out", str(out)]
    ]
    assert resumed["study"]["started"] <= resumed["study"]["resumed"][0]["started"]


def test_all_five_terms_as_an_extra_run(tmp_path: Path) -> None:
    out = tmp_path / "all"
    assert run.main(tiny_demo(out, "--methods", "dst", "--dst-metrics", "all")) == 0
    results = json.loads((out / "metrics.json").read_text())
    assert list(results["runs"]) == ["dst", "dst-all"]
    terms = results["runs"]["dst-all"]["epochs"][1]["terms"]
    assert set(terms) == {
        "network_depth",
        "label_count",
        "task_incompleteness",
        "task_stagnancy",
        "constant",
    }
    assert set(terms["network_depth"].values()) == {1.0}  # every head on the same backbone
    probabilities = results["runs"]["dst-all"]["epochs"][1]["keep_probabilities"]
    assert all(p >= 0.2 - 1e-9 for p in probabilities.values())


# ---------------------------------------------------------------------------- bad input


def fails(argv: list[str], capsys: pytest.CaptureFixture[str], *patterns: str) -> None:
    assert run.main(argv) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ")
    assert "Traceback" not in message
    for pattern in patterns:
        assert pattern in message, (pattern, message)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--epochs", "0", "must be at least 1, got 0"),
        ("--batch-size", "-4", "must be at least 1, got -4"),
        ("--image-size", "0", "must be at least 1, got 0"),
        ("--lr", "-1", "must be a finite number above 0, got -1"),
        ("--lr", "nan", "must be a finite number above 0, got nan"),
        ("--terms-epoch", "-1", "must be 0 or more, got -1"),
    ],
)
def test_bad_numbers_are_refused_before_any_work(
    option: str, value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run.main(tiny_demo(tmp_path / "o", option, value))
    assert exit_info.value.code == 2
    assert f"argument {option}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_resume_needs_the_study_folder(capsys: pytest.CaptureFixture[str]) -> None:
    fails(["--demo", "--resume", *TINY], capsys, "--resume needs --out")


def test_missing_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fails(["--out", str(tmp_path / "o"), *TINY], capsys, "--root")
    fails(
        ["--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "p"), *TINY],
        capsys,
        "nowhere",
    )


def test_missing_files_name_the_file_and_the_layouts(
    demo_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = demo_copy
    (root / "list_eval_partition.txt").unlink()
    argv = ["--root", str(root), "--out", str(tmp_path / "o"), "--weights", "none", *TINY]
    fails(argv, capsys, "list_eval_partition.txt", "kaggle")


def test_unknown_attribute_lists_the_valid_ones(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--root", str(demo_root), "--out", str(tmp_path / "o"), "--attributes", "Male,Smilng"]
    fails(argv, capsys, "Smilng", "Wearing_Necktie")


def test_unknown_method_lists_the_valid_ones(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--root", str(demo_root), "--out", str(tmp_path / "o"), "--methods", "equal,gradnorm"]
    fails(argv, capsys, "gradnorm", "upgrad", "famo")


def test_an_out_folder_with_another_study_is_refused(
    finished_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fails(tiny_demo(finished_study), capsys, "another study", "--resume", "--overwrite")
    fails(tiny_demo(tmp_path / "empty", "--resume"), capsys, "no study to resume")
    changed = tiny_demo(finished_study, "--resume", "--seed", "3")
    fails(changed, capsys, "seed: was 0, now 3", "--overwrite")


def test_overwrite_deletes_only_a_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "list_attr_celeba.txt").write_text("precious")
    fails(tiny_demo(data, "--overwrite"), capsys, "not a study", "another --out")
    assert (data / "list_attr_celeba.txt").read_text() == "precious"


def test_a_study_of_an_older_format_is_not_resumed(
    finished_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    older = tmp_path / "older"
    shutil.copytree(finished_study, older)
    config = json.loads((older / "study.json").read_text())
    del config["study_format"]  # as written before the format was recorded
    (older / "study.json").write_text(json.dumps(config))
    fails(tiny_demo(older, "--resume", "--epochs", "3"), capsys, "study_format: was None, now 6")


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


def test_download_failure_is_explained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Failed to download (no network)")

    monkeypatch.setattr(torchvision.datasets, "CelebA", offline)
    argv = ["--root", str(tmp_path / "data"), "--download", "--out", str(tmp_path / "o"), *TINY]
    fails(argv, capsys, "could not download CelebA", "--root")


def test_an_unreadable_jpeg_is_named(
    demo_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = demo_copy
    broken = root / "img_align_celeba" / "000007.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    argv = ["--root", str(root), "--out", str(tmp_path / "o"), "--weights", "none", *TINY]
    fails(argv, capsys, "000007.jpg")


def test_mismatched_partition_file(
    demo_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = demo_copy
    partition = root / "list_eval_partition.txt"
    partition.write_text(partition.read_text().replace("000003.jpg", "999999.jpg"))
    argv = ["--root", str(root), "--out", str(tmp_path / "o"), "--weights", "none", *TINY]
    fails(argv, capsys, "999999.jpg")


def test_scores_by_hand() -> None:
    # Task 0: TP 3, FP 1, FN 2, TN 4. Task 1: only negatives, all right.
    counts = torch.tensor([[3, 0], [1, 0], [2, 0], [4, 6]])
    scores = study.scores(counts, ("a", "b"))
    assert scores["accuracy"] == pytest.approx({"a": 0.7, "b": 1.0})
    assert scores["balanced_accuracy"]["a"] == pytest.approx((3 / 5 + 4 / 5) / 2)
    assert scores["balanced_accuracy"]["b"] == 1.0  # no positives: the negatives' recall alone
    assert scores["f1"]["a"] == pytest.approx(6 / 9)
    assert scores["f1"]["b"] == 0.0
    assert not math.isnan(scores["mean_f1"])


def test_methods_compared_in_one_harness(tmp_path: Path) -> None:
    out = tmp_path / "compare"
    methods = "equal,dst,uw,dwa,rlw,famo,dst+upgrad"
    assert run.main(tiny_demo(out, "--methods", methods)) == 0
    results = json.loads((out / "metrics.json").read_text())
    assert list(results["runs"]) == methods.split(",")
    # Same seed, data order and model: the first epoch of equal and dst is the same run.
    first = {name: run_["epochs"][0]["train_loss"] for name, run_ in results["runs"].items()}
    assert first["dst"] == first["equal"]
    # DST drew gates after its warm-up; the plain methods record no terms.
    assert results["runs"]["dst+upgrad"]["epochs"][1]["terms"]
    assert results["runs"]["uw"]["epochs"][1]["terms"] == {}
    report = (out / "results.md").read_text()
    comparison = report.split("## Method comparison")[1].split("\n## ")[0]
    for name in methods.split(","):
        assert f"| {name} " in comparison
    assert "mean rank" in comparison
    assert "wall time" in comparison
    assert (out / "accuracy.png").read_bytes().startswith(PNG)


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
    argv = ["--root", str(demo_root), "--out", str(tmp_path / "o"), "--weights", "none", *TINY]
    fails([*argv, "--methods", "equal,upgrad"], capsys, "dstmtl[baselines]", "upgrad")
    assert not (tmp_path / "o").exists()  # refused before "equal" trained, not after


def test_dst_runs_with_chosen_terms(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import methods

    assert methods.parse_methods("equal,dst-depth+stagnancy") == ("equal", "dst-depth+stagnancy")
    assert methods.dst_method("labels, constant") == "dst-labels+constant"
    assert methods.dst_method("all") == "dst-all"
    argv = ["--root", str(demo_root), "--out", str(tmp_path / "o"), "--dst-metrics", "depth,x"]
    fails(argv, capsys, "dst-depth+x", "incompleteness")


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
    assert completed.stdout.count("Results:") == 1  # written and reported once, by rank 0
    results = json.loads((out / "metrics.json").read_text())
    assert list(results["runs"]) == ["equal", "dst"]
    assert all(0 <= v <= 1 for v in results["runs"]["dst"]["test"]["accuracy"].values())
    # Its own record reproduces it: the launcher, the processes and the batch per step.
    assert results["study"]["command"].startswith("torchrun --nproc_per_node=2 ")
    assert results["study"]["hardware"]["processes"] == 2
    assert results["study"]["effective_batch_size"] == 32


def test_the_dataloader_fallback_runs_the_study(tmp_path: Path) -> None:
    out = tmp_path / "jpeg"
    argv = tiny_demo(out, "--no-cache", "--workers", "0", "--methods", "equal", "--epochs", "1")
    assert run.main(argv) == 0
    assert not (out / "cache").exists()  # nothing was cached
    results = json.loads((out / "metrics.json").read_text())
    accuracy = results["runs"]["equal"]["test"]["accuracy"]
    assert len(accuracy) == 8
    assert all(0.0 <= value <= 1.0 for value in accuracy.values())


@pytest.mark.parametrize("cache", [True, False])
def test_ranks_share_the_training_set_without_repeating_an_image(
    demo_root: Path, tmp_path: Path, cache: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 84 training images among 5 ranks: each takes 16 and four sit out the epoch, as with
    # DistributedSampler(drop_last=True), rather than some ranks seeing an image twice.
    args = arguments.parser().parse_args(
        ["--batch-size", "6", "--image-size", "16", "--workers", "0", "--no-progress"]
    )
    args.cache = cache
    # The ranks are simulated one after the other, without a process group.
    monkeypatch.setattr(pipeline, "_on_first_rank", lambda work, rank, world_size: work())
    files = celeba_files.locate(demo_root)
    splits = celeba_files.load_splits(files, celeba_files.DEFAULT_ATTRIBUTES)
    assert len(splits["train"].labels) == 84
    seen: list[bytes] = []
    for rank in range(5):
        batches = pipeline._batch_source(
            args, splits, files.image_dir, tmp_path, rank, 5, torch.device("cpu")
        )("train", epoch=0, seed=0)
        images = torch.cat([images for images, _ in batches])
        assert len(images) == 16
        assert len(batches) == 3
        seen += [image.numpy().tobytes() for image in images]
    assert len(set(seen)) == 80


def _fail_on_first_rank(rank: int, directory: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{directory}/store", rank=rank, world_size=2
    )
    try:

        def full_disk() -> None:
            raise OSError(28, "No space left on device")

        pipeline._on_first_rank(full_disk, rank, 2)
    except Exception as error:
        (Path(directory) / f"rank{rank}").write_text(f"{type(error).__name__}: {error}")
    finally:
        dist.destroy_process_group()


def test_an_error_on_the_first_rank_reaches_the_others(tmp_path: Path) -> None:
    spawn(_fail_on_first_rank, args=(str(tmp_path),), nprocs=2, join=True)
    assert (tmp_path / "rank0").read_text() == "OSError: [Errno 28] No space left on device"
    assert (tmp_path / "rank1").read_text() == (
        "CelebAError: rank 0 failed: OSError(28, 'No space left on device')"
    )


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
    refused = _run_script(["--epochs", "0"], "torch")
    assert refused.returncode == 2
    assert "must be at least 1" in refused.stderr


def test_the_dst_metric_names_are_dstmtls_terms() -> None:
    from dstmtl.study.methods import DST_TERMS

    assert arguments.DST_METRICS == DST_TERMS


@pytest.mark.parametrize("module", ["matplotlib", "tqdm", "dstmtl"])
def test_a_missing_install_step_is_named(module: str, tmp_path: Path) -> None:
    completed = _run_script(["--demo", "--out", str(tmp_path / "o")], module)
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert f"needs {module!r}, which is not installed" in completed.stderr
    assert "pip install -e '.[examples]'" in completed.stderr


def test_the_dataloader_fallback_checks_and_reports_images(
    demo_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = demo_copy
    files = celeba_files.locate(root)
    test_images = celeba_files.load_splits(files, celeba_files.DEFAULT_ATTRIBUTES)["test"]
    first, second = test_images.image_paths(files.image_dir)[:2]
    argv = ["--root", str(root), "--weights", "none", "--no-cache", "--methods", "equal", *TINY]

    first.unlink()
    fails([*argv, "--out", str(tmp_path / "missing")], capsys, "1 of ", str(first))
    assert not (tmp_path / "missing" / "checkpoints").exists()  # before any training

    shutil.copy(second, first)
    second.write_bytes(second.read_bytes()[:300])  # truncated: found only when decoded
    out = tmp_path / "truncated"
    assert run.main([*argv, "--out", str(out), "--workers", "1", "--epochs", "1"]) == 2
    message = capsys.readouterr().err
    assert message.startswith(f"error: Cannot decode image {second}")
    assert "Traceback" not in message
    assert "worker" not in message


def test_a_start_stopped_by_missing_data_leaves_no_study(
    demo_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = demo_copy
    partition = root / "list_eval_partition.txt"
    partition_text = partition.read_text()
    partition.unlink()
    out = tmp_path / "study"
    argv = ["--root", str(root), "--out", str(out), "--weights", "none", "--methods", "equal"]
    argv += [*TINY, "--epochs", "1"]
    fails(argv, capsys, "list_eval_partition.txt")
    assert not out.exists()
    fails(["--root", str(tmp_path / "nowhere"), *argv[2:]], capsys, "nowhere")
    assert not out.exists()

    partition.write_text(partition_text)
    # The same command, once the data is fixed: not refused as "another study".
    assert run.main(argv) == 0
    study = json.loads((out / "metrics.json").read_text())["study"]
    assert study["argv"] == argv
    assert study["resumed"] == []


def test_a_start_stopped_by_a_broken_image_leaves_no_study(
    demo_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = demo_copy
    image = sorted((root / "img_align_celeba").iterdir())[0]
    original = image.read_bytes()
    image.write_bytes(original[:300])  # truncated
    out = tmp_path / "study"
    argv = ["--root", str(root), "--out", str(out), "--weights", "none", "--methods", "equal"]
    argv += [*TINY, "--epochs", "1", "--cache-dir", str(tmp_path / "cache"), "--workers", "0"]
    fails(argv, capsys, image.name)
    assert not (out / "study.json").exists()
    assert not (out / "sessions.json").exists()
    image.write_bytes(original)
    assert run.main(argv) == 0


@pytest.mark.parametrize("parent_is", ["file", "sys"])
def test_an_out_folder_that_cannot_be_created_is_a_one_line_error(
    parent_is: str, demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "out" if parent_is == "file" else Path("/sys/dstmtl-study-test")
    if parent_is == "sys" and not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    argv = ["--root", str(demo_root), "--out", str(out), "--weights", "none", "--methods", "equal"]
    fails([*argv, *TINY, "--cache-dir", str(tmp_path / "cache")], capsys, str(out))


def test_resume_refuses_changed_labels(
    finished_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    changed = tmp_path / "changed"
    shutil.copytree(finished_study, changed)
    attributes = changed / "demo_data" / "list_attr_celeba.txt"
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
        tiny_demo(changed, "--resume", "--epochs", "3"),
        capsys,
        "the data changed since the study started (list_attr_celeba.txt)",
    )


def test_a_study_from_before_sessions_keeps_its_resume_apart(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()  # it trained before sessions were recorded
    resume = pipeline._session(["--resume", "--out", str(tmp_path)], torch.device("cpu"), 1)
    sessions = pipeline._record_session(tmp_path, resume, resume=True)
    assert [session["argv"] for session in sessions] == [[], resume["argv"]]
    assert sessions[0]["command"].startswith("unknown")
    again = pipeline._record_session(tmp_path, resume, resume=True)
    assert again == [*sessions, resume]


@pytest.mark.parametrize("defaults", [pipeline._DEMO, pipeline._FULL], ids=["demo", "full"])
def test_the_default_epochs_leave_dst_epochs_to_drop_in(defaults: dict[str, Any]) -> None:
    # DST's first draw is made at the end of epoch 1 and acts from epoch 2 on.
    epochs = defaults["epochs"]
    assert isinstance(epochs, int)
    assert epochs - 2 >= 3


def test_each_epoch_prints_a_line_without_progress_bars(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    argv = ["--root", str(demo_root), "--out", str(out), "--weights", "none", "--methods", "equal"]
    assert run.main([*argv, *TINY, "--cache-dir", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out
    for epoch in (1, 2):
        assert f"equal epoch {epoch}/2: train loss " in printed
    assert "valid mean accuracy" in printed
    study = json.loads((out / "metrics.json").read_text())["study"]
    assert set(study["load_average"]) == {"start", "end"}


def test_a_torchrun_session_records_its_launcher_and_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    session = pipeline._session(["--demo"], torch.device("cpu"), 2)
    assert session["command"].startswith("torchrun --nproc_per_node=2 ")
    assert session["command"].endswith("run.py --demo")
    assert session["hardware"]["processes"] == 2
    alone = pipeline._session(["--demo"], torch.device("cpu"), 1)
    assert alone["command"].split()[0].startswith("python")


def test_seeds_run_every_method_with_each_seed(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    argv = ["--root", str(demo_root), "--out", str(out), "--weights", "none", *TINY]
    argv += ["--cache-dir", str(tmp_path / "cache")]
    fails([*argv, "--seeds", "a,b"], capsys, "--seeds", "do not parse")
    assert run.main([*argv, "--seeds", "2"]) == 0
    results = json.loads((out / "metrics.json").read_text())
    assert list(results["runs"]) == ["equal/seed0", "dst/seed0", "equal/seed1", "dst/seed1"]
    assert results["study"]["seeds"] == [0, 1]
    first = {name: run_["epochs"][0]["train_loss"] for name, run_ in results["runs"].items()}
    assert first["dst/seed0"] == first["equal/seed0"]  # same seed: same weights and data
    assert first["equal/seed1"] != first["equal/seed0"]
    assert "## Seeds" in (out / "results.md").read_text()
