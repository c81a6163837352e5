"""`fmnist sweep` and `fmnist search`: the commands that work on a shared Optuna study (studies/)."""

from __future__ import annotations

import click

from ..studies.pruners import CATALOGUE, PRUNERS
from ..studies.space import SAMPLERS
from ..studies.stopping import DEFAULT_PATIENCE
from ..training import config as cfg
from ..training.config import SELECT as SELECT_METRICS
from ..urls import redact
from . import console
from .boundary import reported, use_threads
from .console import EpochProgress, duration, on_wait, workers_line
from .options import (build_config, check_timeout, confirm_seeds, data_dir_option, device_options, epochs_option,
                      experiment_option, jobs_option, race_options, ray_option, storage_options, subset_option,
                      system_metrics_option, tracking_options)


@click.command()
@click.option("--grid", "grid_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Grid file (default: experiments/grid.yaml, the report's 18 configs).")
@click.option("--select", type=click.Choice(list(SELECT_METRICS)), default="val_accuracy", show_default=True,
              help="Validation metric that picks the best config (never training loss).")
@click.option("--seeds", default=None, metavar="0,1,2|grid",
              help="Training seeds, each config runs once per seed (default, or `grid`: the grid file's `seeds`, "
              "0,1,2 for the report's).")
@race_options("Race the seeds: a config already shown worse than the leader (the summary's test) gets no more "
              "seeds; its points end PRUNED with the reason, and no run. `--race false` or --no-race: every config "
              "gets every seed.")
@device_options
@system_metrics_option
@jobs_option
@ray_option
@storage_options("the grid's name, a digest of its configs, a stamp of the experiment")
@epochs_option(0, "Epochs per config (0: the grid's own, 10 for the report's grid).", low=0)
@subset_option
@experiment_option("MLflow experiment name; $MLFLOW_EXPERIMENT_NAME if set.")
@data_dir_option
@reported
def sweep(grid_file, select, seeds, race, device, precision, threads, jobs, ray_address, storage_url, study_name, epochs,
          subset, experiment, data_dir) -> None:
    """Run every config of a grid as nested runs under one parent; resumable (finished configs are skipped).

    The grid is an Optuna study: any number of `fmnist sweep` workers with the same options, on machines
    that share --storage and the tracking server, share its configs; a lost worker's config is retried."""
    import time

    from ..studies import grid as grid_mod
    from ..studies import specs

    try:  # usage errors before torch and MLflow are imported
        grid = grid_mod.load_grid(grid_file or grid_mod.DEFAULT_GRID)
        # "grid" (MLproject's default) or none given: the grid file's seeds
        seed_list = specs.parse_seeds(seeds) if seeds is not None and seeds.strip() != "grid" else None
        configs = grid.configs(epochs=epochs, subset=subset, device=device, precision=precision, seeds=seed_list)
    except (specs.SpecError, cfg.ConfigError) as exc:
        raise click.UsageError(str(exc)) from None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--seeds") from None
    from ..studies import engine, storage
    from ..studies import sweep as sweep_mod
    from ..tracking import connection, launcher, links
    from ..training import data as data_mod
    from ..training import hardware

    storage.quiet_optuna()
    use_threads(threads)
    storage.heartbeat_interval()  # a bad $FMNIST_HEARTBEAT_S: one line before any store is touched
    uri = connection.check_reachable()
    join_cluster(ray_address, storage_url, uri, configs[0].device, threads)
    dataset = data_mod.load(data_dir, subset=subset)
    experiment_id, launched = launcher.enter(experiment)
    n_seeds = len({c.seed for c in configs})
    click.echo(f"sweep {grid.name}: {len(configs) // n_seeds} configs x {n_seeds} seed(s) x {configs[0].epochs} epochs on {configs[0].device}, "
               f"{dataset.sizes['train_size']:,} train / {dataset.sizes['val_size']:,} val images; tracking to {redact(uri)}")
    started = time.monotonic()

    def on_start(k, n, config, elapsed, eta, label):
        left = "" if eta is None else f", ~{duration(eta)} left"
        click.echo(f"[{k + 1}/{n}] {label} (elapsed {duration(elapsed)}{left})")

    def progress(trial, config):
        bar = EpochProgress(config, prefix="  ")
        return bar.on_epoch_end, bar.on_batch

    def on_raced(config, why, label):
        click.echo(f"{label}: raced out, not run ({why.split(';')[0]})")

    shown_threads = threads or (1 if ray_address else 0)  # a Ray task's CPU slot
    hooks = engine.Hooks(on_start=on_start, progress=progress, on_wait=on_wait, on_raced=on_raced,
                         on_workers=lambda n: click.echo(workers_line(n, shown_threads, jobs, f"the {n} point(s) left")),
                         on_lost=console.workers_lost)
    result = sweep_mod.run_sweep(grid, configs, dataset, experiment_id=experiment_id, select=select, storage_url=storage_url,
                                 study_name=study_name, data_dir=data_dir, threads=threads, race=race, hooks=hooks,
                                 jobs=jobs or (0 if ray_address else hardware.default_jobs(configs[0].device, len(configs), subset)),
                                 ray=ray_address is not None)
    launched.point_at(result.parent_run_id)
    click.echo("")
    click.echo(result.markdown)
    if result.skipped:
        click.echo(f"{result.skipped} (config, seed) run(s) had already finished in an earlier attempt and were skipped.")
    if result.failed:
        names = ", ".join(f"{r['model']}-{r['loss']}-{r['optimizer']} ({r['status']})" for r in result.failed)
        click.echo(f"did not finish: {names}", err=True)
    click.echo(f"study {result.study_name} in {redact(storage_url)}; parent run {result.parent_run_id}, {duration(time.monotonic() - started)} wall time")
    click.echo(f"view it: {links.run_link(result.parent_run_id)}")


@click.command()
@click.option("--trials", type=click.IntRange(min=0), default=20, show_default=True,
              help="Trials this command runs, shared by its --jobs workers (one whose trials were pruned early starts "
              "the next); 0 with --confirm: only confirm.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None, callback=check_timeout,
              help="Stop starting new trials after this many seconds.")
@storage_options("the space's name")
@click.option("--space", "space_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Search space file (default: experiments/search.yaml).")
@click.option("--sampler", type=click.Choice(SAMPLERS), default="tpe", show_default=True)
@click.option("--pruner", type=click.Choice(PRUNERS), default=PRUNERS[0], show_default=True,
              help=f"{PRUNERS[0]}, the default: {CATALOGUE[PRUNERS[0]].what} (chosen by replaying the candidates "
              "on a study's curves, experiments/SEARCH.md).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None,
              help="Sampler seed for a reproducible single-process search (default: fresh entropy; a resumed "
              "study or another worker never replays the same suggestions).")
@click.option("--patience", type=click.IntRange(min=0), default=DEFAULT_PATIENCE, show_default=True,
              help="Stop the study (every worker) once this many trials in a row did not beat the best before them by "
              "more than the space's seed sd: the confirm decides among what it found. 0: never (also continues a "
              "study that stopped itself).")
@click.option("--confirm", "confirm_k", type=click.IntRange(min=0), default=0, show_default=True,
              help="After the trials, re-run the K best with --seeds seeds each and name the champion by the mean.")
@click.option("--seeds", "confirm_seeds", default="3", show_default=True, metavar="N|1,2,3", callback=confirm_seeds,
              help="Seeds for --confirm: a count N (fresh seeds 1..N, not the search's own seed 0) or a list.")
@race_options("Race --confirm's contenders: seed by seed, one already shown worse than the leader (the main job's "
              "test) gets no more seeds, so the champion is one that got them all. `--race false` or --no-race: "
              "every contender gets every seed.")
@jobs_option
@ray_option
@device_options
@system_metrics_option
@tracking_options
@reported
def search(trials, timeout, storage_url, study_name, space_file, sampler, pruner, seed, patience, confirm_k, confirm_seeds, race, jobs,
           ray_address, device, precision, threads, epochs, subset, experiment, data_dir) -> None:
    """Search model3's training settings with Optuna (the space file says which: optimizer and learning rate,
    dropout, weight decay, schedule, batch size, label smoothing, augmentation, width, weight average); each
    trial a nested run under the study's parent run; --confirm re-runs the best on fresh seeds."""
    from ..studies.space import DEFAULT_SPACE, load_space
    from ..studies.specs import SpecError

    if trials == 0 and not confirm_k:
        raise click.UsageError("--trials 0 runs nothing; add --confirm K to confirm an existing study's best trials")
    try:  # usage errors before any study or run (and before torch, MLflow and Optuna are imported)
        space = load_space(space_file or DEFAULT_SPACE)
    except SpecError as exc:
        raise click.UsageError(str(exc)) from None
    # device and precision resolved once, for every worker
    checked = build_config(device=device, subset=subset, epochs=epochs, precision=precision)
    from ..studies import confirm, engine, storage
    from ..studies import search as search_mod
    from ..studies import search_report
    from ..tracking import connection, launcher, links
    from ..training import data as data_mod
    from ..training import hardware

    storage.quiet_optuna()
    shown_threads = threads or (1 if ray_address else 0)  # a Ray task's CPU slot
    settings = search_mod.SearchSettings(epochs, subset, checked.device, checked.precision)
    plan = search_mod.Search(study_name or space.name, space, settings, sampler, pruner, seed, patience)
    use_threads(threads)
    storage.heartbeat_interval()  # a bad $FMNIST_HEARTBEAT_S: one line before any store is touched
    uri = connection.check_reachable()
    join_cluster(ray_address, storage_url, uri, checked.device, threads)
    dataset = data_mod.load(data_dir, subset=subset)
    experiment_id, launched = launcher.enter(experiment)
    shared = engine.SharedStudy.open(plan, storage_url, plan.study_name, experiment_id)
    launched.point_at(shared.parent_id)
    console.search_opened(shared, storage_url, uri)
    if trials:
        # auto with --seed: one process, the reproducible search that --seed promises
        workers = min(jobs or (1 if seed is not None else 0 if ray_address else
                               hardware.default_jobs(checked.device, trials, subset)), trials)
        hooks = engine.Hooks(progress=console.trial_progress, on_trial_end=console.trial_ended(trials, space.metric),
                             on_wait=on_wait, on_workers=lambda n: click.echo(workers_line(n, shown_threads, jobs, f"--trials {trials}")),
                             on_lost=console.workers_lost)
        shared.run(dataset, jobs=workers, threads=threads, data_dir=data_dir, budget=trials, timeout=timeout, hooks=hooks,
                   ray=ray_address is not None)
    else:  # a confirm only: first wait while other workers' trials run (and redo a lost one), so that every
        # machine confirms the same finished trials
        shared.run(dataset, jobs=1, budget=0, hooks=engine.Hooks(on_wait=on_wait))
    summary = shared.close()
    console.search_summary(summary, space.metric)
    if confirm_k:
        completed = len(confirm.shortlist(shared.study, confirm_k))
        if completed < confirm_k:
            click.echo(f"note: --confirm {confirm_k}: the study has {completed} completed trial(s); confirming those")
        plan_ = confirm.plan(shared, k=confirm_k, seeds=confirm_seeds, race=race, search_line=search_report.search_line(summary))
        console.confirm_opened(plan_)
        n_points = len(plan_.contenders) * len(plan_.seeds)
        hooks = engine.Hooks(on_start=console.confirm_started, on_raced=console.confirm_raced,
                             on_trial_end=console.confirm_ended(space.metric), on_wait=on_wait, on_lost=console.workers_lost,
                             on_workers=lambda n: click.echo(workers_line(n, shown_threads, jobs, "the confirm's points")))
        done = confirm.run_confirm(plan_, dataset, storage_url=storage_url, experiment_id=experiment_id,
                                   jobs=jobs or (0 if ray_address else hardware.default_jobs(checked.device, n_points, subset)),
                                   threads=threads, data_dir=data_dir, hooks=hooks, ray=ray_address is not None)
        console.confirmed(done, space.metric)
    click.echo(f"view it: {links.run_link(shared.parent_id)}")


def join_cluster(address, storage_url: str, uri: str, device: str, threads: int) -> None:
    """With --ray: join the cluster and check that its nodes can share the storage and the tracking store."""
    if address is None:
        return
    from ..studies import cluster

    cluster.connect(address, device)
    cluster.check_shared(storage_url, uri, cluster.hosts())
    click.echo(cluster.describe(device, threads))
