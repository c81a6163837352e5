"""The main job as the README writes it, raced and with every seed, side by side on this machine.

Each arm is a fresh `git clone` of this repository's HEAD in which the README's command runs as written:

    mlflow run . --env-manager local --experiment-name fmnist                  # arm "raced" (the default)
    mlflow run . --env-manager local --experiment-name fmnist -P race=false    # arm "every seed"

so each gets fresh stores (./mlflow.db, ./optuna.db, ./mlruns in its clone), worker start-up, data loading
and MLflow logging included: the wall time is what a user waits for. Then it reads each arm's sweep parent
back and prints (and with --report, writes) the wall times and their ratio, each arm's winner and "=" set,
the raced-out configs, and the training seconds. Nothing else should run on the machine meanwhile.

    cd <any folder> && python <repo>/scripts/main_job_bench.py --dir runs --report main-job.md
    python scripts/main_job_bench.py --extra "-P epochs=3"   # a smaller size, said in the report
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

README_COMMAND = "mlflow run . --env-manager local --experiment-name fmnist"
ARMS = {"raced": "", "every seed": "-P race=false"}


def run_arm(repo: Path, home: Path, extra: str) -> dict:
    subprocess.run(["git", "clone", "-q", str(repo), str(home)], check=True)
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # MLflow's defaults, as for a user
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '')}"
    command = f"{README_COMMAND} {extra}".strip()
    started = time.monotonic()
    with open(home.parent / f"{home.name}.log", "w") as log:
        proc = subprocess.run([str(bin_dir / "mlflow"), *shlex.split(command)[1:]], cwd=home, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    wall = time.monotonic() - started
    if proc.returncode:
        sys.exit(f"{command} in {home} exited {proc.returncode}; see {home.parent / (home.name + '.log')}")
    return {"command": command, "wall_s": wall, **read_back(home)}


def read_back(home: Path) -> dict:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    try:
        (parent,) = mlflow.search_runs(experiment_names=["fmnist"], output_format="list",
                                       filter_string="tags.`fmnist.kind` = 'sweep'")
        client = mlflow.MlflowClient()
        local = client.download_artifacts(parent.info.run_id, "summary_by_config.csv", str(home))
        configs = list(csv.DictReader(io.StringIO(Path(local).read_text())))
        runs = list(csv.DictReader(io.StringIO(Path(client.download_artifacts(parent.info.run_id, "summary.csv",
                                                                              str(home))).read_text())))
        summary_md = Path(client.download_artifacts(parent.info.run_id, "summary.md", str(home))).read_text()
    finally:
        mlflow.set_tracking_uri(None)
    name = lambda c: f"{c['model']}-{c['loss']}-{c['optimizer']}"  # noqa: E731
    best = next(name(c) for c in configs if c["rank"] == "1")
    return {
        "winner": best,
        "same_as_best": sorted(name(c) for c in configs if c["same_as_best"] == "True"),
        "raced_out": {name(c): c["status"] for c in configs if c["status"].startswith("raced out")},
        "runs": sum(r["status"] == "FINISHED" for r in runs),
        "train_seconds": sum(float(r["train_seconds"] or 0) for r in runs),
        "parent_params": dict(parent.data.params),
        "tags": {k: v for k, v in parent.data.tags.items() if not k.startswith("mlflow.note")},
        "summary_md": summary_md,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="main-job-bench", help="where the clones go (must not exist)")
    parser.add_argument("--extra", default="", help="extra `mlflow run` arguments for both arms, e.g. -P epochs=3")
    parser.add_argument("--report", default=None, help="write the report (JSON beside it) here")
    args = parser.parse_args()
    repo = Path(__file__).resolve().parents[1]
    root = Path(args.dir).resolve()
    root.mkdir(parents=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    results = {}
    for i, (arm, flag) in enumerate(ARMS.items()):
        results[arm] = run_arm(repo, root / f"arm{i}", f"{args.extra} {flag}".strip())
        print(f"{arm}: {results[arm]['wall_s'] / 60:.1f} min, winner {results[arm]['winner']}", flush=True)
    raced, every = results["raced"], results["every seed"]
    lines = [f"Commit `{commit}`; arms run one after the other, each in a fresh clone with fresh stores.", "",
             "| arm | command | wall time | runs | training seconds | winner | best or = |",
             "|---|---|---|---|---|---|---|"]
    for arm, r in results.items():
        lines.append(f"| {arm} | `{r['command']}` | {r['wall_s'] / 60:.1f} min | {r['runs']} | {r['train_seconds']:,.0f} | "
                     f"{r['winner']} | {', '.join(r['same_as_best'])} |")
    lines += ["", f"Raced / every seed: **{raced['wall_s'] / every['wall_s']:.2f}x** the wall time, "
                  f"{raced['train_seconds'] / every['train_seconds']:.2f}x the training seconds; same winner: "
                  f"**{raced['winner'] == every['winner']}**; same best-or-'=' set: "
                  f"**{raced['same_as_best'] == every['same_as_best']}**.", "",
              "Raced out: " + (", ".join(f"{k} ({v})" for k, v in raced["raced_out"].items()) or "none") + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        Path(args.report).write_text(text)
        Path(args.report).with_suffix(".json").write_text(json.dumps({"commit": commit, **results}, indent=1))


if __name__ == "__main__":
    main()
