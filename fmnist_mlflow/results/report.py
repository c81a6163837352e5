"""The sweep's answer as a person reads it: configs ranked by their seed mean with intervals and marks, beside
the source report's own table (`to_markdown`, the parent's summary.md), and the short version for the
parent run's description (`description`, its Overview in the MLflow UI)."""

from __future__ import annotations

from typing import Optional

from ..training.config import LOSS_NAMES
from . import stats
from .seeds import MARK_MEANING, RunRow, aggregate, best, finished_values, fmt_estimate, ranked

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


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def to_markdown(rows: list[RunRow], select: str = "val_accuracy", raced: Optional[dict] = None) -> str:
    """Configs ranked by the seed mean, with intervals and the test against the best; then the report's
    layout with our numbers beside the report's."""
    configs = aggregate(rows, select, raced)
    n_seeds = max((len(c.seeds) for c in configs), default=0)
    noise = stats.seed_noise(*finished_values(rows, select))
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
        lines += [f"- {c.name}: {c.raced_out.split('; ')[0]}" for c in out]
        lines += ["", f"(the seed spread behind the first verdict: {out[0].raced_out.split('; ', 1)[1]})"] if "; " in out[0].raced_out else []
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
        ties = [c.name for c in ranked(configs, select) if c.same_as_best and not c.is_best]  # by rank
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
