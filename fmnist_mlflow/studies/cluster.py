"""Workers placed by Ray (`--ray ADDRESS`, the optional extra `fmnist-mlflow[ray]`): the same `--jobs` workers
(`engine.run_job`), started as Ray tasks on a cluster's nodes instead of as processes on this machine.

One task per GPU where the cluster has GPUs (each reserves one: Ray sets its CUDA_VISIBLE_DEVICES), else one
per CPU slot (`threads` CPUs each, 1 by default), spread over the nodes. Every task joins the study on the
shared storage and works on it as a worker started by hand would: the study is the queue, so a task takes
the next waiting point, and nothing is run twice. A node that dies takes its task's process with it: the
trial it was running stops beating, another worker fails it and queues it again (`storage`), and Ray runs
the task again on a node that is left (`max_retries`). The tasks get the driver's MLFLOW_* and FMNIST_*
variables (the tracking server's credentials, heartbeats) through their runtime environment.

Every node must reach the Optuna storage and the tracking store: a database or a tracking server, or files
(sqlite, a journal, a local artifact folder) only where all nodes run on one host (`check_shared`).
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Callable

from ..errors import FmnistError
from ..process import ENV_GPU, ENV_NODE
from ..urls import absolute_file_url, file_backed, loopback, redact

TASK_RETRIES = 3  # Ray runs a task again after its process or node died, this many times
CANCEL_WAIT_S = 30  # after Ctrl-C: how long the driver waits for the tasks to end their runs KILLED
FORWARDED = ("MLFLOW_", "FMNIST_")  # variables of the driver the tasks get

log = logging.getLogger(__name__)


class ClusterError(FmnistError, RuntimeError):
    """Ray is missing, the cluster cannot be reached, or its nodes cannot share the storage."""


def ray_module():
    try:
        import ray
    except ImportError:
        raise ClusterError("--ray needs Ray on this machine and on every node: pip install 'fmnist-mlflow[ray]'") from None
    return ray


def connect(address: str, device: str) -> None:
    """Join the cluster at `address` (`auto`: the one `ray start` runs on this machine) as its driver; a
    cluster without GPUs for `device` cuda is refused (its tasks could never be placed)."""
    ray = ray_module()
    if not ray.is_initialized():
        # Ray's driver turns SIGTERM into sys.exit; the command's own handler (SIGTERM as Ctrl-C: tasks
        # cancelled, runs ended KILLED) stays
        handler = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(f"--ray {address}: no Ray cluster answers ({str(exc).splitlines()[0]}); run the "
                               "command on a node of the cluster (`ray start --head`, or `ray start --address "
                               "HEAD:6379` here), with its address or auto") from None
        finally:
            signal.signal(signal.SIGTERM, handler)
    if device == "cuda" and ray.cluster_resources().get("GPU", 0) < 1:
        raise ClusterError(f"--ray {address}: --device cuda, and the cluster has no GPU; give --device cpu, or "
                           "add nodes with GPUs")


def nodes() -> list:
    """The cluster's live nodes as Ray reports them (dicts with NodeID, NodeManagerAddress, Resources)."""
    return [n for n in ray_module().nodes() if n.get("Alive")]


def hosts() -> list:
    """The addresses of the hosts the cluster's live nodes run on."""
    return sorted({n["NodeManagerAddress"] for n in nodes()})


def check_shared(storage_url: str, tracking: str, on_hosts: list) -> None:
    """Refuse a storage or tracking store that lives on this host when the nodes run `on_hosts`, several: a
    task elsewhere would open its own empty sqlite file (a second study), reach its own localhost, or write
    artifacts to its own folder (a tracking database without a server)."""
    if len(on_hosts) <= 1:
        return
    problems = (("the Optuna storage", storage_url, "--storage postgresql://USER@DB-HOST/DB", _local(storage_url)),
                ("the tracking store", tracking, "MLFLOW_TRACKING_URI=http://TRACKING-HOST:5000",
                 _local(tracking) or ("" if tracking.lower().startswith(("http://", "https://")) else
                                      "a database without a server: artifacts would land in each host's own folder")))
    for what, url, fix, where in problems:
        if where:
            raise ClusterError(f"--ray: {what} {redact(url)} is {where}, and the cluster's nodes run on "
                               f"{len(on_hosts)} hosts ({', '.join(on_hosts[:4])}); give a database or server every "
                               f"node reaches ({fix})")


def _local(url: str) -> str:
    """What makes `url` this host's alone, or ""."""
    if file_backed(url):
        return "a file on this host"
    return "this host's loopback address" if loopback(url) else ""


def slots(device: str, threads: int) -> int:
    """Workers the cluster holds at once: its GPUs (one task each) on CUDA, else its CPUs / `threads`."""
    resources = ray_module().cluster_resources()
    if device == "cuda" and resources.get("GPU", 0) >= 1:
        return int(resources["GPU"])
    return max(1, int(resources.get("CPU", 1)) // max(1, threads))


class ClusterBudget:
    """The trials a command's tasks may still start, in all: `workers.Budget`, kept by a Ray actor, since
    the tasks run on other hosts."""

    def __init__(self, total: int):
        ray = ray_module()
        self._counter = ray.remote(num_cpus=0)(_Counter).remote(total)

    def claim(self) -> bool:
        return ray_module().get(self._counter.claim.remote())


class _Counter:
    def __init__(self, total: int):
        self.left = total

    def claim(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


def _task(target: Callable, args: tuple, tracking_uri: str, threads: int) -> None:
    """A Ray task's boundary: the same as a `--jobs` worker process's (threads, tracking URI, library output),
    with the GPU Ray gave it and its node named for its runs' tags."""
    import torch

    from . import workers

    ray = ray_module()
    gpus = ray.get_gpu_ids()
    os.environ[ENV_NODE] = ray.get_runtime_context().get_node_id()
    if gpus:
        os.environ[ENV_GPU] = ",".join(str(g) for g in gpus)
    torch.set_num_threads(threads)
    workers.prepare(tracking_uri)
    target(*args)


def run_tasks(target: Callable, arg_lists: list, tracking_uri: str, device: str, threads: int) -> list:
    """Run `target(*args)` as one Ray task per entry of `arg_lists`, spread over the nodes; returns exit codes
    as `workers.run_workers` does: 0 done, 1 an error in the task, -9 lost (its retries spent on dead
    processes or nodes). Ctrl-C cancels the tasks (each ends its run KILLED and queues its point again)."""
    ray = ray_module()
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED)}
    # on a GPU, a fresh worker process per task (max_calls=1): one that set up CUDA for a GPU is not reused
    # for a task Ray gives another
    options = {"num_cpus": max(1, threads), "max_retries": TASK_RETRIES, "retry_exceptions": False,
               "scheduling_strategy": "SPREAD", **({"num_gpus": 1, "max_calls": 1} if device == "cuda" else {}),
               **({"runtime_env": {"env_vars": env}} if env else {})}
    remote = ray.remote(**options)(_task)
    refs = [remote.remote(target, args, tracking_uri, max(1, threads)) for args in arg_lists]
    try:
        return [_exit_code(ray, ref) for ref in refs]
    except KeyboardInterrupt:
        for ref in refs:
            ray.cancel(ref)  # a KeyboardInterrupt inside the task: its run ends KILLED, its point queued again
        ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT_S)
        raise


def _exit_code(ray, ref) -> int:
    """A task's end as a worker process's exit code: -9 for one lost with its process or node (every retry
    too), as a process killed by a signal; 1 for an error (in the task, or Ray's: its environment, its
    placement), logged with its reason."""
    errors = ray.exceptions
    try:
        ray.get(ref)
        return 0
    except (errors.WorkerCrashedError, errors.NodeDiedError, errors.LocalRayletDiedError, errors.ObjectLostError):
        return -9
    except errors.RayError as exc:
        cause = exc.cause if isinstance(exc, errors.RayTaskError) and exc.cause is not None else exc
        log.error("a Ray task failed: %s", (str(cause).strip().splitlines() or [type(cause).__name__])[0])
        return 1


def worker_urls(storage_url: str, tracking: str) -> tuple:
    """The storage and tracking URIs as tasks on other nodes need them: file paths absolute (a task does
    not start in the driver's folder)."""
    return absolute_file_url(storage_url), absolute_file_url(tracking)


def describe(device: str, threads: int) -> str:
    return (f"Ray cluster: {len(nodes())} node(s) on {len(hosts())} host(s), {slots(device, threads)} worker slot(s) "
            f"({'one GPU' if device == 'cuda' else f'{max(1, threads)} CPU'} each)")


