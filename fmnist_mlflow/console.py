"""What the `fmnist` commands print while they work: a progress bar and a line per epoch, waiting notes,
short params and durations. Light on purpose (click only)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from . import config as cfg

if TYPE_CHECKING:  # torch stays out of `fmnist --help`
    from .train import EpochMetrics


class EpochProgress:
    """A progress bar per epoch on a terminal, and one summary line per epoch. Where stderr is not a
    terminal (a log file, `mlflow run`), click would print the bar's label as a line of its own before
    every epoch's line: there the bar is left out."""

    def __init__(self, config: cfg.RunConfig, prefix: str = ""):
        self.config = config
        self.prefix = prefix
        self.bar = None
        self.epoch = 1
        self.interactive = sys.stderr.isatty()

    def on_batch(self, done: int, total: int) -> None:
        if not self.interactive:
            return
        if self.bar is None:
            label = f"{self.prefix}{self.config.label} epoch {self.epoch}/{self.config.epochs}"
            self.bar = click.progressbar(length=total, label=label, file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(1)
        if done == total:
            self.bar.__exit__(None, None, None)
            self.bar = None

    def on_epoch_end(self, m: "EpochMetrics") -> None:
        click.echo(
            f"{self.prefix}{self.config.label} epoch {m['epoch']:>2}/{self.config.epochs}  "
            f"train_loss {m['train_loss']:.4f}  val_loss {m['val_loss']:.4f}  val_nll {m['val_nll']:.4f}  "
            f"val_acc {100 * m['val_accuracy']:.2f}%  {m['epoch_seconds']:.1f}s"
        )
        self.epoch = m["epoch"] + 1


def on_wait(running: int) -> None:
    click.echo(f"waiting for {running} trial(s) running in other workers (one whose worker is lost is "
               "failed and retried once its heartbeats stop)")


def brief_params(params: dict) -> str:
    from .confirm import brief_params as brief

    return brief(params)


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
