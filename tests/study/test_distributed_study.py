"""run_study under torchrun's environment: two gloo processes on the CPU (about 20 s)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import spawn
from torch.utils.data import TensorDataset

from dstmtl import MultiHeadNet
from dstmtl.study import StudyConfig, StudyError, StudyTask, run_study
from dstmtl.study.harness import Processes


def _data(seed: int, n: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    y = torch.stack([(x[:, 0] > 0).float(), x[:, 1] + x[:, 2]], dim=1)
    y[torch.rand(y.shape, generator=generator) < 0.2] = float("nan")
    return TensorDataset(x, y)


def _model() -> MultiHeadNet:
    backbone = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU())
    heads = {"sign": torch.nn.Linear(16, 1), "sum": torch.nn.Linear(16, 1)}
    return MultiHeadNet(backbone, heads)


def _worker(rank: int, directory: str, port: int, methods: tuple[str, ...]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    config = StudyConfig(
        {"sign": StudyTask("binary"), "sum": StudyTask("regression")},
        methods=methods,
        seeds=(0,),
        epochs=3,
        batch_size=8,
        learning_rate=0.01,
    )
    data = (_data(0, 64), _data(1, 32), _data(2, 32))
    outcome: dict[str, object]
    try:
        results = run_study(config, _model, *data, Path(directory) / "out", progress=False)
        outcome = {"test": {name: run["test"] for name, run in results["runs"].items()}}
    except StudyError as error:
        outcome = {"error": str(error)}
    (Path(directory) / f"rank{rank}.json").write_text(json.dumps(outcome))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_a_torchrun_study_trains_on_shards_and_records_its_launch(tmp_path: Path) -> None:
    spawn(_worker, args=(str(tmp_path), _free_port(), ("equal", "dst")), nprocs=2, join=True)
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert "error" not in first
    assert first == second  # one model, evaluated alike in both processes
    (session,) = json.loads((tmp_path / "out" / "sessions.json").read_text())
    assert session["world_size"] == 2
    assert session["effective_batch_size"] == 16
    assert session["launcher"] == ["torchrun", "--nnodes=1", "--nproc-per-node=2"]
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {name: run["test"] for name, run in saved["runs"].items()} == first["test"]
    # 64 samples over 2 processes in batches of 8: 4 steps each; the shards are disjoint, so
    # the model saw every sample, and it learned the sign.
    assert first["test"]["equal/seed0"]["sign"]["accuracy"] > 0.7


def test_methods_that_need_one_process_are_refused_under_torchrun(tmp_path: Path) -> None:
    spawn(_worker, args=(str(tmp_path), _free_port(), ("equal", "uw")), nprocs=2, join=True)
    for rank in (0, 1):
        outcome = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "methods ['uw'] keep state" in outcome["error"]
    assert not (tmp_path / "out").exists()


def _fail_on_first(rank: int, directory: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{directory}/store", rank=rank, world_size=2
    )
    try:

        def full_disk() -> None:
            raise OSError(28, "No space left on device")

        Processes(rank, 2, torch.device("cpu")).on_first(full_disk)
    except Exception as error:
        (Path(directory) / f"rank{rank}").write_text(f"{type(error).__name__}: {error}")
    finally:
        dist.destroy_process_group()


def test_an_error_in_the_first_process_reaches_the_others(tmp_path: Path) -> None:
    spawn(_fail_on_first, args=(str(tmp_path),), nprocs=2, join=True)
    assert (tmp_path / "rank0").read_text() == "OSError: [Errno 28] No space left on device"
    assert (tmp_path / "rank1").read_text() == (
        "StudyError: the first process stopped: [Errno 28] No space left on device"
    )


def test_the_method_check_needs_no_data_and_passes_one_process() -> None:
    cpu = torch.device("cpu")
    Processes(0, 1, cpu).check_methods(["equal", "uw", "famo"])  # one process runs them all
    Processes(1, 4, cpu).check_methods(["equal", "dst", "rlw", "stl"])
    with pytest.raises(StudyError, match=r"methods \['dwa', 'pcgrad'\] keep state"):
        Processes(1, 4, cpu).check_methods(["equal", "dwa", "pcgrad"])
    with pytest.raises(StudyError, match=r"unknown method\(s\) \['gradnorm'\]"):
        Processes(0, 1, cpu).check_methods(["equal", "gradnorm"])
