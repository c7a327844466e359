"""The methods of the CelebA study by name, for the command line.

The methods themselves, each owning its whole training step, are
:class:`dstmtl.study.methods.Method` (see docs/methods.md); this module parses
``--methods`` and ``--dst-metrics`` and refuses, before any data work, a method that this
install or launch cannot run.
"""

from __future__ import annotations

from collections.abc import Sequence

from arguments import DEFAULT_METHODS, DST_METRICS
from celeba_files import CelebAError

from dstmtl.study import StudyError
from dstmtl.study.methods import (
    METHOD_NAMES,
    check_method_names,
    is_single_task,
    needs_one_process,
)

__all__ = ["CELEBA_METHODS", "DEFAULT_METHODS", "DST_METRICS", "check_methods", "dst_method"]
# One model per task is the harness's reference (dstmtl.study), not a CelebA run.
CELEBA_METHODS = tuple(name for name in METHOD_NAMES if not is_single_task(name))


def parse_methods(spec: str) -> tuple[str, ...]:
    """Comma-separated method names: :data:`CELEBA_METHODS`, or ``dst-<term>+<term>...``."""
    names = tuple(name.strip() for name in spec.split(",") if name.strip())
    try:
        check_method_names(names)
    except StudyError as error:
        raise CelebAError(
            str(error).replace("methods named twice", "--methods names twice")
        ) from error
    single = [name for name in names if is_single_task(name)]
    if single:
        raise CelebAError(
            f"method(s) {single} are not available here; valid methods: {', '.join(CELEBA_METHODS)}"
        )
    return names


def dst_method(spec: str) -> str:
    """The method name of a DST run with the terms of ``--dst-metrics`` (``all`` or a list)."""
    if spec.strip() == "all":
        return "dst-all"
    name = "dst-" + "+".join(term.strip() for term in spec.split(","))
    parse_methods(name)
    return name


def check_methods(names: Sequence[str], *, distributed: bool) -> None:
    """Fail now, before any data work, on a method that this launch cannot run."""
    for name in names:
        if distributed and needs_one_process(name):
            raise CelebAError(
                f"method {name!r} keeps state that each torchrun process would build from "
                "its own shard alone (per-task gradients, or weights learned from the "
                "losses), so this example runs it on one process only; run it without "
                "torchrun"
            )
