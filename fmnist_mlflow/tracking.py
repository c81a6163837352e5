"""The one module that talks to MLflow: reachability, runs and their end states, params, metrics, models.

The tracking URI comes from `MLFLOW_TRACKING_URI`, else MLflow's default (`sqlite:///mlflow.db` in the
working directory). Inside `mlflow run`, the run MLflow created (`MLFLOW_RUN_ID`) is the one we log to.
Every run we open ends in a terminal state: FINISHED, FAILED (with a `fmnist.failure_reason` tag) or
KILLED (Ctrl-C, SIGTERM, or a pruned trial); none is left RUNNING.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlparse

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from . import plots
from .config import SPLIT_SEED, RunConfig
from .data import CLASS_NAMES, FILES, Dataset
from .errors import FmnistError
from .schema import (KIND_LAUNCHER, TAG_CONFIG_GROUP, TAG_CONFIG_HASH, TAG_CONFIG_NAME, TAG_FAILURE, TAG_KIND,
                     TAG_THREADS, TAG_WORKER)

EPOCH_METRICS = ("train_loss", "val_loss", "val_nll", "val_accuracy", "epoch_seconds")
REACH_TIMEOUT_S = 15.0  # give up on an unreachable tracking server after this long
MODEL_ARTIFACT = "model"
INPUT_EXAMPLE_BATCH = 4  # > 1 so that torch.export keeps the batch dimension dynamic
MODEL_INPUT = ("float32 images (N, 1, 28, 28): pixels in [0, 1], or raw 0-255 values (each image's scale is told "
               "by its brightest pixel); normalised inside the model")


class TrackingError(FmnistError, RuntimeError):
    """The tracking server could not be used; the message names the URI."""


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def redact(url: str) -> str:
    """A URL with its password replaced by ***, whatever its scheme, parseable or not."""
    import re

    return re.sub(r"(://[^/:@\s]*):[^@/\s]*@", r"\1:***@", url)


def check_reachable(uri: Optional[str] = None, timeout: float = REACH_TIMEOUT_S) -> str:
    """Fail within `timeout` seconds, naming the URI (password hidden), if the tracking store cannot be used.

    For a server: its /health must answer, and then a real API call must succeed, so that a server that
    refuses this host name (MLflow's "Invalid Host header": see --allowed-hosts) or needs credentials
    fails here in seconds with the reason, not later with a traceback.
    """
    uri = uri or tracking_uri()
    shown = redact(uri)
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        import requests

        deadline = time.monotonic() + timeout
        error = "no answer"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                response = requests.get(uri.rstrip("/") + "/health", timeout=min(5.0, left))
                if response.ok:
                    _check_api(uri, shown, min(5.0, max(1.0, deadline - time.monotonic())))
                    return uri
                error = f"HTTP {response.status_code}"
            except requests.RequestException as exc:
                error = type(exc).__name__
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        raise TrackingError(
            f"MLflow tracking server {shown} did not answer within {timeout:.0f} s ({error}). "
            "Start it (mlflow server --host 127.0.0.1 --port PORT) or set MLFLOW_TRACKING_URI."
        )
    if scheme.split("+")[0] in ("postgresql", "mysql", "mssql"):
        _check_database(uri, shown)
        return uri
    if scheme == "sqlite":
        path = uri[len("sqlite:///") :]
        folder = Path(path).parent if path else Path(".")
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"tracking store {uri}: folder {folder} does not exist or is not writable")
    return uri


def _check_api(uri: str, shown: str, timeout: float) -> None:
    import requests

    try:
        response = requests.get(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search",
                                params={"max_results": 1}, timeout=timeout)
    except requests.RequestException as exc:
        raise TrackingError(f"MLflow tracking server {shown}: its API did not answer ({type(exc).__name__})") from None
    if response.ok:
        return
    reason = " ".join(response.text.split())[:200]
    hint = ""
    if response.status_code == 403 and "host" in reason.lower():
        hint = (" The server refuses this host name: start it with --allowed-hosts listing the name clients use "
                "(e.g. --allowed-hosts 'tracking.example.org,tracking.example.org:5000').")
    elif response.status_code in (401, 403):
        hint = " The server needs credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD."
    raise TrackingError(f"MLflow tracking server {shown} answered /health but refused an API call: "
                        f"HTTP {response.status_code} {reason}.{hint}")


def _check_database(uri: str, shown: str) -> None:
    """A database tracking URI: connect once with a short timeout."""
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 5})
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # driver and SQLAlchemy errors come in many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(f"tracking store {shown} cannot be reached: {redact(first)}") from None


def describe_failure(exc: BaseException) -> str:
    """One line for an error raised while talking to the tracking store."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > 300:
        text = text[:300] + "..."
    return f"tracking store {redact(tracking_uri())} failed: {redact(text)}"


def run_link(run_id: str) -> str:
    """Where a person sees the run: the server's UI page, or how to start the UI on a local store."""
    uri = tracking_uri()
    experiment = client().get_run(run_id).info.experiment_id
    if urlparse(uri).scheme in ("http", "https"):
        return f"{redact(uri).rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
    return (f"mlflow ui --backend-store-uri {redact(uri)}, then "
            f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}")


def inside_mlflow_run() -> bool:
    """True until the run `mlflow run` created has been adopted by `run()`."""
    return bool(os.environ.get("MLFLOW_RUN_ID"))


def use_uri(uri: str) -> None:
    mlflow.set_tracking_uri(uri)


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
    if inside_mlflow_run() and os.environ.get("MLFLOW_EXPERIMENT_ID"):
        if os.environ["MLFLOW_EXPERIMENT_ID"] != DEFAULT_EXPERIMENT_ID or name == "Default":
            return os.environ["MLFLOW_EXPERIMENT_ID"]
        launcher = os.environ.pop("MLFLOW_RUN_ID")
        os.environ.pop("MLFLOW_EXPERIMENT_ID")
        client().set_tag(launcher, TAG_KIND, KIND_LAUNCHER)
        client().set_tag(launcher, "mlflow.note.content", f"`mlflow run` put this run in Default; the work was "
                         f"logged to experiment {name!r}.")
    try:
        experiment = mlflow.set_experiment(name)
    except mlflow.exceptions.MlflowException:
        # Another worker created it at the same moment; select it. (Seen once: the run that followed still
        # landed in Default, so parents are also created with an explicit experiment id.)
        experiment = mlflow.set_experiment(name)
    for key, value in EXPERIMENT_TAGS.items():
        if key not in experiment.tags:
            client().set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def _end(status: str, reason: Optional[str] = None) -> None:
    """End the active run; best effort when called for an error (the tracking server may be the error)."""
    try:
        if reason:
            mlflow.set_tag(TAG_FAILURE, reason[:5000])
        mlflow.end_run(status)
    except Exception:
        # The server is gone: forget the run locally; a later resume reaps it (reap_orphans).
        try:
            mlflow.tracking.fluent._active_run_stack.get().clear()
        except Exception:
            pass


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
    )
    if adopt:
        mlflow.set_tags({"mlflow.runName": run_name, **tags})
    try:
        yield active
    except KeyboardInterrupt as exc:
        _end("KILLED", f"interrupted ({exc or 'Ctrl-C'})")
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


def split_digest(context: str, subset: int) -> str:
    """What identifies a split: the verified source files, the split seed, which part and the subset."""
    files = ",".join(sha for sha, _ in FILES.values())
    key = f"{files}|{SPLIT_SEED}|{context}|{subset}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def log_epoch(metrics: dict) -> None:
    mlflow.log_metrics({k: metrics[k] for k in EPOCH_METRICS}, step=metrics["epoch"])


def log_figure(fig, artifact_file: str) -> None:
    mlflow.log_figure(fig, artifact_file)
    plots.close(fig)


def log_model(model: torch.nn.Module, extra_metadata: Optional[dict] = None, *, name: str = MODEL_ARTIFACT,
              params: Optional[dict] = None, metrics: Optional[dict] = None, step: Optional[int] = None,
              dataset=None) -> str:
    """Log the model in MLflow's default pt2 (torch.export) format; returns its `models:/m-...` URI.

    Input: float32 images (N, 1, 28, 28), any N, in [0, 1] or raw 0-255 pixels. float32, not uint8: a
    served model casts the JSON it receives to the signature's dtype, and uint8 would turn [0, 1] floats
    into blank images. Output: float32 logits (N, 10) in `class_names` order.
    """
    model = _cpu_copy(model)
    example = np.zeros((INPUT_EXAMPLE_BATCH, 1, 28, 28), dtype=np.float32)
    metadata = {
        "class_names": list(CLASS_NAMES),
        "input": MODEL_INPUT,
        "output": "float32 logits (N, 10); softmax gives probabilities, index = class_names position",
        **(extra_metadata or {}),
    }
    info = mlflow.pytorch.log_model(
        model,
        name=name,
        params={k: str(v) for k, v in (params or {}).items()},
        input_example=example,
        # Explicit requirements: inferring them would load the model again in a subprocess.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        metadata=metadata,
    )
    if metrics:
        mlflow.log_metrics(metrics, step=step, model_id=info.model_id, dataset=dataset)
    return info.model_uri


def _cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    copied = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()
    return copied


def client() -> MlflowClient:
    return MlflowClient()


# --- reading runs back (sweeps, searches, registry) -------------------------------------------------


def experiment_id(name: str) -> Optional[str]:
    experiment = mlflow.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else None


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


def history(run_id: str) -> list:
    """The per-epoch metrics of a finished run, as `fit` returned them."""
    by_step: dict = {}
    for key in EPOCH_METRICS:
        for metric in client().get_metric_history(run_id, key):
            by_step.setdefault(metric.step, {"epoch": metric.step})[key] = metric.value
    return [by_step[step] for step in sorted(by_step)]


def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


def log_params_once(params: dict) -> None:
    """Log params on the active run, skipping those it already holds with the same value (e.g. "64" and
    64): MLflow refuses to log a key twice, and `mlflow run` or a resumed run may have logged them."""
    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if not _same_value(logged.get(k), v)})


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


def logged_model(run_id: str):
    """The logged model of a run (MLflow 3 keeps it with its own id), or None."""
    experiment = client().get_run(run_id).info.experiment_id
    models = mlflow.search_logged_models(experiment_ids=[experiment], filter_string=f"source_run_id = '{run_id}'",
                                         output_format="list")
    return models[0] if models else None


def model_uri(run_id: str) -> str:
    """The URI of the model a run logged."""
    model = logged_model(run_id)
    return f"models:/{model.model_id}" if model else f"runs:/{run_id}/{MODEL_ARTIFACT}"


def load_pyfunc(uri: str):
    return mlflow.pyfunc.load_model(uri)


def log_to_run(run_id: str, *, metrics: dict, texts: dict, figures: dict) -> None:
    """Add metrics and artifacts to a run that may have ended (its status does not change)."""
    c = client()
    model = logged_model(run_id)
    for key, value in metrics.items():  # linked to the run's logged model, so the Models view shows them
        c.log_metric(run_id, key, value, model_id=model.model_id if model else None)
    for path, text in texts.items():
        c.log_text(run_id, text, path)
    for path, fig in figures.items():
        c.log_figure(run_id, fig, path)
        plots.close(fig)


REGISTERED_MODEL_DESCRIPTION = (
    "Fashion-MNIST CNNs trained and selected by fmnist-mlflow (validation split, never the test set). "
    "Each version's description and tags give its config, seeds and test accuracy over seeds.")


def register_model_version(run_id: str, name: str, tags: dict, description: str = "") -> str:
    """The version of `name` holding this run's model (the existing one if registered before, its tags and
    description brought up to date), else a new one."""
    c = client()
    if not _registered(name):
        try:
            c.create_registered_model(name, description=REGISTERED_MODEL_DESCRIPTION)
        except mlflow.exceptions.MlflowException:
            pass  # created by another process at the same moment
    for version in c.search_model_versions(f"name = '{name}'"):
        if version.tags.get("source_run_id") == run_id:
            for key, value in tags.items():
                c.set_model_version_tag(name, version.version, key, value)
            if description:
                c.update_model_version(name, version.version, description=description)
            return str(version.version)
    version = mlflow.register_model(model_uri(run_id), name, tags=tags)
    if description:
        c.update_model_version(name, version.version, description=description)
    return str(version.version)


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


def _registered(name: str) -> bool:
    try:
        client().get_registered_model(name)
        return True
    except mlflow.exceptions.MlflowException:
        return False


def alias_version(name: str, alias: str):
    try:
        return client().get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def move_alias(name: str, alias: str, version: str) -> None:
    client().set_registered_model_alias(name, alias, version)


def model_tag_json(name: str, key: str) -> list:
    if not _registered(name):
        return []
    return json.loads(client().get_registered_model(name).tags.get(key, "[]"))


def append_model_tag_json(name: str, key: str, entry: dict) -> None:
    client().set_registered_model_tag(name, key, json.dumps(model_tag_json(name, key) + [entry]))
