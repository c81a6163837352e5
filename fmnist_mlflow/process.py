"""What a process of ours sets for itself at its boundary, and nowhere else: the `fmnist` command as it
starts, and each `--jobs` worker process as it starts (spawned: a fresh interpreter inherits the
environment, not the log levels): MLflow's environment defaults, quieter libraries, SIGTERM as Ctrl-C, and
a quick exit after an interrupt. Importing any other module of the package changes nothing in the process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from typing import Iterator, Optional

# Bounded HTTP retries to the tracking server: MLflow's defaults (7 retries, backoff factor 2, 120 s
# timeout) kept a sweep hanging for about 16 minutes when the server died. Quieter MLflow: its INFO lines
# and a "View run" line per run buried the command's own output (a sweep printed 19 pairs); the commands
# print their own links. No usage telemetry: MLflow 3 sends events to its own servers from every process;
# these commands talk to the tracking store alone. The user's own settings win; worker processes inherit
# these.
MLFLOW_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_LOGGING_LEVEL": "WARNING",
                   "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                   "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
EXIT_INTERRUPTED = 130  # what a shell reports for a process ended by Ctrl-C (128 + SIGINT)
ENV_GPU = "FMNIST_GPU"  # in a `--jobs` worker pinned to one GPU: the host's id of it (its runs' tag fmnist.gpu)
ENV_NODE = "FMNIST_RAY_NODE"  # in a Ray task (`--ray`): the id of the node it runs on (its runs' tag fmnist.ray_node)
SYSTEM_METRICS = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"  # MLflow's own switch, read by `tracking.runs`


@contextlib.contextmanager
def environment(system_metrics: Optional[bool] = None) -> Iterator[None]:
    """MLFLOW_DEFAULTS where the user set nothing, and MLflow's system-metrics switch when a command was
    given --system-metrics/--no-system-metrics, for the block (and the worker processes it starts); the
    environment is as it was afterwards."""
    changes = {k: v for k, v in MLFLOW_DEFAULTS.items() if k not in os.environ}
    if system_metrics is not None:
        changes[SYSTEM_METRICS] = "true" if system_metrics else "false"
    with variables(changes):
        yield


@contextlib.contextmanager
def variables(changes: dict) -> Iterator[None]:
    """These environment variables for the block (and the processes it starts), as they were afterwards."""
    before = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def quiet_libraries() -> None:
    """Library output that repeats what the command says in its own words."""
    # MLflow announces each run's monitor starting, stopping and skipping the GPU at INFO (four lines a run,
    # 200 for the main job); the run's System metrics tab is where a user looks.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    # MLflow's SQL store logs a traceback for every failed database operation before raising it (a full disk
    # printed ~600 lines, 15 tracebacks); the error is raised all the same, and the CLI says it in one line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


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


@contextlib.contextmanager
def interrupts_held():
    """Ctrl-C and SIGTERM held for the block (a worker process being started: its start-up data written to
    it), then raised as KeyboardInterrupt once it is through, so that nothing is left half-started. Outside
    the main thread (where no handler can be set) the block runs as it is."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    held = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
    if any(held[sig] is not signal.SIG_IGN for sig in caught):
        raise KeyboardInterrupt(f"signal {caught[0]}")


def exit_now(code: int) -> None:
    """Exit after an interrupt without the interpreter's teardown: torch, MLflow and SQLAlchemy take seconds
    to tear down (5 s per process on a loaded 2-core machine, so a SIGTERM to a sweep of 2 workers took
    10-20 s to end). Every run has been ended and every store write committed before this is called."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream: nothing more can be said
            stream.flush()
    os._exit(code)
