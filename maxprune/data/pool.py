"""The worker processes a prepare runs its file and shard jobs on.

`executor` gives a spawned process pool (or None: run inline), each worker
holding the tokenizer it was started with; `completed` runs jobs on it and
yields their results in completion order. Result order never matters: every
job's output goes to a fixed place, so the stream order is the sorted file order
whatever the scheduling.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
from typing import Any, Iterator

from maxprune.data.tokenizer import Tokenizer

_worker_tokenizer: Tokenizer | None = None  # in a worker process, set once by _init_worker


def executor(workers: int, tokenizer: Tokenizer):
    """Processes for workers > 1, else None (inline).

    Spawned, not forked: the parent may be running JAX threads. Callers of
    `prepare` with workers > 1 from a script need the `if __name__ == "__main__":` guard.
    """
    if workers == 1:
        return contextlib.nullcontext(None)
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
        initargs=(tokenizer,))


def worker_tokenizer() -> Tokenizer | None:
    """The tokenizer this worker process was started with (None outside a worker)."""
    return _worker_tokenizer


def _init_worker(tokenizer: Tokenizer) -> None:
    """Runs once per worker: the tokenizer (~9 MB for Llama-3) is shipped once, not with every file."""
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _worker_tokenizer = tokenizer


def completed(pool, fn, jobs) -> Iterator[Any]:
    """fn(job) for each job, in completion order; inline when `pool` is None. A failure cancels the rest."""
    if pool is None:
        yield from map(fn, jobs)
        return
    futures = [pool.submit(fn, job) for job in jobs]
    try:
        for future in concurrent.futures.as_completed(futures):
            yield future.result()
    finally:
        for future in futures:
            future.cancel()
