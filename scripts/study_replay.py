"""Replay the search's stopping rule (`studies.stopping`) and its pruners on committed studies.

The stopping rule, on each study's trials.csv:

Each study's trials are taken in the order they started, as if each finished before the next began (one
worker); for each patience: the trial after which the study would have stopped, the training seconds spent
by then (of the study's), the best trial it had then, and how the study's final best compares.

    cd <any folder> && python <repo>/scripts/study_replay.py <repo>/experiments/search40/trials.csv [...] \
        [--sd 0.0019] [--patience 5 8 10 12 15]

The pruners (`pruners.replay_all`, what the search logs in early_epochs.md), on a study's curves.csv (its
completed trials' epoch values), with `--curves`:

    cd <any folder> && python <repo>/scripts/study_replay.py --curves <repo>/experiments/search-fidelity/curves.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from fmnist_mlflow.studies.stopping import stagnated


def replay(rows: list, sd: float, patience: int) -> dict:
    trials = []
    for r in rows:
        value = float(r["value"]) if r["state"] == "COMPLETE" and r["value"] else None
        trials.append((int(r["number"]), value, r["state"] in ("COMPLETE", "PRUNED", "FAIL")))
        if stagnated(trials, sd, patience):
            break
    seen = {n for n, _, _ in trials}
    spent = sum(float(r["seconds"] or 0) for r in rows if int(r["number"]) in seen)
    total = sum(float(r["seconds"] or 0) for r in rows)
    done = [(v, n) for n, v, _ in trials if v is not None]
    best_value, best = max(done) if done else (None, None)
    final_value, final = max((float(r["value"]), int(r["number"])) for r in rows if r["state"] == "COMPLETE")
    return {"stopped_after": trials[-1][0] if len(trials) < len(rows) else None, "trials": len(trials),
            "share": spent / total, "best": best, "best_value": best_value, "final_best": final, "final_value": final_value}


def study_of(curves: Path):
    """An in-memory Optuna study holding the completed trials of a committed curves.csv, in trial order."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials: dict = {}
    for r in csv.DictReader(curves.open()):
        if r["state"] == "COMPLETE":
            t = trials.setdefault(int(r["number"]), {"final": float(r["final_value"]), "curve": {}})
            t["curve"][int(r["epoch"])] = float(r["value"])
    study = optuna.create_study(study_name=curves.parent.name, direction="maximize")
    for number in sorted(trials):
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=trials[number]["final"],
                                                  intermediate_values=trials[number]["curve"]))
    return study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trials", nargs="*", type=Path)
    parser.add_argument("--curves", type=Path, nargs="*", default=[])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--sd", type=float, default=0.0019, help="the seed sd (the space file's seed_sd)")
    parser.add_argument("--patience", type=int, nargs="+", default=[5, 8, 10, 12, 15])
    args = parser.parse_args()
    if args.curves:
        from fmnist_mlflow.studies import pruners, search_report

        for path in args.curves:
            print(f"{path.parent.name}:\n")
            print(search_report.replays_markdown(pruners.replay_all(study_of(path), args.epochs)))
        return
    print("| study | trials | patience | stops after trial | trials run | share of training seconds | best then | "
          "the study's final best | final - then (points) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in args.trials:
        rows = sorted(csv.DictReader(path.open()), key=lambda r: int(r["number"]))
        for patience in args.patience:
            r = replay(rows, args.sd, patience)
            stop = "never" if r["stopped_after"] is None else r["stopped_after"]
            print(f"| {path.parent.name} | {len(rows)} | {patience} | {stop} | {r['trials']} | {100 * r['share']:.0f}% | "
                  f"trial {r['best']} ({100 * r['best_value']:.2f}%) | trial {r['final_best']} ({100 * r['final_value']:.2f}%) | "
                  f"{100 * (r['final_value'] - r['best_value']):.2f} |")


if __name__ == "__main__":
    main()
