"""Time a whole grid sweep with each `--jobs` value, side by side in one run, each in a fresh tracking store
and Optuna storage; print (and with --out, write) wall time, throughput and the ratio to the first value.

    cd <any folder> && python scripts/grid_jobs.py --jobs 1 2                 # the report's grid on the CPU
    python scripts/grid_jobs.py --device cuda --jobs 1 2 4 --out grid-jobs.md  # on a GPU machine

Every run is a real `fmnist sweep` (worker start-up, data loading and MLflow logging included), so the
figures are what a user waits for. Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(jobs: int, args, root: Path) -> dict:
    home = root / f"jobs{jobs}"
    home.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "fmnist_mlflow", "sweep", "--jobs", str(jobs), "--device", args.device,
           "--storage", f"sqlite:///{home / 'optuna.db'}", "--seeds", args.seeds]
    cmd += ["--epochs", str(args.epochs)] if args.epochs else []
    cmd += ["--subset", str(args.subset)] if args.subset else []
    if args.grid:
        cmd += ["--grid", args.grid]
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=home, capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        sys.exit(f"--jobs {jobs} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = summary_rows(home)
    return {"jobs": jobs, "wall_s": wall, "runs": len(rows), "train_s": sum(float(r["train_seconds"]) for r in rows),
            "best": max(float(r["val_accuracy"]) for r in rows)}


def summary_rows(home: Path) -> list:
    import mlflow

    from fmnist_mlflow import schema

    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    (parent,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
                 if r.data.tags.get(schema.TAG_KIND) == schema.KIND_SWEEP]
    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    text = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/summary.csv")
    return list(csv.DictReader(io.StringIO(text)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--grid", default=None, help="grid file (default: the report's 18 configs)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=int, default=0, help="0: the grid's own (10)")
    parser.add_argument("--subset", type=int, default=0, help="0: all 50,000 training images")
    parser.add_argument("--out", default=None, help="also write the table (Markdown) here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fmnist-grid-jobs-") as tmp:
        results = []
        for jobs in args.jobs:
            results.append(run(jobs, args, Path(tmp)))
            r = results[-1]
            print(f"--jobs {jobs}: {r['wall_s']:.0f} s wall for {r['runs']} runs", flush=True)
    base = results[0]
    lines = ["| --jobs | wall time | runs | runs per hour | throughput vs --jobs %d | training seconds (sum over runs) | best val_accuracy |" % base["jobs"],
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['jobs']} | {r['wall_s'] / 60:.1f} min | {r['runs']} | {r['runs'] / r['wall_s'] * 3600:.1f} | "
                     f"{base['wall_s'] / r['wall_s']:.2f}x | {r['train_s']:.0f} | {100 * r['best']:.2f}% |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
