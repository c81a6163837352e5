"""Choose the best finished run, evaluate its model once on the test set, register it, move the alias.

Where a user finds the evaluation: on the selected run itself, as metrics `test_accuracy`, `test_loss`,
`test_nll`, `test_accuracy.<class>` and artifacts `test_evaluation/` (confusion matrix, misclassified
examples, per-class CSV); the same figures are tags on the model version. The alias (default `champion`)
moves only to a version at least as good on the selection metric, unless forced; every move is appended
to the registered model's tag `fmnist.alias_history.<alias>` (JSON: version, previous, reason, time).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Optional

from . import evaluation, plots, tracking
from .data import Split
from .summary import SELECT

MODEL_KINDS = ("train", "sweep-child", "trial")  # run kinds that log a model
TEST_METRICS = ("test_accuracy", "test_loss", "test_nll")


class RegistryError(RuntimeError):
    """Nothing to register, or the registry refused; the message says which."""


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    run_id: str
    select: str
    value: float  # the selected run's selection metric
    test: dict  # test metrics (floats)
    alias: str
    alias_moved: bool
    previous: Optional[str]  # the version that held the alias before, if any
    reason: str


def candidates(*, experiment: Optional[str] = None, parent_run_id: Optional[str] = None,
               run_id: Optional[str] = None) -> list:
    """Finished runs that logged a model: one run, the children of a sweep/search, or a whole experiment."""
    client = tracking.client()
    if run_id:
        run = client.get_run(run_id)
        if run.info.status != "FINISHED":
            raise RegistryError(f"run {run_id} is {run.info.status}, not FINISHED")
        return [run]
    if parent_run_id:
        runs = [r for r in tracking.child_runs(parent_run_id) if r.info.status == "FINISHED"]
    else:
        experiment_id = tracking.experiment_id(experiment)
        if experiment_id is None:
            raise RegistryError(f"experiment {experiment!r} does not exist")
        runs = tracking.find_runs([experiment_id], {}, status="FINISHED")
    return [r for r in runs if r.data.tags.get(tracking.TAG_KIND) in MODEL_KINDS]


def choose(runs: list, select: str):
    scored = [r for r in runs if select in r.data.metrics]
    if not scored:
        raise RegistryError(f"no finished run with a logged model and a {select} metric to choose from")
    pick = max if SELECT[select] else min
    return pick(scored, key=lambda r: r.data.metrics[select])


def evaluate_once(run, test: Split) -> dict:
    """Test metrics of the run's logged model, computed and logged on the run the first time only."""
    if all(m in run.data.metrics for m in TEST_METRICS):
        return {m: run.data.metrics[m] for m in TEST_METRICS}
    model = tracking.load_pyfunc(tracking.model_uri(run.info.run_id))
    result = evaluation.evaluate(model.predict, test, run.data.params.get("loss", "ce"))
    title = f"{run.info.run_name} on the test set: {100 * result['test_accuracy']:.2f}%"
    metrics = {m: result[m] for m in TEST_METRICS}
    per_class = {f"test_accuracy.{name.replace('/', '_').replace(' ', '_')}": acc
                 for name, acc in result["per_class_accuracy"].items()}
    csv = "class,test_accuracy\n" + "".join(f"{k},{v:.4f}\n" for k, v in result["per_class_accuracy"].items())
    tracking.log_to_run(run.info.run_id, metrics={**metrics, **per_class}, texts={"test_evaluation/per_class.csv": csv},
                        figures={"test_evaluation/confusion_matrix.png": plots.confusion(result["confusion"], title),
                                 "test_evaluation/misclassified.png": plots.misclassified(test, result, title)})
    return metrics


def register(run, test: Split, *, name: str, alias: str, select: str, force: bool = False) -> Registration:
    test_metrics = evaluate_once(run, test)
    value = run.data.metrics[select]
    config = {k: run.data.params[k] for k in ("model", "loss", "optimizer", "lr", "dropout", "epochs")
              if k in run.data.params}
    tags = {"source_run_id": run.info.run_id, "config": json.dumps(config), select: f"{value:.6f}",
            **{k: f"{v:.6f}" for k, v in test_metrics.items()}}
    version = tracking.register_model_version(run.info.run_id, name, tags)
    current = tracking.alias_version(name, alias)
    previous = str(current.version) if current else None
    if current is None:
        moved, reason = True, "first holder"
    elif previous == version:
        moved, reason = False, "already holds the alias"
    else:
        held = float(current.tags.get(select, "nan"))
        better = value >= held if SELECT[select] else value <= held
        if better or force:
            moved = True
            reason = f"{select} {value:.4f} vs {held:.4f}" + ("" if better else " (forced)")
        else:
            moved, reason = False, f"version {current.version} is better on {select} ({held:.4f} vs {value:.4f}); use --force"
    if moved:
        tracking.move_alias(name, alias, version)
        entry = {"version": version, "previous": previous, "reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        tracking.append_model_tag_json(name, f"fmnist.alias_history.{alias}", entry)
    return Registration(name, version, run.info.run_id, select, value, test_metrics, alias, moved, previous, reason)


def alias_history(name: str, alias: str) -> list:
    return tracking.model_tag_json(name, f"fmnist.alias_history.{alias}")
