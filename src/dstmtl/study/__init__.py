"""Multi-task studies: every method x every seed on any dataset (``pip install 'dstmtl[study]'``).

* :func:`~dstmtl.study.harness.run_study` with a :class:`~dstmtl.study.config.StudyConfig`
  of :class:`~dstmtl.study.config.StudyTask` s: trains and tests
  every method with every seed, resumable, and writes ``metrics.json``, ``results.md`` and
  a figure (:mod:`dstmtl.study.harness`, :mod:`dstmtl.study.report`).
* :mod:`dstmtl.study.methods`: the methods, each owning its training step.
* :mod:`dstmtl.study.weighting`: UW, DWA, RLW and FAMO for partly labelled data.
* :mod:`dstmtl.study.statistics`: intervals over seeds, paired t-tests, Δm%, mean ranks
  (numpy only).

``import dstmtl`` never imports this package, and the names below are imported on first
use, so the submodules that need neither tqdm nor matplotlib work without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dstmtl.study._errors import StudyError
    from dstmtl.study.config import StudyConfig, StudyTask, parse_seeds
    from dstmtl.study.harness import run_study

__all__ = ["StudyConfig", "StudyError", "StudyTask", "parse_seeds", "run_study"]

_WHERE = {
    "StudyConfig": "dstmtl.study.config",
    "StudyTask": "dstmtl.study.config",
    "parse_seeds": "dstmtl.study.config",
    "StudyError": "dstmtl.study._errors",
    "run_study": "dstmtl.study.harness",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'dstmtl.study' has no attribute {name!r}")
