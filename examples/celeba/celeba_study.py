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
import shlex
import sys
from collections.abc import Mapping, Sequence
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
from dstmtl.study.harness import Processes, join_processes
from dstmtl.study.report import summary, write_report

__all__ = ["build_model", "run"]

_T = TypeVar("_T")


def run(args: argparse.Namespace, command: Sequence[str]) -> int:
    """The study of the parsed command line ``command``; the exit status."""
    # Joined now (run_study then uses the same group), so that the first process alone
    # generates the demo data and builds the cache.
    processes, joined = join_processes(args.device)
    try:
        return _study(CelebARun.from_args(args), processes, command)
    except (CelebAError, StudyError) as error:
        if processes.first:
            print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if joined:
            dist.destroy_process_group()


def build_model(
    protocol: protocols.Protocol, attributes: Sequence[str], weights: str | None
) -> MultiHeadNet:
    """The protocol's network with one binary head per attribute, in channels_last (the
    layout the prepared batches have)."""
    model = protocols.build_model(protocol, attributes, weights)
    return model.to(memory_format=torch.channels_last)


def _study(celeba: CelebARun, processes: Processes, command: Sequence[str]) -> int:
    processes.check_methods(celeba.methods)  # before the demo data and the cache are built
    device = processes.device
    out = processes.on_first(lambda: celeba.default_out(_now("%Y%m%d-%H%M%S")))
    root = celeba.data_root
    processes.on_first(lambda: _fetch(celeba, root))
    files = locate(root)
    splits = load_splits(files, celeba.attributes)
    config = celeba.study_config(fingerprint(files))
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
        first_rank=processes.on_first,
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
            command=command,
        )
    except KeyboardInterrupt:
        if processes.first:
            print(
                "\ninterrupted: every completed epoch is saved; to continue, run the same "
                f"command with --resume --out {shlex.quote(str(out))}",
                file=sys.stderr,
            )
        return 130  # the shell's status for a SIGINT
    if processes.first:
        if celeba.terms_epoch is not None:
            # The harness's report shows the last epoch's terms; this one, the chosen epoch's.
            write_report(results, config, out, terms_epoch=celeba.terms_epoch)
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


def _now(fmt: str) -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime(fmt)
