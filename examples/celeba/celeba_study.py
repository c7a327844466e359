"""The CelebA study behind ``run.py``: the data checks, then :func:`dstmtl.study.run_study`.

``run.py`` parses the command line with nothing but the standard library, so that
``--help`` and bad options answer at once, and imports this module only then.
Everything that can stop a start (the files, the labels, the weights, every image) is
checked before the harness records the study, so a start stopped by a check leaves no
study behind and the same command runs once the data is fixed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import protocols
import torch
import torch.distributed as dist
from celeba_batches import celeba_batches
from celeba_config import CelebARun, fingerprint
from celeba_files import CelebAError, CelebASplit, load_splits, locate
from demo_data import generate_demo_celeba

from dstmtl import MultiHeadNet
from dstmtl.study import StudyError, run_study
from dstmtl.study.report import summary

__all__ = ["build_model", "run"]

_T = TypeVar("_T")


def run(args: argparse.Namespace) -> int:
    """The study of the parsed command line; the exit status."""
    started_group = _join_processes()
    try:
        return _study(CelebARun.from_args(args))
    except (CelebAError, StudyError) as error:
        if _rank() == 0:
            print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if started_group:
            dist.destroy_process_group()


def build_model(
    protocol: protocols.Protocol, attributes: Sequence[str], weights: str | None
) -> MultiHeadNet:
    """The protocol's network with one binary head per attribute, in channels_last (the
    layout the prepared batches have)."""
    model = protocols.build_model(protocol, attributes, weights)
    return model.to(memory_format=torch.channels_last)


def _study(celeba: CelebARun) -> int:
    rank = _rank()
    device = _device(celeba.device)
    out = _on_first_rank(lambda: celeba.default_out(_now("%Y%m%d-%H%M%S")))
    root = celeba.data_root
    _on_first_rank(lambda: _fetch(celeba, root))
    files = locate(root)
    splits = load_splits(files, celeba.attributes)
    config = celeba.study_config(fingerprint(files))
    if celeba.resume:
        _check_same_data(out, config.extra["data_fingerprint"])
    # Also fails on missing weights before the data work.
    depths = build_model(celeba.protocol, celeba.attributes, celeba.weights).depths()
    sources = celeba_batches(
        splits,
        files.image_dir,
        crop=celeba.crop,
        image_size=celeba.image_size,
        batch_size=celeba.batch_size,
        device=device,
        flip=celeba.protocol.flip,
        normalise=celeba.protocol.normalise,
        cache=celeba.cache,
        cache_dir=celeba.cache_dir,
        workers=celeba.workers,
        progress=celeba.progress,
        first_rank=_on_first_rank,
    )
    info = _info(celeba, root, splits, depths)
    try:
        results = run_study(
            config,
            lambda: build_model(celeba.protocol, celeba.attributes, celeba.weights),
            sources["train"],
            sources["valid"],
            sources["test"],
            out,
            device=device,
            resume=celeba.resume,
            overwrite=celeba.overwrite,
            progress=celeba.progress,
            compile=celeba.compile,
            info=info,
        )
    except KeyboardInterrupt:
        if rank == 0:
            print(
                "\ninterrupted: every completed epoch is saved; to continue, run the same "
                f"command with --resume --out {shlex.quote(str(out))}",
                file=sys.stderr,
            )
        return 130  # the shell's status for a SIGINT
    if rank == 0:
        print(summary(results, config, out=out))
    return 0


def _fetch(celeba: CelebARun, root: Path) -> None:
    """Generate the demo's data, or download CelebA, where asked and not done yet."""
    if celeba.demo and not (root / "list_eval_partition.txt").exists():
        generate_demo_celeba(
            root,
            n_images=celeba.demo_images,
            seed=celeba.demo_seed,
            progress=celeba.progress,
            workers=celeba.workers,
        )
    if celeba.download and not celeba.demo:
        _download(root)


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


def _check_same_data(out: Path, now: Mapping[str, str]) -> None:
    """Refuse a resume on changed label files, naming them (the harness would only say
    that the configuration differs)."""
    study_file = out / "study.json"
    if not study_file.is_file():
        return  # the harness says that there is no study to resume
    saved = json.loads(study_file.read_text()).get("config", {}).get("extra", {})
    before = saved.get("data_fingerprint", {})
    changed = sorted(
        name for name in before.keys() | now.keys() if before.get(name) != now.get(name)
    )
    if changed:
        raise CelebAError(
            f"the data changed since the study started ({', '.join(changed)}); its runs were "
            "trained on the old files. Restore them to --resume, or start the study again "
            "with --overwrite"
        )


def _info(
    celeba: CelebARun, root: Path, splits: Mapping[str, CelebASplit], depths: Mapping[str, int]
) -> dict[str, Any]:
    """The description of the data and the model that the report shows (not compared)."""

    def positive_rate(split: CelebASplit) -> dict[str, float]:
        rates = np.nanmean(split.labels, axis=0).tolist()
        return dict(zip(celeba.attributes, rates, strict=True))

    return {
        "dataset": "generated stand-in for CelebA (--demo)" if celeba.demo else "CelebA",
        "root": str(root),
        "protocol": f"{celeba.protocol.name}: {celeba.protocol.description}",
        "images": {name: len(split) for name, split in splits.items()},
        "positive_rate": {name: positive_rate(split) for name, split in splits.items()},
        "model": f"{celeba.protocol.model}, one single-logit head per attribute",
        "weights": celeba.weights or "none (from scratch)",
        "image_size": celeba.image_size,
        "crop": celeba.crop or "none (the whole image, squeezed to a square)",
        "input": "uint8 cache" if celeba.cache else "JPEGs decoded every epoch (--no-cache)",
        "network_depth": dict(depths),
    }


def _join_processes() -> bool:
    """Under torchrun, join the process group now (the harness joins one that exists), so
    that the first process alone generates the demo data and builds the cache."""
    if _world_size() == 1 or dist.is_initialized():
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # Long timeout: the other processes wait while the first builds the image cache in a
    # collective; NCCL's default 10-minute timeout would end the job meanwhile.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    return True


def _device(name: str | None) -> torch.device:
    if _world_size() > 1:
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _on_first_rank(work: Callable[[], _T]) -> _T:
    """Run ``work`` on rank 0 only; every rank gets its result, or raises its error.

    Sharing any error keeps the other ranks from waiting forever for a rank that stopped.
    """
    outcome: list[tuple[bool, Any]] = [(True, None)]
    failure: Exception | None = None
    if _rank() == 0:
        try:
            outcome = [(True, work())]
        except Exception as error:
            failure = error
            shared = error if isinstance(error, CelebAError) else f"rank 0 failed: {error!r}"
            outcome = [(False, str(shared))]
    if _world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    succeeded, value = outcome[0]
    if not succeeded:
        raise CelebAError(value)
    result: _T = value
    return result


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _now(fmt: str) -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime(fmt)
