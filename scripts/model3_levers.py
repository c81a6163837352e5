"""What can still move model3 in 10 epochs? Each lever against one base recipe (the committed search
champion's config), trained through the project's own `fit` (full data, no MLflow), side by side in one
run of this script; print (and with --out, write) the validation accuracy of each arm as mean ± std over
seeds, and the training seconds per run.

    cd <any folder> && python scripts/model3_levers.py --seeds 0 1 --workers 1 --out levers.md

Every run keeps an exponential moving average of its weights (decay --ema) beside the trained weights;
averaging reads the weights and never changes them, so one run gives four paired numbers: the trained
weights and the average, each with and without flip test-time augmentation. The other levers (model3's
width, onecycle's warm-up fraction, batch 256 with a scaled rate) are arms of their own on the same seeds.
Each run is a spawned worker with one CPU thread; tasks go seed by seed, so a stopped run still holds
whole seeds. Validation only: test accuracy is for the champion, never for choosing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path

# experiments/SEARCH.md: the search champion of the study before the levers (trial 4)
BASE = dict(model="model3", loss="ce", optimizer="adam", lr=0.003, dropout=0.3, batch_size=128, weight_decay=0.01,
            schedule="onecycle", label_smoothing=0.1, augment="flip")
ARMS = {
    "base (width 1, warm-up 0.3, batch 128)": {},
    "width 1.5 (48-96-192 channels)": dict(width=1.5),
    "width 2 (64-128-256 channels)": dict(width=2.0),
    "warm-up 0.15": dict(warmup=0.15),
    "batch 256, lr x sqrt(2) = 4.2e-3": dict(batch_size=256, lr=0.003 * 2 ** 0.5),
}
VARIANTS = ("trained", "trained + tta", "ema", "ema + tta")


def task(args: tuple) -> dict:
    arm, seed, epochs, subset, ema = args
    import torch

    torch.set_num_threads(1)
    from fmnist_mlflow.training import data
    from fmnist_mlflow.training import models
    from fmnist_mlflow.training import train
    from fmnist_mlflow.training.config import RunConfig

    config = RunConfig(**{**BASE, **ARMS[arm]}, ema=ema, epochs=epochs, seed=seed, device="cpu", subset=subset)
    dataset = data.load(subset=subset)
    result = train.fit(config, dataset)
    averaged = result.model  # ema on, tta off: the averaged weights
    nets = {"trained": result.trained, "trained + tta": models.FlipTTA(result.trained),
            "ema": averaged, "ema + tta": models.FlipTTA(averaged)}
    val = {name: train.evaluate(net, dataset.val, config.loss)["accuracy"] for name, net in nets.items()}
    return {"arm": arm, "seed": seed, "val_accuracy": val, "params": models.parameter_count(result.trained),
            "train_s": sum(m["epoch_seconds"] for m in result.history)}


def table(rows: list, ema: float) -> str:
    from fmnist_mlflow.results import stats

    def pm(values):
        e = stats.estimate(values)
        return f"{100 * e.mean:.2f}% ± {100 * (e.std or 0):.2f}"

    header = " | ".join(f"val: {v}" for v in VARIANTS).replace("ema", f"ema {ema:g}")
    out = [f"| arm | seeds | weights | {header} | training s per run |", "|---|---|---|" + "---|" * (len(VARIANTS) + 1)]
    for arm in ARMS:
        rs = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"])
        if rs:
            cells = " | ".join(pm([r["val_accuracy"][v] for r in rs]) for v in VARIANTS)
            out.append(f"| {arm} | {', '.join(str(r['seed']) for r in rs)} | {rs[0]['params']:,} | {cells} | "
                       f"{sum(r['train_s'] for r in rs) / len(rs):.0f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--subset", type=int, default=0, help="0: all 50,000 training images")
    parser.add_argument("--ema", type=float, default=0.999, help="the moving average's per-step decay")
    parser.add_argument("--arms", nargs="+", type=int, default=None, help="indices into ARMS (default: all)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes, one CPU thread each")
    parser.add_argument("--out", default=None, help="also write the table (Markdown) and the rows (JSON) here")
    args = parser.parse_args()
    arms = [a for i, a in enumerate(ARMS) if args.arms is None or i in args.arms]
    tasks = [(arm, seed, args.epochs, args.subset, args.ema) for seed in args.seeds for arm in arms]
    rows = []
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
        for row in pool.imap_unordered(task, tasks):
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:  # written after every run, so that a stopped script keeps what it measured
                text = table(rows, args.ema)
                Path(args.out).write_text(text + f"\n\nwall {time.perf_counter() - started:.0f} s\n\n```json\n"
                                          + json.dumps(rows, indent=1) + "\n```\n")
    print(table(rows, args.ema))


if __name__ == "__main__":
    main()
