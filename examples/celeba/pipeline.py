"""The CelebA study behind ``run.py``: folders, data checks, processes, runs, report.

``run.py`` parses the command line with nothing but the standard library, so that
``--help`` and bad options answer at once, and imports this module only then.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import hashlib
import json
import os
import platform
import shlex
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import reporting
import torch
import torch.distributed as dist
from celeba_files import (
    CelebAError,
    CelebAFiles,
    CelebASplit,
    load_splits,
    locate,
    parse_attributes,
)
from demo_data import generate_demo_celeba
from image_cache import DeviceBatches, ImageFolderDataset, build_cache, fits_on_device
from methods import check_methods, dst_method, parse_methods
from study import Settings, run_method
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

import dstmtl
from dstmtl import MultiHeadNet
from dstmtl.study import StudyError, parse_seeds

_T = TypeVar("_T")
_RUN_SCRIPT = Path(__file__).with_name("run.py")
_STUDY_FILE = "study.json"
_SESSIONS_FILE = "sessions.json"
_CHECKPOINTS = "checkpoints"
# Bumped whenever the checkpoints change shape, so that --resume refuses an older study
# instead of failing inside it. 2: the methods' TorchJD state (DWA, FAMO) is in the checkpoints.
# 3: UW, DWA, RLW and FAMO are dstmtl.study.weighting modules (missing labels skipped).
# 4: study.json holds the label files' fingerprint.
# 5: the methods are dstmtl.study.methods.Method, which holds the optimizer.
# 6: the heads are one FusedLinearHeads (fused_heads.0.weight) instead of one nn.Linear each.
_STUDY_FORMAT = 6
# The demo's defaults: small enough for a few minutes on a 2-core CPU. Five epochs, so that
# DST (whose first draw acts in epoch 2) drops tasks in three of them.
_DEMO = {"epochs": 5, "batch_size": 32, "image_size": 64, "weights": "none", "demo_images": 1200}
_FULL = {"epochs": 5, "batch_size": 256, "image_size": 128, "weights": "DEFAULT", "demo_images": 0}
# Options that may differ between an interrupted run and its --resume.
_NOT_COMPARED = {
    "resume",
    "overwrite",
    "progress",
    "download",
    "workers",
    "cache_dir",
    "out",  # a study started without --out is resumed with the folder it chose
    "terms_epoch",  # only changes the report
    "device",
    "compile",
}


def run(args: argparse.Namespace, arguments: list[str]) -> int:
    """The study of the parsed command line ``arguments``; the exit status."""
    rank, world_size, device = _start_processes(args.device)
    try:
        return _study(args, arguments, rank, world_size, device)
    except CelebAError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def _study(
    args: argparse.Namespace,
    arguments: list[str],
    rank: int,
    world_size: int,
    device: torch.device,
) -> int:
    defaults = _DEMO if args.demo else _FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not args.demo and args.root is None:
        raise CelebAError("give --root, the folder with the CelebA files, or --demo")
    attributes = parse_attributes(args.attributes)
    methods = list(parse_methods(args.methods))
    if args.dst_metrics:
        extra = dst_method(args.dst_metrics)
        methods += [extra] if extra not in methods else []
    check_methods(methods, distributed=world_size > 1)
    try:
        seeds = parse_seeds(args.seeds) if args.seeds is not None else (args.seed,)
    except StudyError as error:
        raise CelebAError(f"--seeds: {error}") from error
    args.seeds = list(seeds)  # compared whole on --resume
    config = {k: v for k, v in vars(args).items() if k not in _NOT_COMPARED}
    config["study_format"] = _STUDY_FORMAT

    if args.resume and args.out is None:
        raise CelebAError("--resume needs --out, the folder of the study to continue")

    session = _session(arguments, device, world_size)

    def choose_out() -> Path:
        out = Path(args.out or f"runs/{'demo' if args.demo else 'celeba'}-{_now('%Y%m%d-%H%M%S')}")
        _check_out(out, resume=args.resume, overwrite=args.overwrite, demo=args.demo)
        return out

    out = _on_first_rank(choose_out, rank, world_size)
    root = out / "demo_data" if args.demo else Path(args.root)

    def fetch() -> None:
        if args.demo and not (root / "list_eval_partition.txt").exists():
            if not args.resume:
                _clear_replaced_study(out, overwrite=args.overwrite)
            generate_demo_celeba(
                root,
                n_images=args.demo_images,
                seed=args.seed,
                progress=args.progress,
                workers=args.workers,
            )
        if args.download:
            _download(root)

    _on_first_rank(fetch, rank, world_size)
    files = locate(root)
    splits = load_splits(files, attributes)
    config["data_fingerprint"] = _fingerprint(files)
    if args.resume:
        _on_first_rank(lambda: _compare_config(out, config), rank, world_size)

    def build_model() -> MultiHeadNet:
        weights = None if args.weights.lower() == "none" else args.weights
        try:
            return MultiHeadNet.from_torchvision("resnet18", attributes, weights=weights)
        except (RuntimeError, ValueError) as error:
            raise CelebAError(f"{error}. Pass --weights none to train from scratch.") from error

    depths = build_model().depths()  # also fails on missing weights before the data work
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "cache" if args.demo else None
    # Decodes every image into the cache, so a missing or broken image stops the start here.
    batches = _batch_source(args, splits, files.image_dir, cache_dir, rank, world_size, device)
    # The study and this session are recorded only now, so that a start stopped by the data
    # checks leaves no study behind and the same command runs once the data is fixed.
    if not args.resume:
        _on_first_rank(
            lambda: _create_study(out, config, overwrite=args.overwrite), rank, world_size
        )
    sessions = _on_first_rank(
        lambda: _record_session(out, session, resume=args.resume), rank, world_size
    )
    settings = Settings(
        epochs=args.epochs,
        learning_rate=args.lr,
        seed=args.seed,
        device=device,
        compile=args.compile,
        progress=args.progress,
        rank=rank,
        world_size=world_size,
        checkpoint_dir=out / _CHECKPOINTS,
    )
    results = reporting.Results(
        study=_study_info(args, attributes, root, sessions, depths, world_size),
        majority_baseline=_majority(splits["train"].labels, splits["test"].labels, attributes),
        test_positive_rate=_positive_rate(splits["test"].labels, attributes),
        runs={},
    )
    try:
        for seed in seeds:
            for method in methods:
                # One seed keeps the runs named by method alone, as before --seeds.
                name = method if len(seeds) == 1 else f"{method}/seed{seed}"
                results["runs"][name] = run_method(
                    method,
                    build_model,
                    batches,
                    splits["train"].labels,
                    dataclasses.replace(settings, seed=seed),
                    run_name=name,
                )
    except KeyboardInterrupt:
        if rank == 0:
            print(
                "\ninterrupted: every completed epoch is saved; to continue, run the same "
                f"command with --resume --out {shlex.quote(str(out))}",
                file=sys.stderr,
            )
        return 130  # the shell's status for a SIGINT
    results["study"]["finished"] = _now()
    results["study"]["load_average"]["end"] = _load_average()
    if rank == 0:
        reporting.write_report(results, out, terms_epoch=args.terms_epoch)
        print(reporting.summary(results, out_dir=out))
    return 0


def _start_processes(device_name: str | None) -> tuple[int, int, torch.device]:
    """Join the process group that torchrun describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available() if device_name is None else device_name.startswith("cuda")
    if world_size > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # Rank 0 alone downloads CelebA or builds the cache while the others wait in a
        # collective; NCCL's default 10-minute timeout would end the job meanwhile.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
        if cuda:
            torch.cuda.set_device(local_rank)
            return rank, world_size, torch.device("cuda", local_rank)
        return rank, world_size, torch.device("cpu")
    device = torch.device(device_name or ("cuda" if cuda else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return rank, world_size, device


def _check_out(out: Path, *, resume: bool, overwrite: bool, demo: bool) -> None:
    """Refuse an output folder that cannot hold this study, before any work; writes nothing."""
    study_file = out / _STUDY_FILE
    try:
        if resume:
            if not study_file.exists():
                raise CelebAError(f"--resume: {out} holds no study to resume (no {_STUDY_FILE})")
            return
        if out.exists() and not out.is_dir():
            raise CelebAError(f"--out {out} is a file, not a folder; choose another --out")
        if not out.exists() or not any(out.iterdir()):
            return
        if study_file.exists():
            if not overwrite:
                raise CelebAError(
                    f"{out} already holds another study; pass --resume to continue it, "
                    "--overwrite to replace it, or choose another --out"
                )
            return
        # What a --demo start leaves when it stops before its study is recorded.
        if demo and {entry.name for entry in out.iterdir()} <= {"demo_data", "cache"}:
            return
        # --overwrite deletes the folder, so only a folder that is a study qualifies: a
        # mistyped --out must not delete a dataset or a home folder.
        raise CelebAError(
            f"{out} already holds files that are not a study (no {_STUDY_FILE}); choose "
            "another --out, or empty the folder yourself"
        )
    except OSError as error:
        raise CelebAError(f"cannot use {out} as the study folder: {error}") from error


def _compare_config(out: Path, config: dict[str, Any]) -> None:
    saved = json.loads((out / _STUDY_FILE).read_text())
    if "data_fingerprint" in saved and saved["data_fingerprint"] != config["data_fingerprint"]:
        changed = sorted(
            name
            for name in config["data_fingerprint"].keys() | saved["data_fingerprint"].keys()
            if config["data_fingerprint"].get(name) != saved["data_fingerprint"].get(name)
        )
        raise CelebAError(
            f"the data changed since the study started ({', '.join(changed)}); its runs were "
            "trained on the old files. Restore them to --resume, or start the study again "
            "with --overwrite"
        )
    differing = sorted(k for k in config.keys() | saved.keys() if config.get(k) != saved.get(k))
    if differing:
        details = ", ".join(f"{k}: was {saved.get(k)!r}, now {config.get(k)!r}" for k in differing)
        raise CelebAError(
            f"--resume needs the options of the interrupted study; {details}. Rerun with "
            "those options, or start the study again with --overwrite"
        )


def _clear_replaced_study(out: Path, *, overwrite: bool) -> None:
    """Delete the study that --overwrite replaces (``_check_out`` allowed it)."""
    if overwrite and (out / _STUDY_FILE).exists():
        shutil.rmtree(out)


def _create_study(out: Path, config: dict[str, Any], *, overwrite: bool) -> None:
    try:
        _clear_replaced_study(out, overwrite=overwrite)
        out.mkdir(parents=True, exist_ok=True)
        reporting.write_json(config, out / _STUDY_FILE)
    except OSError as error:
        raise CelebAError(f"cannot create the study folder {out}: {error}") from error


def _fingerprint(files: CelebAFiles) -> dict[str, str]:
    """SHA-256 of the label files, so that --resume refuses changed labels or splits.

    The images are not hashed (200,000 files); the image cache keys on their sizes and
    modification times.
    """
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in (files.attributes_file, files.partition_file)
    }


def _download(root: Path) -> None:
    import torchvision

    try:
        torchvision.datasets.CelebA(str(root), split="all", target_type="attr", download=True)
    except Exception as error:  # torchvision raises anything from URLError to gdown's errors
        raise CelebAError(
            f"could not download CelebA with torchvision ({type(error).__name__}: {error}). "
            "Download img_align_celeba.zip, list_attr_celeba.txt and list_eval_partition.txt "
            "from the CelebA page by hand, unpack them into one folder and pass it as --root"
        ) from error


class _JpegBatches:
    """The fallback: decode every JPEG each epoch with DataLoader worker processes."""

    def __init__(
        self,
        split: CelebASplit,
        image_dir: Path,
        args: argparse.Namespace,
        rank: int,
        world_size: int,
        device: torch.device,
        train: bool,
    ) -> None:
        self._dataset = ImageFolderDataset(
            split.image_paths(image_dir), split.labels, crop=args.crop, image_size=args.image_size
        )
        self._args, self._device, self._train = args, device, train
        # drop_last, as DeviceBatches shards: up to world_size - 1 images sit out an epoch,
        # rather than padding the shards with repeated images.
        self._sampler: DistributedSampler[int] | None = (
            DistributedSampler(
                self._dataset, world_size, rank, shuffle=True, seed=0, drop_last=True
            )
            if train and world_size > 1
            else None
        )
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __len__(self) -> int:
        samples = len(self._sampler) if self._sampler is not None else len(self._dataset)
        return -(-samples // int(self._args.batch_size))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self._sampler is not None:
            self._sampler.set_epoch(self._epoch)
        loader = DataLoader(
            self._dataset,
            batch_size=self._args.batch_size,
            shuffle=self._train and self._sampler is None,
            sampler=self._sampler,
            generator=torch.Generator().manual_seed(self._epoch),
            num_workers=self._args.workers
            if self._args.workers is not None
            else os.cpu_count() or 1,
            pin_memory=self._device.type == "cuda",
        )
        try:
            for images, labels in loader:
                yield (
                    images.to(self._device, non_blocking=True),
                    labels.to(self._device, non_blocking=True),
                )
        except CelebAError as error:
            # A worker's exception comes back with the worker's traceback as its message;
            # its own message is what follows the last "CelebAError: ".
            _, marker, original = str(error).rpartition(f"{CelebAError.__name__}: ")
            if not marker:
                raise
            raise CelebAError(original.strip()) from error


def _batch_source(
    args: argparse.Namespace,
    splits: dict[str, CelebASplit],
    image_dir: Path,
    cache_dir: Path | None,
    rank: int,
    world_size: int,
    device: torch.device,
) -> Any:
    loaders: dict[str, DeviceBatches | _JpegBatches] = {}
    for name, split in splits.items():
        train = name == "train"
        # Evaluation runs the whole split on every rank (see study.evaluate).
        shard_rank, shard_world = (rank, world_size) if train else (0, 1)
        if not args.cache:
            loaders[name] = _JpegBatches(
                split, image_dir, args, shard_rank, shard_world, device, train
            )
            continue
        directory = (
            cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dstmtl"
        )
        paths = split.image_paths(image_dir)
        build = functools.partial(_build_cache, paths, directory, args, f"caching {name}")
        _on_first_rank(build, rank, world_size)
        # Opens what rank 0 built.
        images = build_cache(paths, directory, crop=args.crop, image_size=args.image_size)
        preload = fits_on_device(images.nbytes, device)
        loaders[name] = DeviceBatches(
            images,
            split.labels,
            batch_size=args.batch_size,
            device=device,
            shuffle=train,
            seed=0,
            rank=shard_rank,
            world_size=shard_world,
            preload=preload,
        )

    def batches(split: str, *, epoch: int, seed: int) -> DeviceBatches | _JpegBatches:
        # The loaders shuffle by their epoch number: one number per (seed, epoch) pair, so
        # that no two seeds share an order.
        loaders[split].set_epoch(seed * 1000 + epoch)
        return loaders[split]

    return batches


def _majority(
    train: npt.NDArray[np.float32], test: npt.NDArray[np.float32], attributes: Sequence[str]
) -> dict[str, float]:
    """Test accuracy of always predicting each attribute's majority class in training.

    Over the labelled test samples only, like the runs' scores.
    """
    majority = (np.nanmean(train, axis=0) >= 0.5).astype(np.float32)
    labelled = ~np.isnan(test)
    accuracy = ((test == majority) & labelled).sum(axis=0) / np.maximum(labelled.sum(axis=0), 1)
    return dict(zip(attributes, accuracy.tolist(), strict=True))


def _positive_rate(labels: npt.NDArray[np.float32], attributes: Sequence[str]) -> dict[str, float]:
    return dict(zip(attributes, np.nanmean(labels, axis=0).tolist(), strict=True))


def _study_info(
    args: argparse.Namespace,
    attributes: Sequence[str],
    root: Path,
    sessions: list[reporting.Session],
    depths: dict[str, int],
    world_size: int,
) -> reporting.Study:
    first = sessions[0]
    return reporting.Study(
        command=first["command"],
        argv=first["argv"],
        dstmtl_version=dstmtl.__version__,
        torch_version=torch.__version__,
        seed=args.seed,
        seeds=list(args.seeds),
        hardware=first["hardware"],
        dataset="demo" if args.demo else "celeba",
        root=str(root),
        attributes=list(attributes),
        image_size=args.image_size,
        batch_size=args.batch_size,
        effective_batch_size=args.batch_size * world_size,
        epochs=args.epochs,
        started=first["started"],
        finished=None,
        resumed=sessions[1:],
        network_depth=depths,
        load_average={"start": _load_average(), "end": None},
    )


def _session(arguments: list[str], device: torch.device, world_size: int) -> reporting.Session:
    cuda = device.type == "cuda"
    return reporting.Session(
        command=shlex.join([*_launcher(world_size), str(_RUN_SCRIPT), *arguments]),
        argv=arguments,
        started=_now(),
        hardware=reporting.Hardware(
            device=str(device),
            device_name=torch.cuda.get_device_name(device) if cuda else _cpu_name(),
            cpu=f"{platform.machine()}, {os.cpu_count()} cores",
            gpus=world_size if cuda else 0,
            processes=world_size,
        ),
    )


def _launcher(world_size: int) -> list[str]:
    """The command that started this process: torchrun with its process counts, or python."""
    if world_size == 1:
        return [Path(sys.executable).name]
    local = os.environ.get("LOCAL_WORLD_SIZE", str(world_size))
    nodes = int(world_size) // max(int(local), 1)
    return ["torchrun", f"--nproc_per_node={local}", *([f"--nnodes={nodes}"] if nodes > 1 else [])]


def _record_session(
    out: Path, session: reporting.Session, *, resume: bool
) -> list[reporting.Session]:
    """Add this start to the study's sessions, so a resumed study keeps its first command."""
    path = out / _SESSIONS_FILE
    sessions: list[reporting.Session] = (
        json.loads(path.read_text())["sessions"] if path.exists() else []
    )
    if resume and not sessions and (out / _CHECKPOINTS).exists():
        # A study that trained before sessions were recorded: its first start is not known,
        # and this resume must not be reported as if it were.
        unknown = "unknown (started before sessions.json was recorded)"
        sessions.append(
            reporting.Session(
                command=unknown,
                argv=[],
                started=unknown,
                hardware=reporting.Hardware(
                    device="unknown", device_name=unknown, cpu="", gpus=0, processes=1
                ),
            )
        )
    sessions.append(session)
    reporting.write_json({"sessions": sessions}, path)
    return sessions


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one (platform.processor() is often '')."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _build_cache(paths: list[Path], directory: Path, args: argparse.Namespace, desc: str) -> None:
    build_cache(
        paths,
        directory,
        crop=args.crop,
        image_size=args.image_size,
        workers=args.workers,
        desc=desc,
        progress=args.progress,
    )


def _on_first_rank(work: Callable[[], _T], rank: int, world_size: int) -> _T:
    """Run ``work`` on rank 0 only; every rank gets its result, or raises its error.

    Sharing any error keeps the other ranks from waiting forever for a rank that stopped.
    """
    outcome: list[tuple[bool, Any]] = [(True, None)]
    failure: Exception | None = None
    if rank == 0:
        try:
            outcome = [(True, work())]
        except Exception as error:
            failure = error
            shared = error if isinstance(error, CelebAError) else f"rank 0 failed: {error!r}"
            outcome = [(False, str(shared))]
    if world_size > 1:
        dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    succeeded, value = outcome[0]
    if not succeeded:
        raise CelebAError(value)
    result: _T = value
    return result


def _load_average() -> list[float] | None:
    """The host's 1, 5 and 15-minute load averages, where the system reports them."""
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


def _now(fmt: str | None = None) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime(fmt) if fmt else now.isoformat(timespec="seconds")
