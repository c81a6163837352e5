"""The `fmnist` command: a thin shell that parses options, builds a config, calls the library and reports.

Bad values are rejected by Click types before any work (exit 2); library errors become one readable
line (exit 1); Ctrl-C and SIGTERM end the open MLflow run KILLED and exit 130.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Optional

import click

from . import config as cfg
from .cli_options import (build_config, check_alias, check_model_name, check_timeout, config_options, confirm_seeds, data_dir_option, device_options, epochs_option, experiment_option,
                          jobs_option, race_options, storage_options, subset_option, system_metrics_option, tracking_options)
from .console import EpochProgress, duration, on_wait, workers_line
from .pruners import CATALOGUE, PRUNERS
from .space import SAMPLERS
from .config import SELECT as SELECT_METRICS

EXIT_INTERRUPTED = 130
DEFAULT_MODEL_URI = "models:/fmnist-cnn@champion"  # what `fmnist register` makes, with its default --name, --alias


def use_threads(threads: int) -> int:
    """Set this process's torch CPU threads (0 keeps torch's default: all cores); returns the count."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def store_errors() -> tuple:
    """The exception classes of the tracking and Optuna stores that were imported: an error cannot come from
    a library that was never imported, so a usage error answers before MLflow (seconds) is loaded."""
    where = (("mlflow.exceptions", "MlflowException"), ("requests", "RequestException"),
             ("sqlalchemy.exc", "SQLAlchemyError"))
    return tuple(getattr(sys.modules[m], name) for m, name in where if m in sys.modules)


def exception_chain(exc: BaseException, depth: int = 12) -> list:
    """`exc`, then what it was raised from or while handling, and so on."""
    chain = [exc]
    while len(chain) < depth:
        last = chain[-1]
        before = last.__cause__ or (None if last.__suppress_context__ else last.__context__)
        if before is None:
            break
        chain.append(before)
    return chain


def interrupted_line() -> str:
    """What an interrupt ended: the runs this process ended KILLED, or that none was open (e.g. predict)."""
    tracking = sys.modules.get(f"{__package__}.tracking")
    ended = tracking.INTERRUPTED if tracking else []
    if not ended:
        return "interrupted (no run was open)"
    return f"interrupted: run{'s' if len(ended) > 1 else ''} {', '.join(ended)} ended KILLED"


def reported(fn):
    """Turn library errors into one readable line (exit 1) and interrupts into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from . import parallel
        from .errors import FmnistError

        try:
            with parallel.sigterm_as_interrupt():
                return fn(*args, **kwargs)
        except FmnistError as exc:
            raise click.ClickException(str(exc)) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # already what the user sees
        except Exception as exc:
            # a store or file-system error, raised as it is or behind another library's error (Optuna, failing
            # to record a failed trial on a full disk, ends in an AssertionError whose context is the store's)
            chain, stores = exception_chain(exc), store_errors()
            found = next((e for e in chain if isinstance(e, stores + (OSError,))), None)
            if found is None:
                raise
            from . import connection

            if not isinstance(found, stores):  # a file-system error
                raise click.ClickException(connection.describe_os_error(found)) from None
            optuna_store = any(type(e).__name__ == "StorageInternalError" for e in chain)
            raise click.ClickException(connection.describe_failure(found, "the Optuna storage" if optuna_store
                                                                   else None)) from None
        except KeyboardInterrupt:
            click.echo(interrupted_line(), err=True)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper


# Bounded HTTP retries to the tracking server: MLflow's defaults (7 retries, backoff factor 2, 120 s
# timeout) kept a sweep hanging for about 16 minutes when the server died. The user's own settings win;
# worker processes inherit these.
# Also quieter MLflow: its INFO lines and a "View run" line per run buried the command's own output (a
# sweep printed 19 pairs); the commands print their own links. And no usage telemetry: MLflow 3 sends
# events to its own servers from every process; these commands talk to the tracking store alone.
MLFLOW_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_LOGGING_LEVEL": "WARNING",
                   "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}


def entry() -> None:
    """The `fmnist` program: the command group, and an interrupted command's process exits at once (its runs
    were ended KILLED before; see `parallel.exit_now`)."""
    try:
        main(prog_name="fmnist")
    except SystemExit as exc:
        if exc.code == EXIT_INTERRUPTED:
            from .parallel import exit_now

            exit_now(EXIT_INTERRUPTED)
        raise


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fmnist-mlflow", prog_name="fmnist")
def main() -> None:
    """Train, sweep, search and register Fashion-MNIST CNNs, tracked with MLflow.

    Runs go to $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the current folder; browse them with
    `mlflow ui --backend-store-uri sqlite:///mlflow.db`.
    """
    for key, value in MLFLOW_DEFAULTS.items():
        os.environ.setdefault(key, value)


@main.command()
@data_dir_option
@reported
def data(data_dir: Optional[str]) -> None:
    """Locate Fashion-MNIST, verify its four files, and show the train/validation split."""
    from . import data as data_mod
    from . import hardware

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
    from . import data as data_mod
    from . import connection, runs, tracking

    use_threads(threads)
    uri = connection.check_reachable()
    dataset = data_mod.load(data_dir, subset=config.subset)
    tracking.use_experiment(experiment)
    click.echo(f"{config.run_name}: {dataset.sizes['train_size']:,} train / {dataset.sizes['val_size']:,} val "
               f"images on {config.device}; tracking to {tracking.redact(uri)}")
    progress = EpochProgress(config)
    result = runs.tracked_fit(config, dataset, on_epoch_end=progress.on_epoch_end, on_batch=progress.on_batch)
    tracking.point_launcher_at(result.run_id)
    click.echo(f"run {result.run_id} FINISHED; model: {result.model_uri}")
    click.echo(f"view it: {tracking.run_link(result.run_id)}")


@main.command()
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
@storage_options("the grid's name, a digest of its configs, a stamp of the experiment")
@epochs_option(0, "Epochs per config (0: the grid's own, 10 for the report's grid).", low=0)
@subset_option
@experiment_option("MLflow experiment name; $MLFLOW_EXPERIMENT_NAME if set.")
@data_dir_option
@reported
def sweep(grid_file, select, seeds, race, device, precision, threads, jobs, storage, study_name, epochs, subset,
          experiment, data_dir) -> None:
    """Run every config of a grid as nested runs under one parent; resumable (finished configs are skipped).

    The grid is an Optuna study: any number of `fmnist sweep` workers with the same options, on machines
    that share --storage and the tracking server, share its configs; a lost worker's config is retried."""
    import time

    from . import grid as grid_mod

    try:  # usage errors before torch and MLflow are imported
        grid = grid_mod.load_grid(grid_file or grid_mod.DEFAULT_GRID)
        # "grid" (MLproject's default) or none given: the grid file's seeds
        seed_list = grid_mod.parse_seeds(seeds) if seeds is not None and seeds.strip() != "grid" else None
        configs = grid.configs(epochs=epochs, subset=subset, device=device, precision=precision, seeds=seed_list)
    except (grid_mod.SpecError, cfg.ConfigError) as exc:
        raise click.UsageError(str(exc)) from None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--seeds") from None
    from . import data as data_mod
    from . import connection, engine, hardware, tracking
    from . import sweep as sweep_mod

    use_threads(threads)
    engine.heartbeat_interval()  # a bad $FMNIST_HEARTBEAT_S: one line before any store is touched
    uri = connection.check_reachable()
    dataset = data_mod.load(data_dir, subset=subset)
    experiment_id = tracking.use_experiment(experiment)
    n_seeds = len({c.seed for c in configs})
    click.echo(f"sweep {grid.name}: {len(configs) // n_seeds} configs x {n_seeds} seed(s) x {configs[0].epochs} epochs on {configs[0].device}, "
               f"{dataset.sizes['train_size']:,} train / {dataset.sizes['val_size']:,} val images; tracking to {tracking.redact(uri)}")
    started = time.monotonic()

    def on_start(k, n, config, elapsed, eta):
        left = "" if eta is None else f", ~{duration(eta)} left"
        click.echo(f"[{k + 1}/{n}] {config.label} (elapsed {duration(elapsed)}{left})")

    def progress(trial, config):
        bar = EpochProgress(config, prefix="  ")
        return bar.on_epoch_end, bar.on_batch

    def on_raced(config, why):
        click.echo(f"{config.label} seed {config.seed}: raced out, not run ({why.split(';')[0]})")

    hooks = engine.Hooks(on_start=on_start, progress=progress, on_wait=on_wait, on_raced=on_raced,
                         on_workers=lambda n: click.echo(workers_line(n, threads, jobs, f"the {n} point(s) left")))
    result = sweep_mod.run_sweep(grid, configs, dataset, experiment_id=experiment_id, select=select, storage_url=storage,
                                 study_name=study_name, jobs=jobs or hardware.default_jobs(configs[0].device, len(configs), subset),
                                 data_dir=data_dir, threads=threads, race=race, hooks=hooks)
    tracking.point_launcher_at(result.parent_run_id)
    click.echo("")
    click.echo(result.markdown)
    if result.skipped:
        click.echo(f"{result.skipped} (config, seed) run(s) had already finished in an earlier attempt and were skipped.")
    if result.failed:
        names = ", ".join(f"{r['model']}-{r['loss']}-{r['optimizer']} ({r['status']})" for r in result.failed)
        click.echo(f"did not finish: {names}", err=True)
    click.echo(f"study {result.study_name} in {tracking.redact(storage)}; parent run {result.parent_run_id}, {duration(time.monotonic() - started)} wall time")
    click.echo(f"view it: {tracking.run_link(result.parent_run_id)}")


@main.command()
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
@click.option("--confirm", "confirm_k", type=click.IntRange(min=0), default=0, show_default=True,
              help="After the trials, re-run the K best with --seeds seeds each and name the champion by the mean.")
@click.option("--seeds", "confirm_seeds", default="3", show_default=True, metavar="N|1,2,3", callback=confirm_seeds,
              help="Seeds for --confirm: a count N (fresh seeds 1..N, not the search's own seed 0) or a list.")
@race_options("Race --confirm's contenders: seed by seed, one already shown worse than the leader (the main job's "
              "test) gets no more seeds, so the champion is one that got them all. `--race false` or --no-race: "
              "every contender gets every seed.")
@jobs_option
@device_options
@system_metrics_option
@tracking_options
@reported
def search(trials, timeout, storage, study_name, space_file, sampler, pruner, seed, confirm_k, confirm_seeds, race, jobs,
           device, precision, threads, epochs, subset, experiment, data_dir) -> None:
    """Search model3's training settings with Optuna (the space file says which: optimizer and learning rate,
    dropout, weight decay, schedule, batch size, label smoothing, augmentation, width, weight average); each
    trial a nested run under the study's parent run; --confirm re-runs the best on fresh seeds."""
    from .space import DEFAULT_SPACE, SpecError, load_space

    if trials == 0 and not confirm_k:
        raise click.UsageError("--trials 0 runs nothing; add --confirm K to confirm an existing study's best trials")
    try:  # usage errors before any study or run (and before torch, MLflow and Optuna are imported)
        space = load_space(space_file or DEFAULT_SPACE)
    except SpecError as exc:
        raise click.UsageError(str(exc)) from None
    # device and precision resolved once, for every worker
    checked = build_config(device=device, subset=subset, epochs=epochs, precision=precision)
    from . import confirm, connection, console, engine, hardware, search as search_mod, tracking
    from . import data as data_mod

    settings = search_mod.SearchSettings(epochs, subset, checked.device, checked.precision)
    plan = search_mod.Search(study_name or space.name, space, settings, sampler, pruner, seed)
    use_threads(threads)
    engine.heartbeat_interval()  # a bad $FMNIST_HEARTBEAT_S: one line before any store is touched
    uri = connection.check_reachable()
    dataset = data_mod.load(data_dir, subset=subset)
    shared = engine.SharedStudy.open(plan, storage, plan.study_name, tracking.use_experiment(experiment))
    tracking.point_launcher_at(shared.parent_id)
    console.search_opened(shared, storage, uri)
    if trials:
        # auto with --seed: one process, the reproducible search that --seed promises
        workers = min(jobs or (1 if seed is not None else hardware.default_jobs(checked.device, trials, subset)), trials)
        hooks = engine.Hooks(progress=console.trial_progress, on_trial_end=console.trial_ended(trials, space.metric),
                             on_wait=on_wait, on_workers=lambda n: click.echo(workers_line(n, threads, jobs, f"--trials {trials}")))
        shared.run(dataset, jobs=workers, threads=threads, data_dir=data_dir, budget=trials, timeout=timeout, hooks=hooks)
    console.search_summary(shared.close(), space.metric)
    if confirm_k:
        done = confirm.confirm(shared, dataset, k=confirm_k, seeds=confirm_seeds, race=race,
                               on_start=console.confirm_started, on_raced=console.confirm_raced)
        console.confirmed(done, space.metric)
    click.echo(f"view it: {tracking.run_link(shared.parent_id)}")


@main.command()
@experiment_option("Choose among all finished runs of this experiment ($MLFLOW_EXPERIMENT_NAME if set).")
@click.option("--parent-run-id", default="", help="Choose among the children of one sweep or search instead.")
@click.option("--run-id", default="", help="Register this one run instead.")
@click.option("--select", type=click.Choice(list(SELECT_METRICS)), default="val_accuracy", show_default=True,
              help="Validation metric that picks the run and decides whether the alias moves.")
@click.option("--name", default="fmnist-cnn", show_default=True, callback=check_model_name,
              help="Registered model name.")
@click.option("--alias", default="champion", show_default=True, callback=check_alias,
              help="Alias to point at the new version.")
@click.option("--force", is_flag=True, help="Move the alias even to a version worse on --select.")
@data_dir_option
@reported
def register(experiment, parent_run_id, run_id, select, name, alias, force, data_dir) -> None:
    """Pick the best finished run, evaluate it once on the test set, register it and move the alias."""
    from . import data as data_mod
    from . import connection, registry, tracking

    connection.check_reachable()
    tracking.release_mlflow_run()  # the evaluation runs are new runs, nested under the seeds' runs
    # the narrowest scope given wins: one run, then one sweep/search, then the experiment
    runs = registry.candidates(experiment=experiment or "fmnist", parent_run_id=parent_run_id or None,
                               run_id=run_id or None)
    chosen = registry.choose(runs, select)
    for note in chosen.notes:
        click.echo(f"note: {note}")
    run = chosen.pick
    seeds = len(chosen.runs)
    click.echo(f"selected {run.data.tags.get(tracking.TAG_CONFIG_NAME, run.info.run_name)} among "
               f"{chosen.considered} comparable config(s): {select} "
               + (f"mean {chosen.value.mean:.4f} over {seeds} seeds; registering seed "
                  f"{tracking.run_params(run).get('seed')} ({run.info.run_id}), the best of them on {select}"
                  if seeds > 1 else f"{chosen.value.mean:.4f} (run {run.info.run_id})"))
    folder = data_mod.locate(data_dir)
    result = registry.register(chosen, data_mod.load_test(folder), test_source=str(folder), name=name, alias=alias,
                               select=select,
                               force=force)
    test = result.test
    click.echo(f"test set: accuracy {100 * test['test_accuracy']:.2f}%, loss {test['test_loss']:.4f}, "
               f"nll {test['test_nll']:.4f} (the evaluation runs nested under each seed's run)")
    acc = result.test_accuracy
    if acc.std is not None:
        click.echo(f"test accuracy over the config's {acc.n} seeds: mean {100 * acc.mean:.2f}% ± {100 * acc.std:.2f}, "
                   f"95% CI [{100 * acc.ci95[0]:.2f}, {100 * acc.ci95[1]:.2f}]%")
    moved = f"moved to version {result.version}" if result.alias_moved else "not moved"
    click.echo(f"registered {name} version {result.version}; alias {alias} {moved} ({result.reason})")
    tracking.point_launcher_at(result.run_id)
    click.echo(f"view it: {tracking.run_link(result.run_id)}")
    for entry in registry.alias_history(name, alias):
        previous = f"previous {entry['previous']}" if entry["previous"] else "the first"
        click.echo(f"  history: {entry['time']} version {entry['version']} ({previous}): {entry['reason']}")


@main.command()
@click.option("--model-uri", default=DEFAULT_MODEL_URI, show_default=True,
              help="models:/NAME@ALIAS (default: the registered champion), models:/MODEL_ID (printed by train), "
              "models:/NAME/VERSION, runs:/RUN/CONFIG_NAME, a path...")
@click.option("--top-k", type=click.IntRange(1, 10), default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@reported
def predict(model_uri, top_k, as_json, inputs) -> None:
    """Classify PNG/JPEG images and .npy arrays with a logged or registered model (via mlflow.pyfunc).

    Output: class names with probabilities (softmax of the model's logits). An unreadable input is
    reported and skipped; the exit code is 1 if any input failed.
    """
    from . import data as data_mod
    import json

    from . import connection, model_store, predict as predict_mod

    if model_uri.startswith(("models:", "runs:")):
        connection.check_reachable()  # a registry lookup: fail in seconds if the tracking store is not there
    try:
        model = model_store.load_pyfunc(model_uri)
    except Exception as exc:  # MLflow raises several kinds for a bad URI
        missing = model_store.missing_alias(model_uri)
        if missing:
            raise click.ClickException(f"cannot load model {model_uri}: {missing}") from None
        raise click.ClickException(f"cannot load model {model_uri}: {str(exc).splitlines()[0]}") from None
    names = (model.metadata.metadata or {}).get("class_names", list(data_mod.CLASS_NAMES))
    # which model answers: an alias moves, so say the version it points at now (stderr with --json)
    click.echo(f"model: {model_store.describe_uri(model_uri)}", err=as_json)
    results, failed = [], 0
    for path in inputs:
        try:
            batch = predict_mod.read_input(path)
            probabilities = predict_mod.softmax(model.predict(predict_mod.model_input(model, batch.images)))
        except predict_mod.InputError as exc:
            failed += 1
            click.echo(f"error: {exc}", err=True)
            continue
        for i, top in enumerate(predict_mod.top_k(probabilities, top_k, names)):
            label = path if len(batch.images) == 1 else f"{path}[{i}]"
            results.append({"input": label, "note": batch.note, "top_k": top})
            if not as_json:
                note = f"  ({batch.note})" if batch.note else ""
                click.echo(f"{label}: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in top) + note)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    if failed:
        sys.exit(1)


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

    from . import bench as bench_mod

    plan = bench_mod.QUICK if quick else bench_mod.FULL
    result = bench_mod.run(plan, build_config(device=device).device, report=click.echo)
    click.echo(json.dumps(result))


if __name__ == "__main__":
    main()
