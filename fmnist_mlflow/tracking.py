"""Runs in MLflow: the experiment, runs and their end states, params, tags, metrics, figures, and reading
runs back. With `connection` (is the store there?) and `model_store` (logged models, the registry) it is
all of the package that talks to MLflow.

Inside `mlflow run`, the run MLflow created (`MLFLOW_RUN_ID`) is the one we log to.
Every run we open ends in a terminal state: FINISHED, FAILED (with a `fmnist.failure_reason` tag) or
KILLED (Ctrl-C, SIGTERM, or a pruned trial); none is left RUNNING.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlparse

import mlflow
import torch
from mlflow.tracking import MlflowClient

from . import plots
from .config import SPLIT_SEED, RunConfig
from .data import FILES, Dataset
from .connection import TrackingError, redact, tracking_uri
from .train import EpochMetrics
from .schema import (KIND_CONFIRM, KIND_EVALUATION, KIND_LAUNCHER, KIND_SWEEP_CHILD, KIND_TRAIN, KIND_TRIAL,
                     TAG_CONFIG_GROUP, TAG_CONFIG_HASH, TAG_CONFIG_NAME, TAG_FAILURE, TAG_KIND, TAG_PARENT,
                     TAG_THREADS, TAG_WORKER)

EPOCH_METRICS = tuple(k for k in EpochMetrics.__annotations__ if k != "epoch")  # logged per step = epoch


# The MLflow 3 UI opens an experiment in its GenAI view (traces, evaluations) unless the page's URL says
# otherwise: its WorkflowTypeProvider reads the query parameter `workflowType` first, then the browser's
# last choice (local storage "mlflow.workflowType", default "genai"); the experiment tag
# mlflow.experimentKind does not decide it. Every link we print carries the Model training view.
UI_VIEW = "workflowType=machine_learning"


def ui_page(run_id: str) -> str:
    """The run's page in the UI's Model training view, from the UI's root (a link in a run description)."""
    experiment = client().get_run(run_id).info.experiment_id
    return f"/#/experiments/{experiment}/runs/{run_id}?{UI_VIEW}"


def run_link(run_id: str) -> str:
    """Where a person sees the run, in the UI's Model training view: the server's page, or how to start the
    UI on a local store."""
    uri = tracking_uri()
    page = ui_page(run_id)
    if urlparse(uri).scheme in ("http", "https"):
        return f"{redact(uri).rstrip('/')}{page}"
    return f"mlflow ui --backend-store-uri {redact(uri)}, then http://127.0.0.1:5000{page}"


def inside_mlflow_run() -> bool:
    """True until the run `mlflow run` created has been adopted by `run()`."""
    return bool(os.environ.get("MLFLOW_RUN_ID"))


DEFAULT_EXPERIMENT_ID = "0"  # MLflow's "Default" experiment
# What the MLflow UI reads: the experiment's description, and its kind (MLflow 3 otherwise may open a new
# experiment in its GenAI view).
EXPERIMENT_TAGS = {
    "mlflow.note.content": "Fashion-MNIST CNNs from fmnist-mlflow: the report's grid (parent runs of kind sweep), "
                           "Optuna searches (kind search) and single runs; select on validation metrics, never "
                           "training loss. `fmnist register` evaluates the winner on the test set.",
    "mlflow.experimentKind": "custom_model_development",
}


def use_experiment(name: str) -> str:
    """Select (creating if needed) the experiment; inside `mlflow run` keep the one it chose, unless that is
    Default (`mlflow run .` without --experiment-name), where `fmnist register` would never look: then the
    run `mlflow run` made is ended as a launcher and the work goes to `name`."""
    global _launcher
    _launcher = None
    if inside_mlflow_run() and os.environ.get("MLFLOW_EXPERIMENT_ID"):
        if os.environ["MLFLOW_EXPERIMENT_ID"] != DEFAULT_EXPERIMENT_ID or name == "Default":
            return os.environ["MLFLOW_EXPERIMENT_ID"]
        _launcher = os.environ.pop("MLFLOW_RUN_ID")
        os.environ.pop("MLFLOW_EXPERIMENT_ID")
        client().set_tag(_launcher, TAG_KIND, KIND_LAUNCHER)
        client().set_tag(_launcher, "mlflow.note.content", f"`mlflow run` put this run in Default; the work was "
                         f"logged to experiment {name!r}. `mlflow run . --experiment-name {name}` leaves no run here.")
    try:
        experiment = mlflow.set_experiment(name)
    except mlflow.exceptions.MlflowException:
        # Another worker created it at the same moment; select it. (Seen once: the run that followed still
        # landed in Default, so parents are also created with an explicit experiment id.)
        experiment = mlflow.set_experiment(name)
    end_abandoned(experiment.experiment_id)
    for key, value in EXPERIMENT_TAGS.items():
        if key not in experiment.tags:
            try:
                client().set_experiment_tag(experiment.experiment_id, key, value)
            except mlflow.exceptions.MlflowException:
                # Workers starting together race to set it (a sqlite-backed server answers the loser with a
                # UNIQUE constraint error); the tag is there either way.
                if key not in client().get_experiment(experiment.experiment_id).tags:
                    raise
    return experiment.experiment_id


_launcher: Optional[str] = None  # the run `mlflow run` made that holds no work (use_experiment, release_mlflow_run)


def point_launcher_at(run_id: str) -> None:
    """Tag the run `mlflow run` made that holds no work (if this process has one) with the run that does."""
    global _launcher
    if _launcher is None:
        return
    launcher, _launcher = _launcher, None
    target = client().get_run(run_id)
    experiment = mlflow.get_experiment(target.info.experiment_id).name
    client().set_tag(launcher, TAG_PARENT, run_id)
    in_default = client().get_run(launcher).info.experiment_id == DEFAULT_EXPERIMENT_ID
    client().set_tag(launcher, "mlflow.note.content",
                     f"`mlflow run` made this run{' in Default' if in_default else ''}; the work is run {run_id} "
                     f"({target.info.run_name}) in experiment {experiment!r}: {run_link(run_id)}."
                     + (f" `mlflow run . --experiment-name {experiment}` leaves no run here." if in_default else ""))


def release_mlflow_run() -> None:
    """Inside `mlflow run` of a command whose runs nest under others' (`register`'s evaluation runs): take
    the run MLflow made out of this process's environment, since MLflow would adopt it ($MLFLOW_RUN_ID) as
    the first run the process opens; `point_launcher_at` then points it at the work."""
    global _launcher
    made = os.environ.pop("MLFLOW_RUN_ID", None)
    if made:
        _launcher = made
        client().set_tag(made, TAG_KIND, KIND_LAUNCHER)


def _end(status: str, reason: Optional[str] = None) -> None:
    """End the active run; best effort when called for an error (the tracking server may be the error).

    `mlflow.end_run` takes the run off this process's stack of active runs before it tells the server, so
    even when the server is gone the run is forgotten here (tests/test_faults.py checks that MLflow still
    does so); a later resume reaps it on the server (`SharedStudy.reap_orphans`)."""
    try:
        if reason:
            mlflow.set_tag(TAG_FAILURE, reason[:5000])
    except Exception:
        pass  # the reason is lost with the server; ending the run below still forgets it locally
    try:
        mlflow.end_run(status)
    except Exception:
        pass


INTERRUPTED: list = []  # runs this process ended KILLED on an interrupt, for the command's last line


@contextlib.contextmanager
def run(
    run_name: str,
    *,
    kind: str,
    parent_run_id: Optional[str] = None,
    run_id: Optional[str] = None,
    tags: Optional[dict] = None,
    killed_on: tuple = (),
    experiment_id: Optional[str] = None,
) -> Iterator[mlflow.ActiveRun]:
    """Open a run (or resume `run_id`, or adopt `mlflow run`'s) and always end it in a terminal state.

    Ends FINISHED on success; KILLED on KeyboardInterrupt (the CLI turns SIGTERM into one) or on an
    exception in `killed_on` (e.g. a pruned trial), tagging the reason; FAILED with the reason otherwise.
    The exception is re-raised.
    """
    # With no run_id, MLflow adopts $MLFLOW_RUN_ID (and unsets it, so that nested runs are new runs).
    adopt = run_id is None and parent_run_id is None and inside_mlflow_run()
    tags = {TAG_KIND: kind, **({} if run_id else {TAG_WORKER: worker_name()}),
            **{k: str(v) for k, v in (tags or {}).items()}}  # the REST API takes strings only
    active = mlflow.start_run(
        run_id=run_id,
        # a child goes where its parent is, whatever experiment this process has selected
        experiment_id=(client().get_run(parent_run_id).info.experiment_id if parent_run_id
                       else None if run_id or adopt else experiment_id),
        run_name=None if (run_id or adopt) else run_name,
        parent_run_id=parent_run_id,
        nested=parent_run_id is not None,
        tags=tags,
        log_system_metrics=kind in TRAINING_KINDS and system_metrics(),
    )
    if adopt:
        mlflow.set_tags({"mlflow.runName": run_name, **tags})
    try:
        yield active
    except KeyboardInterrupt as exc:
        _end("KILLED", f"interrupted ({exc or 'Ctrl-C'})")
        if active.info.run_id not in INTERRUPTED:
            INTERRUPTED.append(active.info.run_id)
        raise
    except killed_on as exc:
        _end("KILLED", f"{type(exc).__name__}: {exc}")
        raise
    except BaseException as exc:
        _end("FAILED", f"{type(exc).__name__}: {exc}")
        raise
    else:
        if run_id and TAG_FAILURE in client().get_run(run_id).data.tags:
            mlflow.delete_tag(TAG_FAILURE)  # a resumed run that now finishes: the old reason no longer holds
        mlflow.end_run("FINISHED")


def worker_name() -> str:
    return f"{platform.node()}:{os.getpid()}"


TRAINING_KINDS = (KIND_TRAIN, KIND_SWEEP_CHILD, KIND_TRIAL, KIND_CONFIRM)  # runs that train: system metrics
# MLflow announces each run's monitor starting, stopping and skipping the GPU at INFO (four lines a run,
# 200 for the main job); the run's System metrics tab is where a user looks.
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
# MLflow's SQL store logs a traceback for every failed database operation before raising it (a full disk
# printed ~600 lines, 15 tracebacks); the error is raised all the same, and the CLI says it in one line.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def system_metrics() -> bool:
    """Whether training runs log MLflow's system metrics (CPU, memory, disk and network every 10 s; GPU
    too where nvidia-ml-py is installed): yes, unless $MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING says false
    (`--no-system-metrics` sets it for a command and its workers)."""
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING as switch

    return switch.get() if switch.is_set() else True


# Runs one process opens and closes by itself; a sweep's children and a search's trials are the engine's
# to reap (by their trial's state), and parents are held open by several workers in turn.
SOLO_KINDS = (KIND_TRAIN, KIND_CONFIRM, KIND_EVALUATION)
ABANDONED_REASON = ("abandoned: its process on this machine ended without closing it (e.g. the tracking store's disk "
                    "was full, or it was killed); ended by the next fmnist command")


def end_abandoned(experiment_id: str) -> int:
    """End FAILED the experiment's RUNNING runs of SOLO_KINDS whose process, on this machine, is gone (their
    end state could not be written, e.g. on a full disk); returns how many. Runs of other machines are left
    alone: a process there cannot be seen from here."""
    here = platform.node()
    ended = 0
    for r in find_runs([experiment_id], {}, status="RUNNING"):
        host, _, pid = r.data.tags.get(TAG_WORKER, "").rpartition(":")
        if r.data.tags.get(TAG_KIND) in SOLO_KINDS and host == here and pid.isdigit() and not _alive(int(pid)):
            end_run_as(r.info.run_id, "FAILED", ABANDONED_REASON)
            ended += 1
    return ended


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def environment_tags(device: str) -> dict:
    # Same seed, same metrics on the CPU only at the same thread count: record it.
    tags = {"torch_version": torch.__version__, "device_name": device_name(device), TAG_THREADS: torch.get_num_threads()}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


@functools.lru_cache(maxsize=1)
def git_commit() -> Optional[str]:
    """The commit of the code this process runs: read once, so a long sweep does not pick up later commits."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def log_config(config: RunConfig, data: Dataset) -> dict:
    """The whole config once, as params, plus the split sizes and the datasets as run inputs; returns the
    MLflow datasets by context ("training", "validation")."""
    # `mlflow run` has already logged the MLproject parameters it passed, as strings.
    log_params_once({**config.to_params(), **data.sizes})
    datasets = {}
    mlflow.set_tags({TAG_CONFIG_HASH: config.digest(), TAG_CONFIG_GROUP: config.group,
                     TAG_CONFIG_NAME: config.run_name, **environment_tags(config.device)})
    for context, split in (("training", data.train), ("validation", data.val)):
        with warnings.catch_warnings():
            # MLflow registers local folders under two equivalent source schemes and warns about it.
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_numpy(
                features=split.x.cpu().numpy(),
                targets=split.y.cpu().numpy(),
                source=data.source,
                name=f"fashion-mnist-{context}",
                digest=split_digest(context, data.subset),
            )
        _log_input(dataset, context)
        datasets[context] = dataset
    return datasets


def _same_value(logged: Optional[str], value) -> bool:
    if logged is None:
        return False
    try:
        return float(logged) == float(value)
    except (TypeError, ValueError):
        return logged == str(value)


def _log_input(dataset, context: str) -> None:
    """Log a run input. Runs that start together (--jobs, several workers) may race to create the same
    dataset record; the server's insert then fails on a UNIQUE constraint and a second try links the
    record the other run created."""
    for attempt in range(3):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except mlflow.exceptions.MlflowException as exc:
            if attempt == 2 or ("UNIQUE" not in str(exc) and "already exists" not in str(exc)):
                raise
            time.sleep(0.2 * (attempt + 1))


def log_evaluation(model_id: Optional[str], test, source: str, metrics: dict, texts: dict, figures: dict) -> None:
    """On the active (evaluation) run: the logged model and the test split as its inputs, the test metrics
    linked to both (so the Models view shows them on the model), and the evaluation's tables and figures."""
    from mlflow.entities import LoggedModelInput

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # see log_config
        dataset = mlflow.data.from_numpy(features=test.x.cpu().numpy(), targets=test.y.cpu().numpy(), source=source,
                                         name="fashion-mnist-test", digest=split_digest("test", 0))
    mlflow.log_input(dataset, context="testing", model=LoggedModelInput(model_id) if model_id else None)
    mlflow.log_metrics(metrics, model_id=model_id, dataset=dataset)
    for path, text in texts.items():
        mlflow.log_text(text, path)
    for path, fig in figures.items():
        log_figure(fig, path)


def split_digest(context: str, subset: int) -> str:
    """What identifies a split: the verified source files, the split seed, which part and the subset."""
    files = ",".join(sha for sha, _ in FILES.values())
    key = f"{files}|{SPLIT_SEED}|{context}|{subset}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def log_epoch(metrics: EpochMetrics) -> None:
    mlflow.log_metrics({k: metrics[k] for k in EPOCH_METRICS}, step=metrics["epoch"])


def log_figure(fig, artifact_file: str) -> None:
    mlflow.log_figure(fig, artifact_file)
    plots.close(fig)


def client() -> MlflowClient:
    return MlflowClient()


# --- reading runs back (sweeps, searches, registry) -------------------------------------------------


def experiment_id(name: str) -> Optional[str]:
    experiment = mlflow.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else None


def experiment_stamp(experiment_id: str) -> str:
    """Names one experiment in one tracking store: its id and creation time, hashed. Every worker on the
    same server gets the same stamp; a new store (ids start again at 1) gets another."""
    created = client().get_experiment(experiment_id).creation_time
    return hashlib.sha256(f"{experiment_id}:{created}".encode()).hexdigest()[:6]


def find_runs(experiment_ids: list, tags: dict, status: Optional[str] = None) -> list:
    """Runs carrying all `tags` (and `status`, if given), newest first."""
    filters = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    if status:
        filters.append(f"attributes.status = '{status}'")
    return mlflow.search_runs(
        experiment_ids, filter_string=" and ".join(filters), order_by=["attributes.start_time DESC"],
        output_format="list",
    )


def child_runs(parent_run_id: str) -> list:
    parent = client().get_run(parent_run_id)
    return find_runs([parent.info.experiment_id], {"mlflow.parentRunId": parent_run_id})


def end_run_as(run_id: str, status: str, reason: str, tags: Optional[dict] = None) -> None:
    """End a run another process left open (its process is gone), with the reason."""
    c = client()
    for key, value in {TAG_FAILURE: reason, **(tags or {})}.items():
        c.set_tag(run_id, key, str(value))
    if c.get_run(run_id).info.status == "RUNNING":
        c.set_terminated(run_id, status)


def history(run_id: str) -> list[EpochMetrics]:
    """The per-epoch metrics of a run, as `fit` reported them."""
    by_step: dict = {}
    for key in EPOCH_METRICS:
        for metric in client().get_metric_history(run_id, key):
            by_step.setdefault(metric.step, {"epoch": metric.step})[key] = metric.value
    return [by_step[step] for step in sorted(by_step)]


def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


# What an MLproject parameter (or an extra `-P key=...`) holds when the command is to resolve it: `mlflow
# run` logs the parameters as given, before the command runs, and MLflow params never change.
DEFERRED_VALUES = ("grid", "auto")
RESOLVED_SUFFIX = "_resolved"  # `seeds=grid` as `mlflow run` logged it; `seeds_resolved=0,1,2` as used


def log_params_once(params: dict) -> None:
    """Log params on the active run, skipping those it already holds with the same value (e.g. "64" and
    64): MLflow refuses to log a key twice, and `mlflow run` or a resumed run may have logged them. A key
    `mlflow run` logged as a value the command resolves (`seeds=grid`, `lr=auto`) gets the value used as
    `<key>_resolved` beside it; `run_params` reads them back as one."""
    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    new = {}
    for key, value in params.items():
        old = logged.get(key)
        if _same_value(old, value):
            continue
        deferred = old is not None and old.strip().lower() in DEFERRED_VALUES
        new[key + RESOLVED_SUFFIX if deferred else key] = value  # any other clash: MLflow refuses, naming it
    mlflow.log_params(new)


def run_params(run) -> dict:
    """A run's params as used: `<key>_resolved` (see `log_params_once`) in place of `<key>`."""
    params = dict(run.data.params)
    for key in [k for k in params if k.endswith(RESOLVED_SUFFIX)]:
        params[key[: -len(RESOLVED_SUFFIX)]] = params.pop(key)
    return params


def set_tags(tags: dict) -> None:
    mlflow.set_tags(tags)


def log_metrics(metrics: dict) -> None:
    mlflow.log_metrics(metrics)


def set_run_tags(run_id: str, tags: dict) -> None:
    """Tag any run, open or ended (e.g. a trial's final Optuna state)."""
    for key, value in tags.items():
        client().set_tag(run_id, key, str(value))


def create_run(run_name: str, *, kind: str, tags: dict, params: dict, experiment_id: Optional[str] = None) -> str:
    """A run opened and ended at once (FINISHED): a parent that later commands resume and fill."""
    with run(run_name, kind=kind, tags=tags, experiment_id=experiment_id) as active:
        log_params_once(params)
    return active.info.run_id


def delete_run(run_id: str) -> None:
    client().delete_run(run_id)


# --- models and the registry ------------------------------------------------------------------------


def get_run(run_id: str):
    """A run by id, or TrackingError in one line (unknown id, deleted run)."""
    try:
        return client().get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"run {run_id!r}: {str(exc).splitlines()[0] if str(exc) else 'not found'}") from None


def find_run(run_id: str):
    """A run by id, or None if this tracking store has no such run (a store that fails still raises)."""
    try:
        return client().get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
