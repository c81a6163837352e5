"""Worker processes for `--jobs N`: N configs (or trials) at once, CPU threads divided between them.

Workers are spawned (a fresh interpreter each: safe with CUDA and with MLflow's process-wide state),
get the tracking URI explicitly, and turn SIGTERM into KeyboardInterrupt so that their open run ends
KILLED (`process`). On a host with several GPUs each worker is pinned to one: it starts with
`CUDA_VISIBLE_DEVICES` naming its GPU alone (in its environment from its first instruction; its runs' tag
`fmnist.gpu` says which); with one GPU they share it. `Budget` is the trial budget a command's workers share.
"""

from __future__ import annotations

import multiprocessing
from typing import Callable

from .. import process


def threads_per_worker(jobs: int) -> int:
    from ..training.hardware import usable_cpus

    return max(1, usable_cpus() // jobs)


def _main(target: Callable, tracking_uri: str, threads: int, args: tuple) -> None:
    """A worker process's boundary: its threads, tracking URI and library output, then `target(*args)`."""
    import torch

    torch.set_num_threads(threads)
    prepare(tracking_uri)
    try:
        with process.sigterm_as_interrupt():
            target(*args)
    except KeyboardInterrupt:
        process.exit_now(process.EXIT_INTERRUPTED)


def prepare(tracking_uri: str) -> None:
    """What every worker sets before it joins a study (a process here, or a Ray task: `cluster`)."""
    from ..tracking import connection
    from .storage import quiet_optuna

    connection.use_uri(tracking_uri)
    process.quiet_libraries()
    quiet_optuna()


def run_workers(target: Callable, arg_lists: list, tracking_uri: str, threads: int = 0, gpus: list = ()) -> list:
    """Run `target(*args)` in one process per entry of `arg_lists`; returns their exit codes.
    Each gets `threads` CPU threads (0: the cores divided between the workers) and `gpus[i]`, if given, as its
    only GPU."""
    ctx = multiprocessing.get_context("spawn")
    threads = threads or threads_per_worker(len(arg_lists))
    procs = [ctx.Process(target=_main, args=(target, tracking_uri, threads, args)) for args in arg_lists]
    try:
        for i, proc in enumerate(procs):
            # a spawned process starts with this environment: its GPU is all CUDA shows it, from its first import
            with process.variables({"CUDA_VISIBLE_DEVICES": gpus[i], process.ENV_GPU: gpus[i]} if gpus else {}):
                with process.interrupts_held():
                    proc.start()
        for proc in procs:
            proc.join()
    except KeyboardInterrupt:
        # also while they are being started: a worker left reading its start-up data from a parent that is
        # gone would die with a traceback ("EOFError: Ran out of input"), so each one started is ended first
        started = [proc for proc in procs if proc.pid is not None]
        for proc in started:
            if proc.is_alive():
                proc.terminate()
        for proc in started:
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
