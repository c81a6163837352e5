"""Time whole grid sweeps side by side in one run, each a real `fmnist sweep` in a fresh tracking store and
Optuna storage; print (and with --out, write) wall time, throughput and the ratio to the first arm.

    cd <any folder> && python scripts/grid_jobs.py --jobs 1 2                 # --jobs 1 against 2 on the CPU
    python scripts/grid_jobs.py --device cuda --jobs 1 2 4 --out grid-jobs.md  # on a GPU machine
    python scripts/grid_jobs.py --arm seeds=0,precision=fp32,jobs=1 --arm seeds=grid  # today's vs new defaults

An arm is what differs between the sweeps: `jobs` (a number or auto), `seeds` (0,1,2, or `grid`: the grid
file's own), `precision` (auto, fp32, bf16); what an arm leaves out comes from --jobs/--seeds/--precision.
Every run is a real `fmnist sweep` (worker start-up, data loading and MLflow logging included), so the
figures are what a user waits for. Nothing else should run on the machine meanwhile. --keep DIR keeps
each arm's stores (DIR/arm<i>/mlflow.db, optuna.db, mlruns/) to report from afterwards.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARM_KEYS = ("jobs", "seeds", "precision")


def parse_arm(text: str, defaults: dict) -> dict:
    arm = dict(defaults)
    for part in _pairs(text):
        key, _, value = part.partition("=")
        if key not in ARM_KEYS or not value:
            sys.exit(f"--arm {text!r}: expected key=value pairs with keys {', '.join(ARM_KEYS)}")
        arm[key] = value
    return arm


def _pairs(text: str) -> list:
    """'seeds=0,1,2,jobs=2' -> ['seeds=0,1,2', 'jobs=2']: a comma starts a new pair only before `key=`."""
    pairs: list = []
    for piece in text.split(","):
        if "=" in piece or not pairs:
            pairs.append(piece)
        else:
            pairs[-1] += "," + piece
    return pairs


def run(index: int, arm: dict, args, root: Path) -> dict:
    home = root / f"arm{index}"
    home.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "fmnist_mlflow", "sweep", "--jobs", arm["jobs"], "--device", args.device,
           "--precision", arm["precision"], "--storage", f"sqlite:///{home / 'optuna.db'}"]
    cmd += [] if arm["seeds"] == "grid" else ["--seeds", arm["seeds"]]
    cmd += ["--epochs", str(args.epochs)] if args.epochs else []
    cmd += ["--subset", str(args.subset)] if args.subset else []
    if args.grid:
        cmd += ["--grid", args.grid]
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=home, capture_output=True, text=True)
    wall = time.monotonic() - started
    (home / "sweep.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"arm {arm} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = summary_rows(home)
    workers = next((line.split()[0] for line in proc.stdout.splitlines() if " workers, " in line), "1")
    return {**arm, "workers": workers, "wall_s": wall, "runs": len(rows),
            "train_s": sum(float(r["train_seconds"]) for r in rows),
            "precision_used": ",".join(sorted({r.get("precision", "?") for r in rows})),
            "best": max(float(r["val_accuracy"]) for r in rows)}


def summary_rows(home: Path) -> list:
    import mlflow

    from fmnist_mlflow import schema

    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    (parent,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
                 if r.data.tags.get(schema.TAG_KIND) == schema.KIND_SWEEP]
    children = {r.info.run_id: r for r in client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    text = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/summary.csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    for row in rows:  # the precision each run logged (the resolved value)
        child = children.get(row.get("run_id", ""))
        row["precision"] = child.data.params.get("precision", "?") if child else "?"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", default=["1", "2"], help="one arm per value (ignored with --arm)")
    parser.add_argument("--arm", action="append", default=[], help="key=value,...: one sweep (see above)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--grid", default=None, help="grid file (default: the report's 18 configs)")
    parser.add_argument("--seeds", default="0", help="default seeds of the arms (grid: the grid file's)")
    parser.add_argument("--precision", default="fp32", help="default precision of the arms")
    parser.add_argument("--epochs", type=int, default=0, help="0: the grid's own (10)")
    parser.add_argument("--subset", type=int, default=0, help="0: all 50,000 training images")
    parser.add_argument("--out", default=None, help="also write the table (Markdown) here")
    parser.add_argument("--keep", default=None, help="keep each arm's stores under this folder")
    args = parser.parse_args()
    defaults = {"jobs": "1", "seeds": args.seeds, "precision": args.precision}
    arms = [parse_arm(a, defaults) for a in args.arm] or [{**defaults, "jobs": j} for j in args.jobs]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fmnist-grid-jobs-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        results = []
        for i, arm in enumerate(arms):
            results.append(run(i, arm, args, root))
            r = results[-1]
            print(f"arm {i} {arm}: {r['wall_s']:.0f} s wall for {r['runs']} runs", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    base = results[0]
    lines = ["| arm | --jobs (workers) | seeds | precision | wall time | runs | runs per hour | "
             "wall time vs arm 0 | throughput vs arm 0 | training seconds (sum over runs) | best val_accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(results):
        lines.append(f"| {i} | {r['jobs']} ({r['workers']}) | {r['seeds']} | {r['precision']} -> {r['precision_used']} | "
                     f"{r['wall_s'] / 60:.1f} min | {r['runs']} | {r['runs'] / r['wall_s'] * 3600:.1f} | "
                     f"{r['wall_s'] / base['wall_s']:.2f}x | {(r['runs'] / r['wall_s']) / (base['runs'] / base['wall_s']):.2f}x | "
                     f"{r['train_s']:.0f} | {100 * r['best']:.2f}% |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
