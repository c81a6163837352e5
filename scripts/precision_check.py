"""Does bf16 autocast change what a run reaches? The grid champion's and the search champion's configs,
several seeds each, at fp32 and at bf16, trained through the project's own `fit` (10 epochs, full data, no
MLflow), side by side in one run of this script; print (and with --out, write) val and test accuracy as
mean ± std over seeds, Welch's test fp32 vs bf16, and the training seconds of each.

    cd <any folder> && python scripts/precision_check.py --seeds 0 1 2 --workers 2 --out precision.md

Each task (config, precision, seed) runs in a spawned worker process with one CPU thread, so `--workers 2`
fills two cores; tasks alternate fp32 and bf16 so that both meet the same machine. The same seed gives the
same metrics only at the same thread count.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path

CONFIGS = {
    # experiments/GRID.md: the grid's best config on validation (the report's defaults otherwise)
    "grid champion (model3 + BCE + Adam)": dict(model="model3", loss="bce", optimizer="adam"),
    # experiments/SEARCH.md: the search's confirmed champion
    "search champion (model3 + CE + AdamW, onecycle)": dict(
        model="model3", loss="ce", optimizer="adam", lr=0.003, dropout=0.3, batch_size=128, weight_decay=0.01,
        schedule="onecycle", label_smoothing=0.1, augment="flip"),
}


def task(args: tuple) -> dict:
    name, precision, seed, epochs, subset = args
    import torch

    torch.set_num_threads(1)
    from fmnist_mlflow.training import data
    from fmnist_mlflow.training import train
    from fmnist_mlflow.training.config import RunConfig

    config = RunConfig(**CONFIGS[name], epochs=epochs, seed=seed, device="cpu", subset=subset, precision=precision)
    dataset = data.load(subset=subset)
    started = time.perf_counter()
    result = train.fit(config, dataset)
    wall = time.perf_counter() - started
    test = train.evaluate(result.model, data.load_test(), config.loss)
    return {"config": name, "precision": precision, "seed": seed, "val_accuracy": result.final["val_accuracy"],
            "test_accuracy": test["accuracy"], "train_s": sum(m["epoch_seconds"] for m in result.history),
            "wall_s": wall}


def table(rows: list) -> str:
    from fmnist_mlflow.results import stats

    def pm(values):
        e = stats.estimate(values)
        return f"{100 * e.mean:.2f}% ± {100 * (e.std or 0):.2f}"

    out = ["| config | precision | seeds | val accuracy | test accuracy | training s per run (mean) | speed vs fp32 |",
           "|---|---|---|---|---|---|---|"]
    for name in CONFIGS:
        by = {p: [r for r in rows if r["config"] == name and r["precision"] == p] for p in ("fp32", "bf16")}
        if not by["fp32"] or not by["bf16"]:
            continue
        base = sum(r["train_s"] for r in by["fp32"]) / len(by["fp32"])
        for p, rs in by.items():
            mean_s = sum(r["train_s"] for r in rs) / len(rs)
            out.append(f"| {name} | {p} | {', '.join(str(r['seed']) for r in rs)} | {pm([r['val_accuracy'] for r in rs])} | "
                       f"{pm([r['test_accuracy'] for r in rs])} | {mean_s:.0f} | {base / mean_s:.2f}x |")
        pv = stats.welch_p([r["val_accuracy"] for r in by["fp32"]], [r["val_accuracy"] for r in by["bf16"]])
        pt = stats.welch_p([r["test_accuracy"] for r in by["fp32"]], [r["test_accuracy"] for r in by["bf16"]])
        fmt = lambda p: "n/a" if p is None else f"{p:.2f}"  # noqa: E731
        out.append(f"| {name} | Welch's p, fp32 vs bf16 | | {fmt(pv)} | {fmt(pt)} | | |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--subset", type=int, default=0, help="0: all 50,000 training images")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, one CPU thread each")
    parser.add_argument("--out", default=None, help="also write the table (Markdown) and the rows (JSON) here")
    args = parser.parse_args()
    tasks = [(name, precision, seed, args.epochs, args.subset)
             for seed in args.seeds for name in CONFIGS for precision in ("fp32", "bf16")]
    rows = []
    with multiprocessing.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
        for row in pool.imap_unordered(task, tasks):
            rows.append(row)
            print(json.dumps(row), flush=True)
    text = table(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n\n```json\n" + json.dumps(rows, indent=1) + "\n```\n")


if __name__ == "__main__":
    main()
