"""The command line of the CelebA study, with nothing but the standard library, so that
``--help`` and a bad value answer at once, before torch is imported."""

from __future__ import annotations

import argparse
from typing import NoReturn

DEFAULT_ATTRIBUTES: tuple[str, ...] = (
    "Male",
    "Smiling",
    "Young",
    "Eyeglasses",
    "Wearing_Hat",
    "Wearing_Necklace",
    "Wearing_Earrings",
    "Wearing_Lipstick",
)
DEFAULT_METHODS = ("equal", "dst")
# Short names for --dst-metrics, in the order the paper lists the terms (the names of
# dstmtl.study.methods.DST_TERMS; a test keeps the two equal).
DST_METRICS = ("depth", "labels", "incompleteness", "stagnancy", "constant")


def positive_int(text: str) -> int:
    """A count that must be at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """A count or an index that may be 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """A rate that must be finite and above 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


class _OneLineErrors(argparse.ArgumentParser):
    """argparse's parser, but a bad option is one line (the problem and the choices or
    bounds, then where the options are), not the usage block first; exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see --help\n")


def parser() -> argparse.ArgumentParser:
    """The command line of ``run.py`` (see docs/celeba.md)."""
    # Here, not at the top: protocols.py takes its default methods from this module.
    from protocols import PROTOCOLS

    study = PROTOCOLS["study"]
    command_line = _OneLineErrors(
        description="Multi-task CelebA study: equal weights vs Dropped Scheduled Task (DST).",
    )
    data = command_line.add_argument_group("data")
    data.add_argument("--root", help="folder with the CelebA files (official or Kaggle layout)")
    data.add_argument("--download", action="store_true", help="fetch CelebA with torchvision")
    data.add_argument(
        "--attributes",
        help="comma-separated attribute names, or 'all' for the 40 [the protocol's: study "
        f"{','.join(study.attributes)}; famo40 all]",
    )
    data.add_argument(
        "--crop",
        type=positive_int,
        help=f"centre crop, pixels [the protocol's: study {study.crop}; famo40 none, the whole "
        "image squeezed to a square]",
    )
    data.add_argument(
        "--image-size", type=positive_int, help="training resolution [the protocol's; demo 64]"
    )
    data.add_argument(
        "--no-cache",
        dest="cache",
        action="store_false",
        help="decode JPEGs every epoch with a DataLoader instead of the uint8 cache",
    )
    data.add_argument(
        "--cache-dir",
        help="where the uint8 cache lives [$XDG_CACHE_HOME/dstmtl or ~/.cache/dstmtl; "
        "demo <out>/cache]",
    )
    data.add_argument(
        "--workers",
        type=non_negative_int,
        default=None,
        help="processes that decode the JPEGs (and draw the demo's), 0 for this one [all cores]",
    )

    training = command_line.add_argument_group("training")
    training.add_argument(
        "--protocol",
        choices=list(PROTOCOLS),
        default=study.name,
        help="the protocol whose settings are the defaults of --attributes, --methods, "
        "--epochs, --batch-size, --image-size, --crop, --lr and --weights, and which sets the "
        "model, the metric and the reference; "
        + "; ".join(f"{name}: {chosen.description}" for name, chosen in PROTOCOLS.items())
        + " [%(default)s]",
    )
    training.add_argument(
        "--methods",
        help="comma-separated methods to compare, see docs/methods.md [the protocol's: "
        + "; ".join(f"{name} {','.join(chosen.methods)}" for name, chosen in PROTOCOLS.items())
        + "]",
    )
    training.add_argument(
        "--dst-metrics",
        help="add a DST run with these terms: 'all' or some of " + ",".join(DST_METRICS),
    )
    training.add_argument(
        "--epochs", type=positive_int, help="epochs per method [the protocol's; demo 5]"
    )
    training.add_argument(
        "--batch-size", type=positive_int, help="per process [the protocol's; demo 32]"
    )
    training.add_argument("--lr", type=positive_float, help="Adam learning rate [the protocol's]")
    training.add_argument(
        "--weights",
        help="torchvision weights of the ResNet18, or 'none' [the protocol's: study "
        f"{study.weights}, famo40 none; demo none]",
    )
    training.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the weights, data order, DST draws, demo [%(default)s]",
    )
    training.add_argument(
        "--seeds",
        help="run every method with each of these seeds: a count (3 = 0,1,2) or a list "
        "(0,1,2); the report adds intervals and paired tests over them [the --seed]",
    )
    training.add_argument("--device", help="cuda, cpu, ... [cuda when available]")
    training.add_argument("--compile", action="store_true", help="torch.compile the model")

    output = command_line.add_argument_group("output")
    output.add_argument(
        "--out", help="the study's folder [runs/celeba-<time>; demo runs/demo-<time>]"
    )
    output.add_argument("--resume", action="store_true", help="continue the study in --out")
    output.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the study in --out (only a folder holding a study)",
    )
    output.add_argument(
        "--terms-epoch",
        type=positive_int,
        help="the epoch (from 1, as the report numbers them) of the DST terms table [the last]",
    )
    output.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars"
    )

    demo = command_line.add_argument_group("demo")
    demo.add_argument(
        "--demo",
        action="store_true",
        help="generate a small stand-in in the CelebA format and run on it",
    )
    demo.add_argument("--demo-images", type=positive_int, help="images in the stand-in [1200]")
    return command_line
