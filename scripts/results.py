"""Headline figures for experiments/results.json and REGISTRY.md, read from a tracking store.

For the grid champion (the sweep's best config by the seed mean of val_accuracy), the report's pick
(model3 + BCE + SGD, from the same sweep) and the search champion (the config `fmnist search --confirm`
named, over its confirm seeds: the runs `fmnist register` registers it with), every seed run is evaluated
once on the test set (as `fmnist register` does: metrics logged on the run, reused when present), and test
accuracy is given as mean, standard deviation and 95% interval over seeds; Welch's t-test compares the
search champion with the grid champion (and with the previous search champion, with `--grid-from`).
`search_study` says how the search ended: its trials, why it stopped, and the minutes from the search
parent's start to the registered champion's last update (`time_to_champion_min`: from an empty store, the
time a user waits for the README's search commands).

    cd <the folder of the tracking store>
    python <repo>/scripts/results.py --out <repo>/experiments/results.json [--sweep-parent ID] [--search-parent ID]

A search run in a store of its own (no grid in it): `--grid-from <an earlier results.json>` takes the grid
champion and the report's pick from that file, as measured there (its `source` kept under
`source.grid_from`), and keeps that file's search champion as `previous_search_champion`.

The same search commands timed again (another draw of the sampler, from another empty store):
`--earlier-timed <the results.json of the earlier draw>` keeps that draw's champion, how its study ended and
its comparison under `earlier_timed_searches` (a list, oldest first), beside this draw's figures.
"""

from __future__ import annotations

import argparse
import json
import sys

import mlflow
import torch

from fmnist_mlflow.training import data
from fmnist_mlflow.training import scoring
from fmnist_mlflow.tracking import logged_models
from fmnist_mlflow.tracking import registry
from fmnist_mlflow import schema
from fmnist_mlflow.results import stats
from fmnist_mlflow.results.report import REPORT_PICK
from fmnist_mlflow.tracking import records
from fmnist_mlflow.tracking import queries
from fmnist_mlflow.tracking import experiment as experiments

CONFIG_KEYS = ("model", "loss", "optimizer", "lr", "momentum", "dropout", "batch_size", "epochs", "weight_decay",
               "schedule", "warmup", "label_smoothing", "augment", "width", "ema", "tta")


def newest(kind: str, tag: str) -> str:
    experiment = experiments.find_experiment("fmnist")
    found = [r for r in queries.find_runs([experiment], {schema.TAG_KIND: kind}) if tag in r.data.tags]
    if not found:
        sys.exit(f"no {kind} parent run with tag {tag}")
    return found[0].info.run_id


def group_runs(parent_id: str, params: dict = {}, **tags) -> list:
    return [r for r in queries.child_runs(parent_id) if r.info.status == "FINISHED"
            and r.data.tags.get(schema.TAG_KIND) in registry.MODEL_KINDS
            and all(r.data.tags.get(k) == v for k, v in tags.items())
            and all(r.data.params.get(k) == v for k, v in params.items())]


def on_test(runs: list, test) -> dict:
    """Test accuracy over the seed runs, in their order: each evaluated once, as `fmnist register` does."""
    tests = [registry.evaluate_once(r, test)["test_accuracy"] for r in runs]
    acc = stats.estimate(tests)
    return {"mean": acc.mean, "std": acc.std, "ci95": list(acc.ci95) if acc.ci95 else None, "per_seed": tests}


def describe(runs: list, test) -> dict:
    runs = sorted(runs, key=lambda r: int(r.data.params["seed"]))
    val = stats.estimate([r.data.metrics["val_accuracy"] for r in runs])
    params = runs[0].data.params
    return {
        "config": {k: params[k] for k in CONFIG_KEYS if k in params},
        "name": runs[0].data.tags.get(schema.TAG_CONFIG_NAME),
        "seeds": [int(r.data.params["seed"]) for r in runs],
        "run_ids": [r.info.run_id for r in runs],
        "test_accuracy": on_test(runs, test),
        "val_accuracy": {"mean": val.mean, "std": val.std, "ci95": list(val.ci95) if val.ci95 else None},
        # the logged model as served (with its mirror when tta), one CPU thread: see `scoring.inference_cost`
        "cost": scoring.inference_cost(logged_models.network(logged_models.model_uri(runs[0].info.run_id))),
    }


def contenders_on_test(parent, test) -> dict:
    """Test accuracy over seeds of every confirm contender that got every seed, by config group: reported
    beside the confirm's validation marks, after the selection (which saw validation only), to show whether
    the contenders that validation cannot tell apart differ on test."""
    runs = registry.confirm_runs(parent)
    seeds = sorted(parent.data.tags.get(schema.TAG_CONFIRM_SEEDS, "").split(","), key=int)
    out = {}
    for group in sorted({registry.group_of(r) for r in runs}):
        mine = sorted((r for r in runs if registry.group_of(r) == group and r.data.params["seed"] in seeds),
                      key=lambda r: int(r.data.params["seed"]))
        if [r.data.params["seed"] for r in mine] == seeds:  # one finished run per confirm seed
            out[group] = on_test(mine, test)
    return out


def search_study(parent, test) -> dict:
    """How the search ended: trials by state, why it stopped, the confirm's contenders and marks (with their
    test accuracy, where they got every seed), and the minutes from its parent's start to the registered
    champion (the alias holder of fmnist-cnn)."""
    import csv
    import io

    tags = parent.data.tags
    states = {k[len(schema.TAG_TRIALS) + 1:]: int(v) for k, v in tags.items() if k.startswith(schema.TAG_TRIALS + "_")}
    rows = list(csv.DictReader(io.StringIO(mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/confirm.csv"))))
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("fmnist-cnn", "champion")
    evaluations = [queries.find_runs([parent.info.experiment_id], {"mlflow.parentRunId": run_id,
                                                                   schema.TAG_KIND: schema.KIND_EVALUATION})
                   for run_id in version.tags.get(schema.VERSION_SEED_RUNS, "").split(",") if run_id]
    ended = max([version.last_updated_timestamp] + [r.info.end_time or 0 for found in evaluations for r in found])
    # `ended` counts the champion's evaluations only: the contenders' below are not part of a user's wait
    tested = contenders_on_test(parent, test)
    return {
        "trials": int(tags.get(schema.TAG_TRIALS, 0)), "trial_states": states,
        "stopped_because": tags.get(schema.TAG_STOPPED, ""),
        "confirm_seeds": tags.get(schema.TAG_CONFIRM_SEEDS, ""),
        "confirm": [{"group": r["group"], "rank": r["rank"], "n_seeds": int(r["n_seeds"]), "status": r["status"],
                     "val_accuracy_mean": float(r["val_accuracy_mean"]) if r["val_accuracy_mean"] else None,
                     "p_vs_best": float(r["p_vs_best"]) if r["p_vs_best"] else None, "same_as_best": r["same_as_best"],
                     **({"test_accuracy": tested[r["group"]]} if r["group"] in tested else {})}
                    for r in rows],
        "registered_version": version.version,
        "time_to_champion_min": (ended - parent.info.start_time) / 60000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sweep-parent")
    parser.add_argument("--search-parent")
    parser.add_argument("--grid-from", help="an earlier results.json: its grid figures, for a store without a grid")
    parser.add_argument("--earlier-timed", help="the results.json of an earlier draw of the same timed search commands")
    args = parser.parse_args()
    torch.set_num_threads(1)  # inference times per image on one core, comparable between machines' cores
    search_parent = args.search_parent or newest(schema.KIND_SEARCH, schema.TAG_CONFIRM_STUDY)
    parent = queries.get_run(search_parent)
    test = data.load_test()
    selection = registry.confirmed(parent, "val_accuracy")  # the confirm's runs of its champion, as registered
    search = describe(selection.runs, test)
    if args.grid_from:
        with open(args.grid_from) as fh:
            earlier = json.load(fh)
        out = {"grid_champion": earlier["grid_champion"], "search_champion": search,
               "report_pick": earlier["report_pick"], "previous_search_champion": earlier["search_champion"]}
        sweep_parent = None
    else:
        sweep_parent = args.sweep_parent or newest(schema.KIND_SWEEP, schema.TAG_BEST_GROUP)
        sweep_tags = queries.get_run(sweep_parent).data.tags
        out = {
            "grid_champion": describe(group_runs(sweep_parent, **{
                schema.TAG_CONFIG_GROUP: sweep_tags[schema.TAG_BEST_GROUP]}), test),
            "search_champion": search,
            "report_pick": describe(group_runs(sweep_parent, dict(zip(("model", "loss", "optimizer"), REPORT_PICK))),
                                    test),
        }
    grid, search = out["grid_champion"]["test_accuracy"], out["search_champion"]["test_accuracy"]
    out["search_vs_grid"] = {
        "test_accuracy_gain_points": 100 * (search["mean"] - grid["mean"]),
        "welch_p": stats.welch_p(search["per_seed"], grid["per_seed"]),
    }
    if "previous_search_champion" in out:
        previous = out["previous_search_champion"]["test_accuracy"]
        out["search_vs_previous_search"] = {
            "test_accuracy_gain_points": 100 * (search["mean"] - previous["mean"]),
            "welch_p": stats.welch_p(search["per_seed"], previous["per_seed"]),
        }
    out["search_study"] = search_study(parent, test)
    out["source"] = {"sweep_parent_run_id": sweep_parent, "search_parent_run_id": search_parent,
                     "commit": records.git_commit(), "test_images": len(test),
                     "search_commit": parent.data.tags.get("mlflow.source.git.commit")}  # the code the search ran
    if args.grid_from:
        out["source"]["grid_from"] = earlier["source"]
    if args.earlier_timed:
        with open(args.earlier_timed) as fh:
            draw = json.load(fh)
        if draw["source"]["search_parent_run_id"] == search_parent:
            sys.exit(f"--earlier-timed {args.earlier_timed}: that file is this search's ({search_parent}), not an earlier draw's")
        out["earlier_timed_searches"] = draw.get("earlier_timed_searches", []) + [{
            key: draw[key] for key in ("search_champion", "search_study", "search_vs_previous_search") if key in draw}
            | {"source": {k: v for k, v in draw["source"].items() if k in ("search_parent_run_id", "commit", "search_commit")}}]
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2)
        fh.write("\n")
    print("| | config | seeds | test accuracy mean ± std | 95% CI | val accuracy mean | weights | ms/image batch 1 | ms/image batch 256 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in [k for k in ("grid_champion", "search_champion", "report_pick", "previous_search_champion") if k in out]:
        r = out[key]
        t, v = r["test_accuracy"], r["val_accuracy"]
        ci = f"[{100 * t['ci95'][0]:.2f}, {100 * t['ci95'][1]:.2f}]" if t["ci95"] else "n/a"
        config = ", ".join(f"{k}={v}" for k, v in r["config"].items())
        print(f"| {key} | {config} | {', '.join(map(str, r['seeds']))} | {100 * t['mean']:.2f}% ± "
              f"{100 * (t['std'] or 0):.2f} | {ci} | {100 * v['mean']:.2f}% | {r['cost']['parameters']:,} | "
              f"{r['cost']['ms_per_image_batch1']:.3f} | {r['cost']['ms_per_image_batch256']:.4f} |")
    print(json.dumps(out["search_vs_grid"]))


if __name__ == "__main__":
    main()
