"""The one interface through which the method searches evaluate candidate configurations.

A search builds a *context* once (the network, the images, the baseline) and a list of
*candidates*; an :class:`Executor` applies ``task(context, candidate)`` to every candidate and
returns the results in order. The methods never create processes themselves, so a cluster
backend (one more ``Executor`` subclass that ships the context to its workers once) can be
added without touching them.

* :class:`SerialExecutor` runs in this process (tests, small searches);
* :class:`LocalExecutor` (the default for the command line) is a local process pool whose
  workers receive the context once, at start-up, and keep it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Sequence

__all__ = ["Executor", "SerialExecutor", "LocalExecutor", "default_executor"]

_WORKER_CONTEXT: dict = {}


class Executor:
    """Evaluates ``task(context, candidate)`` for many candidates; results keep their order."""

    def map(self, task: Callable[[Any, Any], Any], context: Any,
            candidates: Sequence[Any]) -> list:
        raise NotImplementedError

    def close(self) -> None:
        """Release workers (a no-op for executors without any)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SerialExecutor(Executor):
    """Evaluate in the calling process, one candidate after the other."""

    def map(self, task, context, candidates):
        return [task(context, c) for c in candidates]


def _init_worker(key, context, threads):
    import torch
    torch.set_num_threads(threads)
    _WORKER_CONTEXT[key] = context


def _run_in_worker(key, task, candidate):
    return task(_WORKER_CONTEXT[key], candidate)


class LocalExecutor(Executor):
    """A pool of ``processes`` local worker processes (spawned: safe with torch threads).

    The pool is created on first use for a given context and reused while the context object
    stays the same, so a search that evaluates many rounds of candidates pays the start-up and
    the context transfer once. ``processes <= 1`` evaluates serially in this process.
    """

    def __init__(self, processes: int | None = None, threads_per_worker: int = 1):
        if processes is None:
            processes = max(1, min(2, os.cpu_count() or 1))
        if not isinstance(processes, int) or processes < 0:
            raise ValueError(f"LocalExecutor.processes = {processes!r}: must be an integer >= 0")
        self.processes = processes
        self.threads = threads_per_worker
        self._pool = None
        self._context_id = None

    def _pool_for(self, context):
        if self._pool is not None and self._context_id == id(context):
            return self._pool
        self.close()
        key = f"ctx{id(context)}"
        self._pool = ProcessPoolExecutor(
            max_workers=self.processes, mp_context=mp.get_context("spawn"),
            initializer=_init_worker, initargs=(key, context, self.threads))
        self._context_id = id(context)
        self._key = key
        return self._pool

    def map(self, task, context, candidates):
        candidates = list(candidates)
        if self.processes <= 1 or len(candidates) <= 1:
            return [task(context, c) for c in candidates]
        pool = self._pool_for(context)
        futures = [pool.submit(_run_in_worker, self._key, task, c) for c in candidates]
        return [f.result() for f in futures]

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._context_id = None


def default_executor(processes: int | None = None) -> Executor:
    """The executor the command line uses: a local pool (``SKIPCONV_WORKERS`` overrides size)."""
    if processes is None and os.environ.get("SKIPCONV_WORKERS"):
        processes = int(os.environ["SKIPCONV_WORKERS"])
    return LocalExecutor(processes)
