"""The options the `fmnist` commands share, and the checks that turn bad values into usage errors (exit 2)
before any work: Click types, a RunConfig built once, a study name safe in MLflow filter strings.

Light on purpose: `fmnist --help` imports this without torch or MLflow.
"""

from __future__ import annotations

from typing import Optional

import functools

import click

from ..schema import FILTER_UNSAFE
from ..training import config as cfg
from ..urls import DEFAULT_STORAGE, storage_problem


class AutoOr(click.ParamType):
    """A float in a range, or the word `auto` (meaning the config's per-model/optimizer default)."""

    def __init__(self, low: float, high: Optional[float], low_open: bool, high_open: bool):
        self.inner = click.FloatRange(low, high, min_open=low_open, max_open=high_open)
        self.name = f"{self.inner.name}|auto"

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
            return None
        return self.inner.convert(value, param, ctx)

    def get_metavar(self, param, ctx=None):
        return "FLOAT|auto"


class StrictBool(click.ParamType):
    """true or false (yes/no, 1/0, on/off): click's BOOL takes an empty value for false, so `--race ''` (and
    `mlflow run -P race=`) turned racing off without a word."""

    name = "true|false"

    def convert(self, value, param, ctx):
        if isinstance(value, bool):
            return value
        if not str(value).strip():
            self.fail("give true or false (an empty value is neither)", param, ctx)
        return click.BOOL.convert(value, param, ctx)


class JobsType(click.ParamType):
    """A worker count in 1..MAX_JOBS, or `auto` (None: chosen for the device and the work, see
    hardware.default_jobs)."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
            return None
        return click.IntRange(1, MAX_JOBS).convert(value, param, ctx)


MAX_JOBS = 1024  # worker processes of one command (capped again at the points or trials left)
MAX_BATCH = cfg.TRAIN_SIZE  # a batch larger than the training split is the split itself


def max_threads() -> int:
    """More torch threads than the CPUs this process may use only makes them wait on each other."""
    from ..training.hardware import usable_cpus

    return usable_cpus()


# What MLflow accepts, checked here so that a bad name fails before any work (exit 2), not after the whole
# test evaluation. The rules are MLflow's (mlflow/utils/validation.py, private there): registered model names
# without / or :, aliases of letters, digits, _ and - (not `latest`, not v<digits>, at most 255 characters),
# experiment names non-empty, at most 500 characters. Quotes and backslashes are refused too: these names are
# matched in MLflow filter strings.
ALIAS_RE = r"[\w\-]{1,255}"


def check_experiment(ctx, param, value):
    if value is not None and (not value.strip() or len(value) > 500 or any(ch in value for ch in FILTER_UNSAFE)):
        raise click.BadParameter(f"{value!r}: an experiment name must be 1-500 characters, without quotes, backticks "
                                 "or backslashes")
    return value


def check_model_name(ctx, param, value):
    if not value.strip() or len(value) > 256 or any(ch in value for ch in "/:" + FILTER_UNSAFE):
        raise click.BadParameter(f"{value!r}: a registered model name must be 1-256 characters, without / : quotes, "
                                 "backticks or backslashes")
    return value


def check_alias(ctx, param, value):
    import re

    if not re.fullmatch(ALIAS_RE, value) or value.lower() == "latest" or re.fullmatch(r"v\d+", value):
        raise click.BadParameter(f"{value!r}: an alias is 1-255 letters, digits, _ or -, and not 'latest' or "
                                 "v<number> (MLflow reserves those)")
    return value


def check_timeout(ctx, param, value):
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value}: give a finite number of seconds")
    return value


def experiment_option(help_text: str):
    return click.option("--experiment", default="fmnist", show_default=True, envvar="MLFLOW_EXPERIMENT_NAME",
                        callback=check_experiment, help=help_text)


def epochs_option(default: int, help_text: str, low: int = 1):
    return click.option("--epochs", type=click.IntRange(low, cfg.MAX_EPOCHS), default=default, show_default=True,
                        help=help_text)


def subset_option(fn):
    return click.option(
        "--subset", type=click.IntRange(min=0), default=0, show_default=True,  # the config says what is allowed
        help="Train on the first N training and N//5 validation images (0: all; for smoke runs)."
    )(fn)


def data_dir_option(fn):
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False),
        default=None,
        help="Folder with the Fashion-MNIST IDX files (default: $FMNIST_DATA_DIR, else a per-user cache dir; "
        "then Debian's dataset-fashion-mnist, then torchvision's download).",
    )(fn)


def tracking_options(fn):
    """Options every tracked command shares."""
    fn = experiment_option("MLflow experiment name; $MLFLOW_EXPERIMENT_NAME if set (inside `mlflow run`, "
                           "the run's own experiment is used).")(fn)
    fn = subset_option(fn)
    fn = epochs_option(10, "Epochs per run.")(fn)
    return data_dir_option(fn)


def device_options(fn):
    """Where and how a run computes: shared by train, sweep and search."""
    fn = click.option("--precision", type=click.Choice(cfg.PRECISIONS), default="auto", show_default=True,
                      help="bf16: autocast the forward pass (the model stays fp32). auto: bf16 on CUDA GPUs with "
                      "bf16 and on CPUs with AMX-BF16 or AVX512-BF16, else fp32 (`fmnist data` says which).")(fn)
    fn = click.option("--threads", type=click.IntRange(0, max_threads()), default=0, show_default=True,
                      help="CPU threads per training process (0: all cores, or cores / N with --jobs N). "
                      "Give 1 to each of several workers started on one machine.")(fn)
    return click.option("--device", type=click.Choice(cfg.DEVICES), default="auto", show_default=True,
                        help="auto: CUDA when available.")(fn)


def system_metrics_option(fn):
    """--system-metrics/--no-system-metrics: MLflow's own switch ($MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING),
    set by the command's boundary (`boundary.reported`) for the command and the worker processes it
    starts; training runs log system metrics unless it is off."""
    return click.option("--system-metrics/--no-system-metrics", default=None,
                        help="Log MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) on "
                        "every training run, every 10 s (default: on, unless $MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING "
                        "is false).")(fn)


def race_options(what: str):
    """--race [true|false] and --no-race, shared by the sweep (its seeds) and the search (its confirm step):
    the value is False when either says so."""

    def decorate(fn):
        fn = click.option("--no-race", "no_race", is_flag=True, help="Same as `--race false`.")(fn)
        fn = click.option("--race", type=StrictBool(), default=True, is_flag=False, flag_value=True, show_default=True,
                          metavar="[true|false]", help=what)(fn)

        @functools.wraps(fn)
        def wrapper(*args, race: bool, no_race: bool, **kwargs):
            return fn(*args, race=race and not no_race, **kwargs)

        return wrapper

    return decorate


def jobs_option(fn):
    return click.option("--jobs", type=JobsType(), default="auto", show_default=True,
                        help="Worker processes on the study, each running one config or trial at a time "
                        "(CPU threads divided between them; on CUDA they share the GPU), at most one per point "
                        "left. auto: one single-threaded worker per CPU core for full-data runs on a CPU, "
                        "else 1.")(fn)


def ray_option(fn):
    return click.option("--ray", "ray_address", default=None, metavar="ADDRESS|auto", callback=check_ray_address,
                        help="Start the workers as Ray tasks on the cluster at ADDRESS (HOST:6379; auto: the one "
                        "`ray start` runs on this machine): one per GPU where it has GPUs, else one per CPU slot "
                        "(--threads CPUs each, default 1), spread over its nodes, --jobs N at most. Its nodes must "
                        "reach the --storage database and the tracking server. Needs fmnist-mlflow[ray].")(fn)


def check_ray_address(ctx, param, address: Optional[str]) -> Optional[str]:
    if address is not None and not address.strip():
        raise click.BadParameter("give the cluster's address (HOST:PORT, ray://HOST:10001) or auto")
    return address


def storage_options(default_study: str):
    """--storage and --study, shared by the sweep and the search: what lets workers join one study."""

    def decorate(fn):
        fn = click.option("--study", "study_name", default=None, callback=check_study_name,
                          help=f"Optuna study name (default: {default_study}). Same storage and study: resume "
                          "it, or join the workers already on it.")(fn)
        return click.option("--storage", "storage_url", default=DEFAULT_STORAGE, show_default=True, callback=check_storage,
                            help="Optuna storage: sqlite:///FILE (one machine), postgresql://USER@HOST:PORT/DB "
                            "(several machines), or journal:FILE (no lost-worker recovery).")(fn)

    return decorate


def check_storage(ctx, param, url: str) -> str:
    """The storage URL's form and driver, before any work (exit 2); the database is reached later."""
    problem = storage_problem(url)
    if problem:
        raise click.BadParameter(problem)
    return url


def check_study_name(ctx, param, study_name: Optional[str]) -> Optional[str]:
    if study_name is not None and (any(ch in study_name for ch in FILTER_UNSAFE) or not study_name.strip()):
        raise click.BadParameter(f"{study_name!r}: a study name may not be empty or contain quotes, backticks or "
                                 "backslashes (it is matched in MLflow filter strings)")
    return study_name


def confirm_seeds(ctx, param, value: str) -> tuple:
    """--seeds of a search's confirm step: a count N (fresh seeds 1..N, not the search's own 0) or a list."""
    from ..studies.specs import parse_seeds

    try:
        seeds = tuple(range(1, int(value) + 1)) if value.strip().isdigit() else parse_seeds(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if not seeds:
        raise click.BadParameter("give at least one seed")
    return seeds


def config_options(fn):
    """The options that make up one RunConfig."""
    options = [
        click.option("--model", type=click.Choice(cfg.MODELS), default="model1", show_default=True, help="Network."),
        click.option("--loss", type=click.Choice(cfg.LOSSES), default="ce", show_default=True,
                     help="ce: CrossEntropyLoss; bce: BCEWithLogitsLoss on one-hot targets."),
        click.option("--optimizer", type=click.Choice(cfg.OPTIMIZERS), default="adam", show_default=True),
        click.option("--lr", type=AutoOr(0, None, True, False), default="auto", show_default=True,
                     help=f"Learning rate > 0; auto: {cfg.DEFAULT_LR}."),
        click.option("--dropout", type=AutoOr(0, 1, False, True), default="auto", show_default=True,
                     help=f"Dropout rate in [0, 1); auto: {cfg.DEFAULT_DROPOUT}."),
        click.option("--batch-size", type=click.IntRange(1, MAX_BATCH), default=64, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same metrics on CPU."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def build_config(**values) -> cfg.RunConfig:
    """A validated RunConfig; a ConfigError (e.g. cuda absent) becomes a usage error, exit 2."""
    try:
        return cfg.RunConfig(**values)
    except cfg.ConfigError as exc:
        raise click.UsageError(str(exc)) from None
