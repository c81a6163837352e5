"""The `fmnist` command: a thin shell that parses options, builds a config, calls the library and reports.

The group and the commands that train and look (`data`, `train`, `bench`) are here; the study commands
are in `studies.py`, the model commands in `models.py`; how each runs (errors, interrupts, environment)
in `boundary.py`. Bad values are rejected by Click types before any work (exit 2); library errors become
one readable line (exit 1); Ctrl-C and SIGTERM end the open MLflow run KILLED and exit 130.
"""

from __future__ import annotations

from typing import Optional

import click

from .. import process
from ..training import config as cfg
from ..urls import redact
from . import models, studies
from .boundary import reported, use_threads
from .console import EpochProgress
from .options import (build_config, config_options, data_dir_option, device_options, system_metrics_option,
                      tracking_options)


def entry() -> None:
    """The `fmnist` program: the command group, and an interrupted command's process exits at once (its runs
    were ended KILLED before; see `process.exit_now`)."""
    try:
        main(prog_name="fmnist")
    except SystemExit as exc:
        if exc.code == process.EXIT_INTERRUPTED:
            process.exit_now(process.EXIT_INTERRUPTED)
        raise


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fmnist-mlflow", prog_name="fmnist")
def main() -> None:
    """Train, sweep, search and register Fashion-MNIST CNNs, tracked with MLflow.

    Runs go to $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the current folder; browse them with
    `mlflow ui --backend-store-uri sqlite:///mlflow.db`.
    """


@main.command()
@data_dir_option
@reported
def data(data_dir: Optional[str]) -> None:
    """Locate Fashion-MNIST, verify its four files, and show the train/validation split."""
    from ..training import data as data_mod
    from ..training import hardware

    for name, path in data_mod.verify(data_dir).items():
        click.echo(f"ok  {name:<26} {path}")
    dataset = data_mod.load(data_dir)
    click.echo(
        f"split: {len(dataset.train):,} train / {len(dataset.val):,} validation (seed {cfg.SPLIT_SEED}); "
        "10,000 test images held out for the final evaluation"
    )
    device = cfg.RunConfig().device
    click.echo(f"this machine: {hardware.describe(device)}; --jobs auto -> "
               f"{hardware.default_jobs(device, 18, 0)} worker(s) for the report's grid on full data")


@main.command()
@config_options
@device_options
@system_metrics_option
@tracking_options
@reported
def train(experiment: str, data_dir: Optional[str], threads: int, **values) -> None:
    """Train one configuration as one MLflow run (params, per-epoch metrics, curves, model)."""
    config = build_config(**values)  # usage errors before torch and MLflow are imported
    from ..tracking import connection, launcher, links
    from ..tracking.fit import tracked_fit
    from ..training import data as data_mod

    use_threads(threads)
    uri = connection.check_reachable()
    dataset = data_mod.load(data_dir, subset=config.subset)
    _, launched = launcher.enter(experiment)
    click.echo(f"{config.seed_name}: {dataset.sizes['train_size']:,} train / {dataset.sizes['val_size']:,} val "
               f"images on {config.device}; tracking to {redact(uri)}")
    progress = EpochProgress(config)
    result = tracked_fit(config, dataset, on_epoch_end=progress.on_epoch_end, on_batch=progress.on_batch)
    launched.point_at(result.run_id)
    click.echo(f"run {result.run_id} FINISHED; model: {result.model_uri}")
    click.echo(f"view it: {links.run_link(result.run_id)}")


@main.command()
@click.option("--quick", is_flag=True, help="Smaller passes and fewer rounds: about two minutes on a 2-core CPU.")
@click.option("--device", type=click.Choice(cfg.DEVICES), default="auto", show_default=True)
@reported
def bench(quick, device) -> None:
    """Measure our trainer against the classic DataLoader loop, tracking overhead and --jobs scaling.

    Prints a line per measurement and, last, one JSON object (speedup, speedup_model3, tracking_overhead,
    jobs_speedup, machine, ...).
    """
    import json

    from .. import bench as bench_mod

    plan = bench_mod.QUICK if quick else bench_mod.FULL
    result = bench_mod.run(plan, build_config(device=device).device, report=click.echo)
    click.echo(json.dumps(result))


main.add_command(studies.sweep)
main.add_command(studies.search)
main.add_command(models.register)
main.add_command(models.predict)
