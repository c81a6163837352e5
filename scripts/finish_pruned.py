"""Run pruned trials of a study to the end, to learn what pruning them cost.

A pruned trial's final value is unknown by construction; whether the pruner stopped one that would have
reached the study's top trials can only be measured by training it whole. This script takes the pruned
trials of a stored study (by default the N with the best value at the epoch they stopped, the nearest
misses), rebuilds each trial's config from its params and the space file exactly as `fmnist search` did
(same seed, device, precision), trains it to the end with one CPU thread per process, and prints where its
final value would have ranked among the study's completed trials. Nothing is written to the study or to
MLflow. Same thread count as the study, same metrics: the epoch the trial was stopped at is printed beside
the study's value as the check.

    cd <any folder> && python <repo>/scripts/finish_pruned.py --storage sqlite:///optuna.db \
        --study model3-levers --nearest 2 --jobs 2
"""

from __future__ import annotations

import argparse
import multiprocessing


def finish(job: tuple) -> dict:
    number, params, space_file, epochs, subset, precision = job
    import optuna
    import torch

    torch.set_num_threads(1)
    from fmnist_mlflow.training import data
    from fmnist_mlflow.training import train
    from fmnist_mlflow.studies.space import load_space

    config = load_space(space_file).suggest(optuna.trial.FixedTrial(params), epochs=epochs, subset=subset,
                                            device="cpu", precision=precision)
    curve = [m["val_accuracy"] for m in train.fit(config, data.load(subset=subset)).history]
    return {"number": number, "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True)
    parser.add_argument("--study", required=True)
    parser.add_argument("--space", default=None, help="the study's space file (default: the shipped one)")
    parser.add_argument("--trials", type=int, nargs="*", help="trial numbers (default: the --nearest misses)")
    parser.add_argument("--nearest", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--subset", type=int, default=0, help="as the study ran (0: full data)")
    parser.add_argument("--precision", default="auto", help="as the study ran (the parent's params say)")
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()

    import optuna

    from fmnist_mlflow.training import hardware
    from fmnist_mlflow.studies.space import DEFAULT_SPACE

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=args.study, storage=args.storage)
    trials = study.get_trials(deepcopy=False)
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values]
    last = {t.number: t.intermediate_values[max(t.intermediate_values)] for t in pruned}
    if args.trials:
        chosen = [t for t in pruned if t.number in args.trials]
    else:
        chosen = sorted(pruned, key=lambda t: -last[t.number])[: args.nearest]
    completed = sorted((t.value for t in trials if t.state == optuna.trial.TrialState.COMPLETE), reverse=True)
    precision = hardware.resolve_precision(args.precision, "cpu") if args.precision == "auto" else args.precision
    jobs = [(t.number, t.params, args.space or DEFAULT_SPACE, args.epochs, args.subset, precision) for t in chosen]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(max(1, min(args.jobs, len(jobs)))) as pool:
        results = pool.map(finish, jobs)
    print(f"{len(completed)} completed trial(s); top 5: {', '.join(f'{100 * v:.2f}%' for v in completed[:5])}")
    print("| trial | stopped after epoch | value then (study) | value then (rerun) | final (rerun) | rank among completed |")
    print("|---|---|---|---|---|---|")
    for t, r in zip(chosen, results):
        stop = max(t.intermediate_values)
        final = r["curve"][-1]
        rank = 1 + sum(v > final for v in completed)
        print(f"| {t.number} | {stop} | {100 * last[t.number]:.2f}% | {100 * r['curve'][stop - 1]:.2f}% | "
              f"{100 * final:.2f}% | {rank} of {len(completed) + 1} |")


if __name__ == "__main__":
    main()
