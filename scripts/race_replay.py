"""Replay the main job's comparison and racing on committed 3-seed grids (their summary.csv).

For each grid: the marks against the best with Welch's test (the old summary) and with the pooled-noise
test (`stats.compare_with_best`, the summary's now); then the race (`stats.race_verdict`, the code `fmnist
sweep` runs) replayed point by point in the sweep's queue order (seed by seed, model3 first), one worker:
which configs it stops and when, its winner and "=" set beside the all-seeds ones, and the share of the
grid's training seconds it saves.

    python scripts/race_replay.py experiments/grid/summary.csv [fp32.csv ...] [--seed-sd 0.008]
"""

from __future__ import annotations

import argparse
import csv

from fmnist_mlflow.results import stats
from fmnist_mlflow.results import seeds
from fmnist_mlflow.studies.grid import DEFAULT_GRID, load_grid


def read_rows(path: str) -> list:
    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            for key in ("lr", "train_loss", "val_loss", "val_nll", "val_accuracy", "train_seconds"):
                r[key] = float(r[key]) if r[key] not in ("", None) else None
            r["seed"] = int(r["seed"])
            rows.append(r)
    return rows


def queue_order(rows: list) -> list:
    """The sweep's queue: seed by seed, model3 first, else the grid file's order (`points.Points.ordered`)."""
    return sorted(rows, key=lambda r: (r["seed"], r["model"] != "model3"))


def name(r) -> str:
    return f"{r['model']}-{r['loss']}-{r['optimizer']}"


def replay(rows: list, prior_sd: float, select: str = "val_accuracy") -> tuple:
    """(rows with raced-out points marked RACED OUT, config name -> reason)."""
    family = {name(r): r["model"] for r in rows}
    done: dict = {}
    out: dict = {}
    raced_rows = []
    for r in queue_order(rows):
        key = name(r)
        before = {k: [v for seed, v in values if seed < r["seed"]] for k, values in done.items()}
        why = out.get(key) or stats.race_verdict(before, family, key, select, prior_sd)
        if why:
            out.setdefault(key, why)
            raced_rows.append({**r, "status": seeds.RACED_OUT, select: None, "val_nll": None, "train_loss": None,
                               "val_loss": None, "train_seconds": 0.0})
            continue
        done.setdefault(key, []).append((r["seed"], r[select]))
        raced_rows.append(r)
    return raced_rows, out


def marks(configs: list) -> dict:
    return {c.name: "best" if c.is_best else "=" if c.same_as_best else "<" for c in configs}


def welch_marks(rows: list, select: str = "val_accuracy") -> dict:
    values: dict = {}
    for r in rows:
        values.setdefault(name(r), []).append(r[select])
    best = max(values, key=lambda k: sum(values[k]) / len(values[k]))
    return {k: "best" if k == best else "=" if stats.indistinguishable(stats.welch_p(values[best], v)) else "<"
            for k, v in values.items()}


def report(path: str, prior_sd: float) -> str:
    rows = read_rows(path)
    full = seeds.aggregate(rows)
    new, old = marks(full), welch_marks(rows)
    raced_rows, out = replay(rows, prior_sd)
    raced = seeds.aggregate(raced_rows, raced={g: "raced" for g in
                                                  {r["group"] for r in raced_rows if r["status"] == seeds.RACED_OUT}})
    raced_marks = marks(raced)
    noise = stats.seed_noise(*seeds.finished_values(rows, "val_accuracy"))
    total = sum(r["train_seconds"] for r in rows)
    saved = total - sum(r["train_seconds"] for r in raced_rows)
    seeds_run = sum(r["status"] == "FINISHED" for r in raced_rows)
    lines = [f"### {path}", "", f"All seeds: {noise.describe()}.", "",
             "| config | val acc (all seeds) | Welch mark | pooled mark | raced: seeds | raced: mark | raced out |",
             "|---|---|---|---|---|---|---|"]
    by_name = {c.name: c for c in raced}
    for c in seeds.ranked(full, "val_accuracy"):
        rc = by_name[c.name]
        lines.append(f"| {c.name} | {seeds.fmt_estimate(c.val_accuracy, True)[0]} | {old[c.name]} | "
                     f"{new[c.name]}{'' if c.p_vs_best is None else f' (p {c.p_vs_best:.3f})'} | {len(rc.seeds)} | "
                     f"{raced_marks[c.name]} | {out.get(c.name, '').split(';')[0]} |")
    same_set = lambda m: sorted(k for k, v in m.items() if v in ("best", "="))  # noqa: E731
    lines += ["", f"- winner: all seeds **{seeds.best(full).name}**, raced **{seeds.best(raced).name}**",
              f"- best or '=': all seeds {same_set(new)}; raced {same_set(raced_marks)}: "
              f"**{'the same' if same_set(new) == same_set(raced_marks) else 'DIFFERENT'}**",
              f"- Welch '=' with p >= 0.05 dropped by the pooled test: "
              f"{sorted(k for k in old if old[k] == '=' and new[k] == '<') or 'none'}; added: "
              f"{sorted(k for k in old if old[k] == '<' and new[k] == '=') or 'none'}",
              f"- points run: {seeds_run} of {len(rows)}; training seconds {total - saved:,.0f} of {total:,.0f}: "
              f"**{100 * saved / total:.0f}% saved** ({(total - saved) / total:.2f}x)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="+")
    parser.add_argument("--seed-sd", type=float, default=None, help="prior seed sd (default: the grid file's)")
    args = parser.parse_args()
    prior = args.seed_sd if args.seed_sd is not None else load_grid(DEFAULT_GRID).seed_sd
    print(f"Prior seed sd before any config has two seeds: {prior}\n")
    for path in args.summaries:
        print(report(path, prior))


if __name__ == "__main__":
    main()
