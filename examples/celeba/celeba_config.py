"""The CelebA study's settings: one frozen record, made once from the parsed command line.

:meth:`CelebARun.from_args` applies the defaults (an option given wins, then the demo's
small settings, then the protocol's); :meth:`CelebARun.study_config` is what
:func:`dstmtl.study.run_study` records and compares whole on ``--resume``: every setting
that decides the numbers, with the label files' fingerprint (and the precision, bfloat16
on a GPU, float32 on the CPU). The others (which GPU, the worker processes, the cache
folder, the bars, compiling) may change between a start and its resume.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from celeba_files import CelebAError, CelebAFiles, parse_attributes
from protocols import Protocol, protocol

from dstmtl.study import StudyConfig, StudyError, StudyTask, parse_seeds

__all__ = ["DEMO", "CelebARun", "dst_method", "fingerprint"]


@dataclass(frozen=True)
class _Demo:
    """The demo's defaults: small enough for a few minutes on a 2-core CPU. Five epochs, so
    that DST (whose first draw acts in epoch 2, and which keeps every task in the last)
    drops tasks in two of them."""

    epochs: int = 5
    batch_size: int = 32
    image_size: int = 64
    images: int = 1200


DEMO = _Demo()


@dataclass(frozen=True)
class CelebARun:
    """Everything one start of ``run.py`` does, with every default applied."""

    protocol: Protocol
    attributes: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    epochs: int
    batch_size: int
    learning_rate: float
    image_size: int
    crop: int | None
    weights: str | None
    demo: bool
    demo_images: int
    demo_seed: int
    root: Path | None
    download: bool
    cache: bool
    cache_dir: Path
    workers: int | None
    out: Path | None
    resume: bool
    overwrite: bool
    device: str | None
    compile: bool
    progress: bool
    terms_epoch: int | None
    precision: Literal["float32", "bfloat16"]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CelebARun:
        """The run of the parsed command line (``arguments.parser()``)."""
        chosen = protocol(args.protocol)
        if not args.demo and args.root is None:
            raise CelebAError("give --root, the folder with the CelebA files, or --demo")
        if args.resume and args.out is None:
            raise CelebAError("--resume needs --out, the folder of the study to continue")
        methods = (
            tuple(name.strip() for name in args.methods.split(",") if name.strip())
            if args.methods is not None
            else chosen.methods
        )
        if args.dst_metrics:
            extra = dst_method(args.dst_metrics)
            methods += (extra,) if extra not in methods else ()
        try:
            seeds = parse_seeds(args.seeds) if args.seeds is not None else (args.seed,)
        except StudyError as error:
            raise CelebAError(f"--seeds: {error}") from error

        def default(value: Any, demo: Any, full: Any) -> Any:
            return value if value is not None else demo if args.demo else full

        weights = default(args.weights, "none", chosen.weights or "none")
        cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        return cls(
            protocol=chosen,
            attributes=parse_attributes(args.attributes)
            if args.attributes is not None
            else chosen.attributes,
            methods=methods,
            seeds=seeds,
            epochs=default(args.epochs, DEMO.epochs, chosen.epochs),
            batch_size=default(args.batch_size, DEMO.batch_size, chosen.batch_size),
            learning_rate=args.lr if args.lr is not None else chosen.learning_rate,
            image_size=default(args.image_size, DEMO.image_size, chosen.image_size),
            crop=args.crop if args.crop is not None else chosen.crop,
            weights=None if weights.lower() == "none" else weights,
            demo=args.demo,
            demo_images=args.demo_images or DEMO.images,
            demo_seed=args.seed,
            root=None if args.root is None else Path(args.root),
            download=args.download,
            cache=args.cache,
            cache_dir=Path(args.cache_dir) if args.cache_dir else cache_home / "dstmtl",
            workers=args.workers,
            out=None if args.out is None else Path(args.out),
            resume=args.resume,
            overwrite=args.overwrite,
            device=args.device,
            compile=args.compile,
            progress=args.progress,
            terms_epoch=args.terms_epoch,
            # bfloat16 autocast on a GPU; full precision on the CPU, where bfloat16 is slow.
            precision="bfloat16" if _cuda(args.device) else "float32",
        )

    @property
    def data_root(self) -> Path:
        """Where the CelebA files are: ``--root``, or the demo's generated set (kept in the
        cache folder, one per size and seed, so later demos reuse it)."""
        if self.root is not None and not self.demo:
            return self.root
        return self.cache_dir / f"demo-celeba-n{self.demo_images}-seed{self.demo_seed}"

    def default_out(self, now: str) -> Path:
        """The study's folder when ``--out`` is not given, named by the time ``now``."""
        return self.out or Path("runs") / f"{'demo' if self.demo else 'celeba'}-{now}"

    def study_config(self, fingerprint: Mapping[str, str]) -> StudyConfig:
        """What ``study.json`` holds: the harness's settings, and in ``extra`` CelebA's
        settings that decide the numbers and the label files' ``fingerprint``."""
        extra: dict[str, Any] = {
            "protocol": self.protocol.name,
            "dataset": "demo" if self.demo else "celeba",
            "model": self.protocol.model,
            "weights": self.weights,
            "crop": self.crop,
            "image_size": self.image_size,
            "normalise": self.protocol.normalise,
            "flip": self.protocol.flip,
            # The two input paths flip different images (the cache sorts each batch's rows).
            "input": "cache" if self.cache else "jpeg",
            "data_fingerprint": dict(fingerprint),
        }
        if self.demo:
            extra["demo_images"] = self.demo_images
            extra["demo_seed"] = self.demo_seed
        return StudyConfig(
            tasks={
                name: StudyTask("binary", metric=self.protocol.metric) for name in self.attributes
            },
            methods=self.methods,
            seeds=self.seeds,
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            # The protocol's reference, or the first method when it is not run.
            reference=self.protocol.reference
            if self.protocol.reference in self.methods or not self.methods
            else self.methods[0],
            precision=self.precision,
            extra=extra,
        )


def _cuda(device: str | None) -> bool:
    """Whether the study trains on a GPU (``--device``, else CUDA when there is one)."""
    import torch

    return torch.device(device).type == "cuda" if device else torch.cuda.is_available()


def dst_method(spec: str) -> str:
    """The method name of a DST run with the terms of ``--dst-metrics`` (``all`` or a list)."""
    if spec.strip() == "all":
        return "dst-all"
    return "dst-" + "+".join(term.strip() for term in spec.split(","))


def fingerprint(files: CelebAFiles) -> dict[str, str]:
    """SHA-256 of the label files, so that ``--resume`` refuses changed labels or splits.

    The images are not hashed (200,000 files); the image cache keys on their sizes and
    modification times.
    """
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in (files.attributes_file, files.partition_file)
    }
