"""What a study's early epochs say, and what each candidate pruner would have stopped, from its storage.

The same tables and figure `fmnist search` logs on a study's parent (`early_epochs.md`, `curves.csv`,
`curves.png`), computed for any existing study: the measurement the default pruner was chosen by.

    cd <any folder> && python <repo>/scripts/fidelity_report.py --storage sqlite:///optuna.db \
        --study model3-levers --epochs 10 --out fidelity/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import optuna

from fmnist_mlflow.studies import fidelity
from fmnist_mlflow.studies import pruners
from fmnist_mlflow.studies import search_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True)
    parser.add_argument("--study", required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--metric", default="val_accuracy")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=args.study, storage=args.storage)
    args.out.mkdir(parents=True, exist_ok=True)
    table = fidelity.markdown(fidelity.early_epochs(study, args.epochs), args.metric)
    replays = search_report.replays_markdown(pruners.replay_all(study, args.epochs))
    (args.out / "early_epochs.md").write_text(table + "\n" + replays)
    (args.out / "curves.csv").write_text(fidelity.curves_csv(study))
    fidelity.figure(study, args.epochs, args.metric).savefig(args.out / "curves.png", dpi=110)
    print(table)
    print(replays)


if __name__ == "__main__":
    main()
