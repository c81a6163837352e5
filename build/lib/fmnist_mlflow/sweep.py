"""The fixed grid as nested MLflow runs: one parent per sweep, one child per config; resumable.

A sweep is identified by the digest of its configs (tag `fmnist.sweep`). Running the same sweep again in
the same experiment resumes its parent and skips the configs whose child FINISHED; FAILED and KILLED ones
run again. A config that diverges fails alone; the others go on. When the configs are done, the parent
gets the summary table (CSV, Markdown), the loss curves per loss function, the accuracy chart, and the
best config by the selection metric (as tags and metrics: a resumed sweep may change its best, and
MLflow params cannot change).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import plots, runs, summary, tracking, train
from .data import Dataset
from .grid import Grid, sweep_digest

TAG_SWEEP = "fmnist.sweep"
TAG_BEST_RUN = "fmnist.best_run_id"

# (index among configs to run, how many to run, config, seconds elapsed, estimated seconds left or None)
StartCallback = Callable[[int, int, object, float, Optional[float]], None]
# config -> (on_epoch_end, on_batch) for that config's run
ProgressFactory = Callable[[object], tuple]


@dataclass
class SweepResult:
    parent_run_id: str
    rows: list  # summary rows, one per (config, seed), in grid order
    configs: list  # summary.ConfigRow per config, aggregated over seeds
    best: Optional[summary.ConfigRow]  # best config by the seed mean of the selection metric
    skipped: int  # (config, seed) runs already FINISHED in an earlier attempt
    failed: list = field(default_factory=list)  # rows of runs that did not finish
    markdown: str = ""
    histories: dict = field(default_factory=dict)  # (model, loss, optimizer) -> {seed: per-epoch metrics}


def run_sweep(
    grid: Grid,
    configs: list,
    data: Dataset,
    *,
    experiment_id: str,
    select: str = "val_accuracy",
    on_start: Optional[StartCallback] = None,
    progress: Optional[ProgressFactory] = None,
    jobs: int = 1,
    data_dir: Optional[str] = None,
    threads: int = 0,
) -> SweepResult:
    """Run `configs` under the grid's parent run (resumed if it exists) and summarize them on it.

    With `jobs > 1` the configs still to run go to that many worker processes (each loads the data
    itself, from `data_dir`), which take the next config from a shared queue when one finishes.
    """
    digest = sweep_digest(configs)
    parent_id = None
    if not tracking.inside_mlflow_run():  # inside `mlflow run` the parent is the run it created
        earlier = tracking.find_runs([experiment_id], {TAG_SWEEP: digest, tracking.TAG_KIND: "sweep"})
        parent_id = earlier[0].info.run_id if earlier else None
    with tracking.run(grid.name, kind="sweep", run_id=parent_id, tags={TAG_SWEEP: digest},
                      experiment_id=experiment_id) as parent:
        parent_id = parent.info.run_id
        tracking.log_params_once(sweep_params(grid, configs))
        tracking.set_tags(tracking.environment_tags(configs[0].device))
        tracking.reap_orphans(parent_id)
        finished = {
            child.data.tags.get(tracking.TAG_CONFIG_HASH)
            for child in tracking.child_runs(parent_id)
            if child.info.status == "FINISHED"
        }
        # seed by seed: a partial sweep still compares every config on the same seeds
        todo = sorted((c for c in configs if c.digest() not in finished), key=lambda c: c.seed)
        if jobs > 1 and len(todo) > 1:
            run_parallel(todo, parent_id, min(jobs, len(todo)), data_dir, data.subset, threads)
        else:
            run_serial(todo, parent_id, data, on_start, progress)
        result = summarize(parent_id, configs, select)
        result.skipped = len(configs) - len(todo)
        log_summary(result, select)
    return result


def _fit_child(config, data: Dataset, parent_id: str, on_epoch_end=None, on_batch=None) -> None:
    try:
        runs.tracked_fit(config, data, kind="sweep-child", parent_run_id=parent_id,
                         on_epoch_end=on_epoch_end, on_batch=on_batch)
    except train.DivergedError:
        pass  # the child ended FAILED with its reason; the summary reports it. Anything else (the tracking
        # server gone, out of memory) would fail every config alike: it stops the sweep.


def run_serial(todo: list, parent_id: str, data: Dataset, on_start, progress) -> None:
    started = time.monotonic()
    for k, config in enumerate(todo):
        elapsed = time.monotonic() - started
        if on_start is not None:
            on_start(k, len(todo), config, elapsed, elapsed / k * (len(todo) - k) if k else None)
        on_epoch_end, on_batch = progress(config) if progress else (None, None)
        _fit_child(config, data, parent_id, on_epoch_end, on_batch)


def run_parallel(todo: list, parent_id: str, jobs: int, data_dir: Optional[str], subset: int, threads: int = 0) -> None:
    import multiprocessing

    from . import parallel

    queue = multiprocessing.get_context("spawn").Queue()
    for config in sorted(todo, key=lambda c: (c.seed, c.model != "model3")):  # seed by seed, slow model3 first
        queue.put(config)
    parallel.run_workers(worker, [(queue, parent_id, data_dir, subset)] * jobs, tracking.tracking_uri(), threads)


def worker(queue, parent_id: str, data_dir: Optional[str], subset: int) -> None:
    """A `--jobs` worker process: take configs from the queue until it is empty."""
    import queue as queue_mod

    from .data import load

    data = load(data_dir, subset=subset)
    while True:
        try:
            config = queue.get(timeout=1)
        except queue_mod.Empty:
            return
        _fit_child(config, data, parent_id)
        print(f"done: {config.run_name}", flush=True)


def sweep_params(grid: Grid, configs: list) -> dict:
    first = configs[0]
    return {
        "grid_name": grid.name, "grid_file": os.path.basename(grid.source), "configs": len(configs),
        "epochs": first.epochs, "batch_size": first.batch_size,
        "seeds": ",".join(str(s) for s in sorted({c.seed for c in configs})), "subset": first.subset,
        "device": first.device,
    }  # fmt: skip


def summarize(parent_id: str, configs: list, select: str) -> SweepResult:
    """One row per (config, seed) from its newest child (a FINISHED one if any), in grid order."""
    by_hash: dict = {}
    for child in tracking.child_runs(parent_id):  # newest first
        key = child.data.tags.get(tracking.TAG_CONFIG_HASH)
        if key not in by_hash or (by_hash[key].info.status != "FINISHED" and child.info.status == "FINISHED"):
            by_hash[key] = child
    rows, histories = [], {}
    for config in configs:
        child = by_hash.get(config.digest())
        if child is None:
            rows.append(summary.row(config, "NOT RUN", [], ""))
            continue
        history = tracking.history(child.info.run_id)
        if child.info.status == "FINISHED":
            histories.setdefault((config.model, config.loss, config.optimizer), {})[config.seed] = history
        rows.append(summary.row(config, child.info.status, history, child.info.run_id))
    aggregated = summary.aggregate(rows, select)
    return SweepResult(parent_run_id=parent_id, rows=rows, configs=aggregated, best=summary.best(aggregated),
                       skipped=0, failed=[r for r in rows if r["status"] != "FINISHED"],
                       markdown=summary.to_markdown(rows, select), histories=histories)


def log_summary(result: SweepResult, select: str) -> None:
    tracking.log_text(summary.to_csv(result.rows), "summary.csv")
    tracking.log_text(summary.configs_csv(result.configs, select), "summary_by_config.csv")
    tracking.log_text(result.markdown, "summary.md")
    if result.histories:
        tracking.log_figure(plots.sweep_curves(result.histories), "loss_curves.png")
    done = [c for c in result.configs if c.val_accuracy is not None]
    if done:
        tracking.log_figure(plots.accuracy_bars(done), "val_accuracy.png")
    failed = [f"{r['model']}-{r['loss']}-{r['optimizer']}" + (f" seed {r['seed']}" if len(result.rows) > len(result.configs) else "")
              for r in result.failed]
    tags = {"fmnist.failed_configs": ", ".join(failed) or "none", "fmnist.select": select}
    if result.best:
        b = result.best
        tied = [c.name for c in result.configs if c.same_as_best and not c.is_best]
        tags.update({TAG_BEST_RUN: b.best_run_id, "best_model": b.model, "best_loss": b.loss,
                     "best_optimizer": b.optimizer, "best_lr": str(b.lr), "best_config_group": b.group,
                     "best_n_seeds": str(len(b.seeds)), "best_indistinguishable": ", ".join(tied) or "none"})
        metrics = {"best_val_accuracy": b.val_accuracy.mean, "best_val_nll": b.val_nll.mean}
        if b.val_accuracy.std is not None:
            metrics.update({"best_val_accuracy_std": b.val_accuracy.std, "best_val_accuracy_ci95_low": b.val_accuracy.ci95[0],
                            "best_val_accuracy_ci95_high": b.val_accuracy.ci95[1]})
        tracking.log_metrics(metrics)
    tracking.set_tags(tags)
