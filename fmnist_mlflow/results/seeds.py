"""Seeds of a config, aggregated: one row per run, one per config over its seeds, as CSV; used by the
sweep's summary and by a search's confirm.

Run rows are `RunRow`s (typed dicts: the columns of summary.csv). `aggregate` turns them into one
`ConfigRow` per config: n seeds, mean, std and 95% interval of `val_accuracy` and `val_nll` (see
`stats`), ranked by the mean of the selection metric, with the pooled-noise t-test against the best config
(`stats.compare_with_best`), and why a config got fewer seeds (raced out, see `stats.race_verdict`). Selection never
uses `train_loss` (see `best`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, TypedDict

from ..training.config import SELECT, RunConfig, pick_best
from . import stats
from .stats import Estimate

if TYPE_CHECKING:  # torch stays out of `fmnist --help`
    from ..training.train import EpochMetrics

RACED_OUT = "RACED OUT"  # a (config, seed) never run: the config was already shown worse than the leader
NOT_RUN = ("NOT RUN", RACED_OUT)

MARK_MEANING = ("'=' marks the configs not shown worse than the best: a two-sided t-test at the 5% level on the "
                "difference of means, with the seed-to-seed spread pooled over all configs (per model family when "
                "Levene's test says the families' spreads differ)")

class RunRow(TypedDict):
    """One (config, seed) of a sweep: its config, end state and final metrics (None if it never finished
    an epoch); a row of summary.csv, in this order."""

    model: str
    loss: str
    optimizer: str
    lr: float
    seed: int
    status: str  # the MLflow run status, or "NOT RUN", or RACED_OUT (no run: see `stats.race_verdict`)
    train_loss: Optional[float]
    val_loss: Optional[float]
    val_nll: Optional[float]
    val_accuracy: Optional[float]
    train_seconds: float  # the sum of the epochs' training passes
    group: str  # RunConfig.group: shared by the seeds of one config
    run_id: str


COLUMNS = tuple(RunRow.__annotations__)


def row(config: RunConfig, status: str, history: list[EpochMetrics], run_id: str) -> RunRow:
    last = history[-1] if history else {}
    return RunRow(model=config.model, loss=config.loss, optimizer=config.optimizer, lr=config.lr, seed=config.seed,
                  status=status, train_loss=last.get("train_loss"), val_loss=last.get("val_loss"),
                  val_nll=last.get("val_nll"), val_accuracy=last.get("val_accuracy"),
                  train_seconds=sum(m.get("epoch_seconds", 0.0) for m in history), group=config.group, run_id=run_id)


def to_csv(rows: list[RunRow]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


@dataclass(frozen=True)
class ConfigRow:
    """One config over its seeds."""

    name: str  # model-loss-optimizer
    model: str
    loss: str
    optimizer: str
    lr: float
    group: str  # the config's digest without its seed (tag fmnist.config_group)
    runs: int  # seed runs found, finished or not
    seeds: tuple  # seeds that FINISHED
    val_accuracy: Optional[Estimate]  # over the finished seeds; None when none finished
    val_nll: Optional[Estimate]
    train_loss: Optional[float]  # mean over finished seeds: shown beside the report's, never selected on
    train_seconds: float  # summed over all seed runs
    best_run_id: str  # the finished seed run best on the selection metric ("" when none)
    p_vs_best: Optional[float] = None  # the pooled-noise t-test against the best (None: no config has 2 seeds)
    same_as_best: Optional[bool] = None  # p >= 0.05: cannot be told apart from the best; True for the best itself
    is_best: bool = False
    raced_out: str = ""  # why it got no more seeds (empty: it got every seed asked for)

    @property
    def status(self) -> str:
        if self.raced_out and self.runs == len(self.seeds):
            return f"raced out after {self.runs} seed(s)"
        if self.runs == 0:
            return "NOT RUN"
        return "FINISHED" if len(self.seeds) == self.runs else f"{len(self.seeds)}/{self.runs} FINISHED"


def aggregate(rows: list[RunRow], select: str = "val_accuracy", raced: Optional[dict] = None) -> list:
    """One ConfigRow per config (in the order rows first name it), compared with the best by `select`.
    `raced`: config group -> why it got no more seeds."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    out = []
    for group, members in groups.items():
        done = [r for r in members if r["status"] == "FINISHED" and r[select] is not None]
        first = members[0]
        out.append(ConfigRow(
            name=f"{first['model']}-{first['loss']}-{first['optimizer']}", model=first["model"], loss=first["loss"],
            optimizer=first["optimizer"], lr=first["lr"], group=group,
            runs=sum(r["status"] not in NOT_RUN for r in members), seeds=tuple(r["seed"] for r in done),
            val_accuracy=stats.estimate([r["val_accuracy"] for r in done], fraction=True) if done else None,
            val_nll=stats.estimate([r["val_nll"] for r in done], nonnegative=True) if done else None,
            train_loss=_mean([r["train_loss"] for r in done if r["train_loss"] is not None]),
            train_seconds=sum(r["train_seconds"] for r in members),
            best_run_id=pick_best(done, select, key=lambda r: r[select])["run_id"] if done else "",
            raced_out=(raced or {}).get(group, ""),
        ))  # fmt: skip
    scored = [c for c in out if getattr(c, select) is not None]
    if not scored:
        return out
    # a raced-out config was shown worse than the leader of its round: the best is one that got every seed
    contenders = [c for c in scored if not c.raced_out] or scored
    top = pick_best(contenders, select, key=lambda c: getattr(c, select).mean)
    values, family = finished_values(rows, select)
    noise = stats.seed_noise(values, family)
    p_values = stats.compare_with_best(values, top.group, noise, family) if noise else {}
    compared = []
    for c in out:
        if c is top:
            c = dataclasses.replace(c, is_best=True, same_as_best=True, p_vs_best=None)
        elif p_values.get(c.group) is not None:
            p = p_values[c.group]
            c = dataclasses.replace(c, p_vs_best=p, same_as_best=stats.indistinguishable(p))
        compared.append(c)
    return compared


def _mean(values: list) -> Optional[float]:
    return sum(values) / len(values) if values else None


def finished_values(rows: list[RunRow], select: str) -> tuple:
    """({config group: the finished seeds' values of `select`}, {config group: model family})."""
    values: dict = {}
    family: dict = {}
    for r in rows:
        if r["status"] == "FINISHED" and r[select] is not None:
            values.setdefault(r["group"], []).append(r[select])
            family[r["group"]] = r["model"]
    return values, family


def best(configs: list) -> Optional[ConfigRow]:
    """The best config of an `aggregate` result, or None when none finished."""
    return next((c for c in configs if c.is_best), None)


def ranked(configs: list, select: str) -> list:
    """Configs with results, best mean first; then those without."""
    scored = [c for c in configs if getattr(c, select) is not None]
    scored.sort(key=lambda c: getattr(c, select).mean, reverse=SELECT[select])
    return scored + [c for c in configs if getattr(c, select) is None]


CONFIG_COLUMNS = ("rank", "model", "loss", "optimizer", "lr", "n_seeds", "status", "val_accuracy_mean",
                  "val_accuracy_std", "val_accuracy_ci95_low", "val_accuracy_ci95_high", "val_nll_mean", "val_nll_std",
                  "val_nll_ci95_low", "val_nll_ci95_high", "train_loss_mean", "p_vs_best", "same_as_best",
                  "train_seconds", "group", "best_run_id")  # fmt: skip


def configs_csv(configs: list, select: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CONFIG_COLUMNS)
    for rank, c in enumerate(ranked(configs, select), 1):
        cells = [rank if getattr(c, select) else "", c.model, c.loss, c.optimizer, c.lr, len(c.seeds), c.status]
        for est in (c.val_accuracy, c.val_nll):
            low, high = est.ci95 if est and est.ci95 else ("", "")
            cells += [est.mean if est else "", "" if not est or est.std is None else est.std, low, high]
        cells += ["" if c.train_loss is None else c.train_loss, "" if c.p_vs_best is None else c.p_vs_best,
                  "" if c.same_as_best is None else c.same_as_best, round(c.train_seconds, 1), c.group, c.best_run_id]
        writer.writerow(cells)
    return out.getvalue()


def fmt_estimate(est: Optional[Estimate], percent: bool) -> tuple:
    """("mean ± std", "[low, high]") for a table; with one seed the interval cell says why it is empty."""
    if est is None:
        return "-", "-"
    scale, digits, unit = (100, 2, "%") if percent else (1, 4, "")
    mean = f"{scale * est.mean:.{digits}f}{unit}"
    if est.std is None:
        return mean, "n/a (1 seed)"
    low, high = est.ci95
    return f"{mean} ± {scale * est.std:.{digits}f}", f"[{scale * low:.{digits}f}, {scale * high:.{digits}f}]"


