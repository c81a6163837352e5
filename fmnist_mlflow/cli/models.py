"""`fmnist register` and `fmnist predict`: the commands that choose, register and use a logged model."""

from __future__ import annotations

import sys

import click

from ..schema import TAG_CONFIG_NAME
from ..training.config import SELECT as SELECT_METRICS
from .boundary import reported
from .options import check_alias, check_model_name, data_dir_option, experiment_option

DEFAULT_MODEL_URI = "models:/fmnist-cnn@champion"  # what `fmnist register` makes, with its default --name, --alias


@click.command()
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
    from ..tracking import connection, launcher, links, registry
    from ..tracking.queries import run_params
    from ..training import data as data_mod

    connection.check_reachable()
    launched = launcher.release()  # the evaluation runs are new runs, nested under the seeds' runs
    # the narrowest scope given wins: one run, then one sweep/search, then the experiment
    chosen = registry.select_runs(select, experiment=experiment or "fmnist", parent_run_id=parent_run_id or None,
                                  run_id=run_id or None)
    for note in chosen.notes:
        click.echo(f"note: {note}")
    run = chosen.pick
    seeds = len(chosen.runs)
    click.echo(f"selected {run.data.tags.get(TAG_CONFIG_NAME, run.info.run_name)}, {chosen.decided_by}: {select} "
               + (f"mean {chosen.value.mean:.4f} over {seeds} seeds; registering seed "
                  f"{run_params(run).get('seed')} ({run.info.run_id}), the best of them on {select}"
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
    launched.point_at(result.run_id)
    click.echo(f"view it: {links.run_link(result.run_id)}")
    for entry in registry.alias_history(name, alias):
        previous = f"previous {entry['previous']}" if entry["previous"] else "the first"
        click.echo(f"  history: {entry['time']} version {entry['version']} ({previous}): {entry['reason']}")


@click.command()
@click.option("--model-uri", default=DEFAULT_MODEL_URI, show_default=True,
              help="models:/NAME@ALIAS (default: the registered champion), models:/MODEL_ID (printed by train), "
              "models:/NAME/VERSION, runs:/RUN_ID/RUN_NAME (the model is named like its run), a path...")
@click.option("--top-k", type=click.IntRange(1, 10), default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@reported
def predict(model_uri, top_k, as_json, inputs) -> None:
    """Classify PNG/JPEG images and .npy arrays with a logged or registered model (via mlflow.pyfunc).

    Output: class names with probabilities (softmax of the model's logits). An unreadable input is
    reported and skipped; the exit code is 1 if any input failed.
    """
    import json

    from ..tracking import connection, logged_models
    from ..training.data import CLASS_NAMES
    from ..training.inputs import InputError

    if model_uri.startswith(("models:", "runs:")):
        connection.check_reachable()  # a registry lookup: fail in seconds if the tracking store is not there
    try:
        model = logged_models.load_pyfunc(model_uri)
    except Exception as exc:  # MLflow raises several kinds for a bad URI; what it says comes first
        missing = logged_models.missing_alias(model_uri)
        raise click.ClickException(f"cannot load model {model_uri}: {missing or str(exc).splitlines()[0]}") from None
    names = (model.metadata.metadata or {}).get("class_names", list(CLASS_NAMES))
    # which model answers: an alias moves, so say the version it points at now (stderr with --json)
    click.echo(f"model: {logged_models.describe_uri(model_uri)}", err=as_json)
    results, failed = [], 0
    for path in inputs:
        try:
            answers = logged_models.classify(model, path, top_k, names)
        except InputError as exc:
            failed += 1
            click.echo(f"error: {exc}", err=True)
            continue
        results += answers
        for a in [] if as_json else answers:
            note = f"  ({a['note']})" if a["note"] else ""
            click.echo(f"{a['input']}: " + ", ".join(f"{t['class']} {t['probability']:.3f}" for t in a["top_k"]) + note)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    if failed:
        sys.exit(1)
