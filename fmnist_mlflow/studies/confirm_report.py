"""What a confirm says: its ranking as Markdown (confirm.md), whether the search beat its baselines, and the
search parent's description once a champion is named (`confirm.Confirm.report` logs them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..results.seeds import MARK_MEANING, fmt_estimate, ranked
from .space import brief_params

if TYPE_CHECKING:
    from .confirm import Confirmation


def vs_mark(c) -> str:
    return "**champion**" if c.is_best else "-" if c.p_vs_best is None else \
        f"{'=' if c.same_as_best else '<'} (p {c.p_vs_best:.3f})"


def confirm_markdown(configs: list, contender_of: dict, seeds: tuple, metric: str) -> str:
    lines = [f"The search's best trials and its baselines, re-run on seeds {', '.join(map(str, seeds))} seed by seed (a contender shown "
             f"worse than the leader gets no more seeds: raced out), ranked by the mean {metric}; ± standard deviation "
             "over seeds, [..] 95% interval of the mean; 'vs champion': " + MARK_MEANING + ".",
             "", "| rank | contender | params | seeds | val_accuracy | 95% CI | val_nll | 95% CI | vs champion |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rank, c in enumerate(ranked(configs, metric), 1):
        acc, acc_ci = fmt_estimate(c.val_accuracy, percent=True)
        nll, nll_ci = fmt_estimate(c.val_nll, percent=False)
        who = contender_of[c.group]
        lines.append(f"| {rank} | {who.title} | {brief_params(who.params)} | {len(c.seeds)} | {acc} | {acc_ci} | {nll} | "
                     f"{nll_ci} | {vs_mark(c)} |")
    out = [c for c in ranked(configs, metric) if c.raced_out]
    if out:
        lines += ["", "Raced out (no more seeds):"]
        lines += [f"- {contender_of[c.group].name}: {c.raced_out.split('; ')[0]}" for c in out]
        lines += ["", f"(the seed spread behind the first verdict: {out[0].raced_out.split('; ', 1)[1]})"] if "; " in out[0].raced_out else []
    return "\n".join(lines) + "\n"


def baselines_line(done: Confirmation) -> str:
    """Whether the search beat its baselines, on the confirm's fresh seeds."""
    if done.champion is None:
        return ""
    champ = done.champion_contender()
    if champ.baseline:
        return (f"The champion is a baseline ({', '.join(r for r in champ.roles if not r.startswith('top'))}): the search "
                "found nothing shown better.")
    if not done.baselines:
        return "No baseline was confirmed beside it."
    marks = "; ".join(f"{who.title}: {vs_mark(c)}" for who, c in done.baselines)
    if all(c.same_as_best is False for _, c in done.baselines):
        verdict = "The search beat every baseline."
    elif any(c.p_vs_best is None for _, c in done.baselines):
        verdict = "'-': not compared (one seed each: no spread to test with)."
    else:
        verdict = "'=': the search is not shown better than that baseline."
    return f"Against the baselines on the same seeds: {marks}. {verdict}"


def description(done: Confirmation, seeds: tuple, metric: str, search_line: str, link: str) -> str:
    """The search's answer as its parent run's description (the Overview in the MLflow UI)."""
    c = done.champion
    who = done.champion_contender()
    mean, ci = fmt_estimate(getattr(c, metric), metric == "val_accuracy")
    lines = [f"**Champion: {who.title}**, {metric} {mean} over seeds {', '.join(map(str, c.seeds))} "
             f"(95% CI {ci}; [its best seed run]({link})): {brief_params(who.params)}.", "",
             baselines_line(done), ""]
    if search_line:
        lines += [search_line, ""]
    lines += ["The confirm's ranking: `confirm.md` in Artifacts; every trial: `trials.csv`. `fmnist register` "
              "registers this champion."]
    return "\n".join(lines) + "\n"
