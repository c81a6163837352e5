"""What a run records in MLflow: its config as params (once, beside what `mlflow run` logged), the machine
and code as tags, its datasets as inputs, per-epoch metrics, and a report's texts, figures, tags and
metrics; an evaluation run's model and test split as inputs with the test metrics linked to both."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import warnings
from pathlib import Path
from typing import Optional

import mlflow

from ..process import ENV_GPU, ENV_NODE
from ..retry import on_race
from ..schema import TAG_CONFIG_GROUP, TAG_CONFIG_HASH, TAG_CONFIG_NAME, TAG_GPU, TAG_RAY_NODE, TAG_THREADS
from .queries import DEFERRED_VALUES, EPOCH_METRICS, RESOLVED_SUFFIX


def environment_tags(device: str) -> dict:
    import torch

    # Same seed, same metrics on the CPU only at the same thread count: record it.
    tags = {"torch_version": torch.__version__, "device_name": device_name(device), TAG_THREADS: torch.get_num_threads()}
    if device == "cuda" and os.environ.get(ENV_GPU):
        tags[TAG_GPU] = os.environ[ENV_GPU]  # the host's GPU id this worker was pinned to
    if os.environ.get(ENV_NODE):
        tags[TAG_RAY_NODE] = os.environ[ENV_NODE]
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    from ..training.hardware import usable_cpus

    return f"{platform.processor() or platform.machine()} ({usable_cpus()} of {os.cpu_count()} cores usable)"


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


def log_config(config, data) -> dict:
    """The whole config (a `training.config.RunConfig`) once, as params, plus the split sizes and the
    datasets (`training.data.Dataset`) as run inputs; returns the MLflow datasets by context ("training",
    "validation")."""
    # `mlflow run` has already logged the MLproject parameters it passed, as strings.
    log_params_once({**config.to_params(), **data.sizes})
    datasets = {}
    mlflow.set_tags({TAG_CONFIG_HASH: config.digest(), TAG_CONFIG_GROUP: config.group,
                     TAG_CONFIG_NAME: config.run_name, **environment_tags(config.device)})
    for context, split in (("training", data.train), ("validation", data.val)):
        dataset = _dataset(split, data.source, f"fashion-mnist-{context}", split_digest(context, data.subset))
        _log_input(dataset, context)
        datasets[context] = dataset
    return datasets


def _log_input(dataset, context: str, model=None) -> None:
    """The dataset as an input of the active run. Runs that log the same dataset at one moment (workers
    starting together, two `fmnist register`) race to create its record: the loser links the winner's."""
    on_race(lambda: mlflow.log_input(dataset, context=context, model=model), attempts=3, wait_s=0.2)


def _dataset(split, source: str, name: str, digest: str):
    with warnings.catch_warnings():
        # MLflow registers local folders under two equivalent source schemes and warns about it.
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.data.from_numpy(features=split.x.cpu().numpy(), targets=split.y.cpu().numpy(), source=source,
                                      name=name, digest=digest)


def split_digest(context: str, subset: int) -> str:
    """What identifies a split: the verified source files, the split seed, which part and the subset."""
    from ..training.config import SPLIT_SEED
    from ..training.data import FILES

    files = ",".join(sha for sha, _ in FILES.values())
    key = f"{files}|{SPLIT_SEED}|{context}|{subset}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _same_value(logged: Optional[str], value) -> bool:
    if logged is None:
        return False
    try:
        return float(logged) == float(value)
    except (TypeError, ValueError):
        return logged == str(value)


def log_params_once(params: dict) -> None:
    """Log params on the active run, skipping those it already holds with the same value (e.g. "64" and
    64): MLflow refuses to log a key twice, and `mlflow run` or a resumed run may have logged them. A key
    `mlflow run` logged as a value the command resolves (`seeds=grid`, `lr=auto`) gets the value used as
    `<key>_resolved` beside it; `queries.run_params` reads them back as one."""
    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    new = {}
    for key, value in params.items():
        old = logged.get(key)
        if _same_value(old, value):
            continue
        deferred = old is not None and old.strip().lower() in DEFERRED_VALUES
        new[key + RESOLVED_SUFFIX if deferred else key] = value  # any other clash: MLflow refuses, naming it
    mlflow.log_params(new)


def log_epoch(metrics: dict) -> None:
    mlflow.log_metrics({k: metrics[k] for k in EPOCH_METRICS}, step=metrics["epoch"])


def log_report(*, texts: Optional[dict] = None, figures: Optional[dict] = None, tags: Optional[dict] = None,
               metrics: Optional[dict] = None) -> None:
    """On the active run: text artifacts {path: text}, figures {path: Figure} (closed once logged), tags and
    metrics (a parent's summary, a confirm, a run's curves)."""
    from ..results.figures import close

    for path, text in (texts or {}).items():
        mlflow.log_text(text, path)
    for path, fig in (figures or {}).items():
        mlflow.log_figure(fig, path)
        close(fig)
    if tags:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})
    if metrics:
        mlflow.log_metrics(metrics)


def log_evaluation(model_id: Optional[str], test, source: str, metrics: dict, texts: dict, figures: dict) -> None:
    """On the active (evaluation) run: the logged model and the test split as its inputs, the test metrics
    linked to both (so the Models view shows them on the model), and the evaluation's tables and figures."""
    from mlflow.entities import LoggedModelInput

    dataset = _dataset(test, source, "fashion-mnist-test", split_digest("test", 0))
    _log_input(dataset, "testing", LoggedModelInput(model_id) if model_id else None)
    mlflow.log_metrics(metrics, model_id=model_id, dataset=dataset)
    log_report(texts=texts, figures=figures)
