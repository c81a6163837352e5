"""A sweep's summary: one row per run, aggregated per config over its seeds, as CSV and Markdown, beside
the source report's numbers.

Run rows are `RunRow`s (typed dicts: the columns of summary.csv). `aggregate` turns them into one
`ConfigRow` per config: n seeds, mean, std and 95% interval of `val_accuracy` and `val_nll` (see
`stats`), ranked by the mean of the selection metric, with the pooled-noise t-test against the best config
(`stats.compare_with_best`), and why a config got fewer seeds (raced out, see `race`). Selection never
uses `train_loss` (see `best`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, TypedDict

from . import stats
from .config import LOSS_NAMES, SELECT, RunConfig, pick_best
from .stats import Estimate

if TYPE_CHECKING:  # torch stays out of `fmnist --help`
    from .train import EpochMetrics

# The report's table: training loss at epoch 10, (model, loss) -> (Adam, SGD, RMSprop).
REPORT_TRAIN_LOSS = {
    ("model1", "ce"): (0.2729, 0.2451, 0.2298),
    ("model1", "bce"): (0.0444, 0.0415, 0.0422),
    ("model2", "ce"): (0.3713, 0.3457, 0.3339),
    ("model2", "bce"): (0.0660, 0.0638, 0.0641),
    ("model3", "ce"): (0.1131, 0.0641, 0.0383),
    ("model3", "bce"): (0.0040, 0.0021, 0.0031),
}
REPORT_OPTIMIZERS = ("adam", "sgd", "rmsprop")
REPORT_PICK = ("model3", "bce", "sgd")  # the lowest number in the table, which the report chose
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
    status: str  # the MLflow run status, or "NOT RUN", or RACED_OUT (no run: see `race`)
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
            val_nll=stats.estimate([r["val_nll"] for r in done]) if done else None,
            train_loss=sum(r["train_loss"] for r in done) / len(done) if done else None,
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


def finished_values(rows: list[RunRow], select: str) -> tuple:
    """({config group: the finished seeds' values of `select`}, {config group: model family})."""
    values: dict = {}
    family: dict = {}
    for r in rows:
        if r["status"] == "FINISHED" and r[select] is not None:
            values.setdefault(r["group"], []).append(r[select])
            family[r["group"]] = r["model"]
    return values, family


def seed_noise(rows: list[RunRow], select: str = "val_accuracy") -> Optional[stats.Noise]:
    """The seed noise `aggregate` compares configs with (None: no config has two finished seeds)."""
    return stats.seed_noise(*finished_values(rows, select))


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


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


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


def to_markdown(rows: list[RunRow], select: str = "val_accuracy", raced: Optional[dict] = None) -> str:
    """Configs ranked by the seed mean, with intervals and the test against the best; then the report's
    layout with our numbers beside the report's."""
    configs = aggregate(rows, select, raced)
    n_seeds = max((len(c.seeds) for c in configs), default=0)
    noise = seed_noise(rows, select)
    lines = [
        f"Configs ranked by the mean {select} over seeds; ± is the standard deviation over seeds, [..] the 95% "
        f"confidence interval of the mean (t distribution). {MARK_MEANING}"
        + (f"; here: {noise.describe(percent=select == 'val_accuracy')}." if noise else "."),
        "",
        "| rank | model | loss | optimizer | lr | seeds | status | val_accuracy | 95% CI | val_nll | 95% CI | "
        "train_loss (epoch N) | vs best | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rank, c in enumerate(ranked(configs, select), 1):
        acc, acc_ci = fmt_estimate(c.val_accuracy, percent=True)
        nll, nll_ci = fmt_estimate(c.val_nll, percent=False)
        if c.is_best:
            vs = "**best**"
        elif c.p_vs_best is None:
            vs = "-"
        else:
            vs = f"{'=' if c.same_as_best else '<'} (p {c.p_vs_best:.3f})"
        lines.append(f"| {rank if c.val_accuracy else '-'} | {c.model} | {c.loss} | {c.optimizer} | {c.lr:g} | "
                     f"{len(c.seeds)} | {c.status} | {acc} | {acc_ci} | {nll} | {nll_ci} | {_fmt(c.train_loss)} | "
                     f"{vs} | {c.train_seconds:.0f} |")
    if n_seeds < 2:
        lines += ["", "One seed per config: no interval can be given and no config can be told apart from another "
                      "by a test. Run with `--seeds 0,1,2` for intervals."]
    out = [c for c in ranked(configs, select) if c.raced_out]
    if out:
        lines += ["", "Raced out (no more seeds: already shown worse than the leader; see `--race`):", ""]
        lines += [f"- {c.name}: {c.raced_out}" for c in out]
    by_key = {(c.model, c.loss, c.optimizer): c for c in configs}
    lines += ["", "Final training loss (mean over seeds), ours (report's) - the report's only column; CE and BCE are "
                  "not comparable:", "", "| model | loss | Adam | SGD | RMSprop |", "|---|---|---|---|---|"]
    for (model, loss), theirs in REPORT_TRAIN_LOSS.items():
        cells = [f"{_fmt(getattr(by_key.get((model, loss, o)), 'train_loss', None))} ({t:.4f})"
                 for o, t in zip(REPORT_OPTIMIZERS, theirs)]
        lines.append(f"| {model} | {LOSS_NAMES[loss]} | " + " | ".join(cells) + " |")
    lines += ["", "Validation accuracy (mean over seeds; what selection uses), same layout:", "",
              "| model | loss | Adam | SGD | RMSprop |", "|---|---|---|---|---|"]
    for model, loss in REPORT_TRAIN_LOSS:
        cells = [fmt_estimate(getattr(by_key.get((model, loss, o)), "val_accuracy", None), percent=True)[0]
                 for o in REPORT_OPTIMIZERS]
        lines.append(f"| {model} | {LOSS_NAMES[loss]} | " + " | ".join(cells) + " |")
    winner = best(configs)
    if winner:
        ties = [c.name for c in configs if c.same_as_best and not c.is_best]
        tie_note = (f" Indistinguishable from it at the 5% level: {', '.join(ties)}." if ties
                    else " No other config is indistinguishable from it at the 5% level." if n_seeds >= 2 else "")
        lines += ["", f"Best by mean {select}: **{winner.name}** (val_accuracy "
                      f"{fmt_estimate(winner.val_accuracy, True)[0]}, val_nll {fmt_estimate(winner.val_nll, False)[0]}, "
                      f"{len(winner.seeds)} seed(s)); the report picked {'-'.join(REPORT_PICK)} by training loss."
                      + tie_note]
    return "\n".join(lines) + "\n"


def description(configs: list, select: str, best_link: str = "", top: int = 6) -> str:
    """The answer as the parent run's description (the Overview in the MLflow UI): the `top` configs with
    their seed means, intervals and marks, the others in a line, the raced-out ones in a line."""
    winner = best(configs)
    if winner is None:
        return "No config finished yet."
    order = ranked([c for c in configs if getattr(c, select) is not None], select)
    est = lambda c: getattr(c, select)  # noqa: E731
    percent = select == "val_accuracy"
    link = f" ([best run]({best_link}))" if best_link else ""
    lines = [f"**Best by mean {select}: {winner.name}**, {fmt_estimate(est(winner), percent)[0]} over "
             f"{len(winner.seeds)} seed(s){link}.", "",
             f"| rank | config | seeds | {select} | 95% CI | vs best |", "|---|---|---|---|---|---|"]
    for rank, c in enumerate(order[:top], 1):
        mean, ci = fmt_estimate(est(c), percent)
        mark = "best" if c.is_best else "-" if c.p_vs_best is None else f"{'=' if c.same_as_best else '<'} (p {c.p_vs_best:.3f})"
        lines.append(f"| {rank} | {c.name} | {len(c.seeds)} | {mean} | {ci} | {mark} |")
    rest = [c for c in order[top:] if not c.raced_out]
    if rest:
        lines += ["", "Then: " + ", ".join(f"{c.name} {fmt_estimate(est(c), percent)[0].split(' ±')[0]}" for c in rest) + "."]
    out = [c for c in order if c.raced_out]
    if out:
        lines += ["", "Raced out (no more seeds once shown worse than the leader): "
                      + ", ".join(f"{c.name} after {len(c.seeds)} seed(s)" for c in out) + "."]
    lines += ["", MARK_MEANING + ". The full table: `summary.md` in Artifacts."]
    return "\n".join(lines) + "\n"
