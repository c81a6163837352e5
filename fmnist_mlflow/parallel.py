"""Worker processes for `--jobs N`: N configs (or trials) at once, CPU threads divided between them.

Workers are spawned (a fresh interpreter each: safe with CUDA and with MLflow's process-wide state),
get the tracking URI explicitly, and turn SIGTERM into KeyboardInterrupt so that their open run ends
KILLED. On CUDA they share the one GPU.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from typing import Callable


def threads_per_worker(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt, so runs end KILLED instead of being left RUNNING (the CLI's
    commands and every worker process run inside this)."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(target: Callable, tracking_uri: str, threads: int, args: tuple) -> None:
    import torch

    from . import connection

    torch.set_num_threads(threads)
    connection.use_uri(tracking_uri)
    try:
        with sigterm_as_interrupt():
            target(*args)
    except KeyboardInterrupt:
        exit_now(130)


def exit_now(code: int) -> None:
    """Exit after an interrupt without the interpreter's teardown: torch, MLflow and SQLAlchemy take seconds
    to tear down (5 s per process on a loaded 2-core machine, so a SIGTERM to a sweep of 2 workers took
    10-20 s to end). Every run has been ended and every store write committed before this is called."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def run_workers(target: Callable, arg_lists: list, tracking_uri: str, threads: int = 0) -> list:
    """Run `target(*args)` in one process per entry of `arg_lists`; returns their exit codes.
    Each gets `threads` CPU threads (0: the cores divided between the workers)."""
    ctx = multiprocessing.get_context("spawn")
    threads = threads or threads_per_worker(len(arg_lists))
    procs = [ctx.Process(target=_main, args=(target, tracking_uri, threads, args)) for args in arg_lists]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join()
    except KeyboardInterrupt:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join()
        raise
    return [proc.exitcode for proc in procs]


class Budget:
    """Trials one command may still start, shared by its worker processes: a worker claims one right before
    it starts a trial, so that a worker whose trials were pruned early goes on while another's still run
    (a fixed share each left one idle once its share was spent). Picklable to the workers it is started with."""

    def __init__(self, total: int):
        self._left = multiprocessing.get_context("spawn").Value("i", total)

    def claim(self) -> bool:
        with self._left.get_lock():
            if self._left.value <= 0:
                return False
            self._left.value -= 1
            return True

    @property
    def left(self) -> int:
        return self._left.value
