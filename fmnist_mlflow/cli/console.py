"""What the `fmnist` commands print while they work and when they are done: a progress bar and a line per
epoch, a line per trial, waiting notes, a search's summary and its confirm step, short params and durations.
Light on purpose: click at import; what a function prints from is passed in."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from ..training import config as cfg

if TYPE_CHECKING:  # torch stays out of `fmnist --help`
    from ..training.train import EpochMetrics


class EpochProgress:
    """A progress bar per epoch on a terminal, and one summary line per epoch. Where stderr is not a
    terminal (a log file, `mlflow run`), click would print the bar's label as a line of its own before
    every epoch's line: there the bar is left out."""

    def __init__(self, config: cfg.RunConfig, prefix: str = "", name: str = ""):
        self.config = config
        self.prefix = prefix
        self.name = name or config.label  # what the lines call the run
        self.bar = None
        self.epoch = 1
        self.interactive = sys.stderr.isatty()

    def on_batch(self, done: int, total: int) -> None:
        if not self.interactive:
            return
        if self.bar is None:
            label = f"{self.prefix}{self.name} epoch {self.epoch}/{self.config.epochs}"
            self.bar = click.progressbar(length=total, label=label, file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(1)
        if done == total:
            self.bar.__exit__(None, None, None)
            self.bar = None

    def on_epoch_end(self, m: "EpochMetrics") -> None:
        click.echo(
            f"{self.prefix}{self.name} epoch {m['epoch']:>2}/{self.config.epochs}  "
            f"train_loss {m['train_loss']:.4f}  val_loss {m['val_loss']:.4f}  val_nll {m['val_nll']:.4f}  "
            f"val_acc {100 * m['val_accuracy']:.2f}%  {m['epoch_seconds']:.1f}s"
        )
        self.epoch = m["epoch"] + 1


def on_wait(running: int) -> None:
    click.echo(f"waiting for {running} trial(s) running in other workers (one whose worker is lost is "
               "failed and retried once its heartbeats stop)")


def workers_lost(n: int) -> None:
    click.echo(f"{n} worker(s) were lost (killed by a signal); the others failed their trials once their heartbeats "
               "stopped and redid that work (the parent's tag fmnist.retried counts it)", err=True)


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def workers_line(workers: int, threads: int, asked: int, cap: str) -> str:
    """What `--jobs` became: workers and their threads, and why fewer than asked."""
    from ..studies.workers import threads_per_worker

    capped = f" (--jobs {asked} capped at {cap})" if asked and asked > workers else ""
    return f"{workers} workers, {threads or threads_per_worker(workers)} CPU thread(s) each{capped}"


def trial_progress(trial, config) -> tuple:
    """(on_epoch_end, on_batch) for a trial's run: a bar and a line per epoch, prefixed with its number and
    named like its run (with the config's digest: trials of one model, loss and optimizer differ in the rest)."""
    bar = EpochProgress(config, prefix=f"  [trial {trial.number}] ", name=config.seed_name)
    return bar.on_epoch_end, bar.on_batch


def trial_ended(total: int, metric: str):
    """A line per ended trial, with how many of `total` are done and an estimate of the time left."""
    import time

    from ..studies.space import brief_params

    started, done = time.monotonic(), []

    def on_trial_end(t) -> None:
        done.append(t.number)
        elapsed = time.monotonic() - started
        left = f", ~{duration(elapsed / len(done) * (total - len(done)))} left" if len(done) < total else ""
        value = "-" if t.value is None else f"{t.value:.4f}"
        if t.state.name == "PRUNED" and t.intermediate_values:  # where it stopped, and at what value
            at = max(t.intermediate_values)
            value = f"{t.intermediate_values[at]:.4f} after epoch {at}"
        click.echo(f"trial {t.number} {t.state.name} [{len(done)}/{total}{left}]: {metric} {value}  "
                   f"{brief_params(t.params)}")

    return on_trial_end


def search_opened(shared, storage: str, uri: str) -> None:
    from ..studies.space import brief_params

    from ..urls import redact

    space = shared.plan.space
    click.echo(f"study {shared.study_name} ({space.direction} {space.metric}) in {redact(storage)}: "
               f"{shared.finished_before} finished trial(s) so far; parent run {shared.parent_id}; "
               f"tracking to {redact(uri)}")
    if shared.filled:
        params, notes = shared.filled
        click.echo(f"warm start: the first trial carries over the grid's best config where this space can hold it: "
                   f"{brief_params(params)}; the rest is the space's own ({brief_params(space.fixed)})"
                   + "".join(f"\n  note: {note}" for note in notes))


def search_summary(summary, metric: str) -> None:
    from ..studies.space import brief_params

    click.echo(f"{summary.trials} trials in the study: {summary.states}; epochs run {summary.epochs_run}, "
               f"saved by pruning {summary.epochs_saved}"
               + (f"; {summary.retried} retried after their worker was lost" if summary.retried else ""))
    if summary.stopped:
        click.echo(f"the study {summary.stopped} (--patience 0 goes on)")
    for r in summary.replays:
        click.echo(f"  replayed on the completed trials, the {r.pruner} pruner {r.line()}")
    pruned = summary.states.get("PRUNED", 0)
    if pruned and summary.replays:
        click.echo(f"  (the replays judge completed trials only: the {pruned} trial(s) this study's pruner stopped "
                   "have no whole curve to replay)")
    if summary.best:
        b = summary.best
        click.echo(f"best: trial {b['number']} {metric} {b['value']:.4f} {brief_params(b['params'])} (run {b['run_id']})")


def confirm_opened(plan) -> None:
    click.echo(f"confirm {plan.study_name}: {len(plan.contenders)} contender(s) x seeds {', '.join(map(str, plan.seeds))}: "
               + "; ".join(c.title for c in plan.contenders))


def confirm_started(k: int, n: int, config, elapsed: float, eta, label: str) -> None:
    left = "" if eta is None else f", ~{duration(eta)} left"
    click.echo(f"[confirm {k + 1}/{n}] {label} (elapsed {duration(elapsed)}{left})")


def confirm_ended(metric: str):
    """A confirm run's line once it ends: its metric (the contenders are ranked on these)."""
    def on_trial_end(trial) -> None:
        if trial.state.name == "PRUNED":
            return  # raced out: said by confirm_raced
        value = trial.state.name if trial.value is None else \
            f"{metric} {100 * trial.value:.2f}%" if metric == "val_accuracy" else f"{metric} {trial.value:.4f}"
        click.echo(f"[confirm] {trial.params.get('config')} seed {trial.params.get('seed')}: {value}")

    return on_trial_end


def confirm_raced(config, why: str, label: str) -> None:
    click.echo(f"[confirm] {label}: raced out, not run ({why.split(';')[0]})")


def confirmed(done, metric: str) -> None:
    from ..results.seeds import fmt_estimate
    from ..studies.confirm_report import baselines_line

    click.echo("")
    click.echo(done.markdown)
    if done.champion:
        c = done.champion
        mean = fmt_estimate(getattr(c, metric), metric == "val_accuracy")[0]
        click.echo(f"champion: {done.champion_contender().title}, {metric} mean {mean} over seeds "
                   f"{', '.join(map(str, c.seeds))} (best seed run {c.best_run_id})")
        click.echo(baselines_line(done))
