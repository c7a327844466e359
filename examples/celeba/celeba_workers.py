"""Independent chunks of work spread over processes, with one progress bar."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import TypeVar

import torch
from tqdm import tqdm

_Chunk = TypeVar("_Chunk")


def run_chunks(
    work: Callable[[_Chunk], int],
    chunks: Sequence[_Chunk],
    *,
    total: int,
    workers: int | None,
    desc: str,
    progress: bool,
) -> None:
    """Call ``work`` on every chunk, in ``workers`` processes (every usable core by default).

    ``work`` returns the number of images it handled, for the progress bar (of ``total``
    images), and must be picklable: a module-level function or a ``functools.partial`` of
    one. With one worker (or 0, or a single chunk) everything runs in this process. The
    first error, or Ctrl-C, cancels the chunks not started yet.
    """
    if workers is None:
        workers = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )
    workers = min(workers, len(chunks))
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        if workers <= 1:
            for chunk in chunks:
                bar.update(work(chunk))
            return
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
            futures = [pool.submit(work, chunk) for chunk in chunks]
            try:
                for future in as_completed(futures):
                    bar.update(future.result())
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise


def _init_worker() -> None:
    # The pool already uses every core; intra-op threads would oversubscribe
    # them, and a forked child must not reuse the parent's OpenMP pool.
    torch.set_num_threads(1)
