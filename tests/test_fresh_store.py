"""Processes that open a fresh tracking store at the same instant: a new sqlite file (the default) gets its
schema created once, under a lock, instead of the processes racing MLflow's migrations (seen: one of two
`fmnist search` workers started together died with alembic's "Online migration expected to match one row"
or "table _alembic_tmp_experiments already exists")."""

import subprocess
import sys
import time

import mlflow
import pytest

from conftest import cli_env

# Each process imports everything first, then waits for the same wall-clock instant, then does what every
# `fmnist` command does first: check the store (which creates its schema), select the experiment, log a run.
OPEN_AT = """
import sys, time
from fmnist_mlflow import connection, tracking
from fmnist_mlflow.schema import KIND_TRAIN
start = float(sys.argv[1])
while time.time() < start:
    time.sleep(0.001)
connection.check_reachable()
experiment = tracking.use_experiment("fmnist")
with tracking.run("together", kind=KIND_TRAIN, experiment_id=experiment):
    tracking.log_metrics({"x": 1.0})
print("ok")
"""


@pytest.mark.parametrize("attempt", range(5))
def test_processes_opening_a_fresh_sqlite_store_together_all_succeed(tmp_path, attempt):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    n = 4
    start = time.time() + 12  # after every process has imported MLflow, even on a loaded machine
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT, str(start)], env=cli_env(MLFLOW_TRACKING_URI=uri),
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    results = [p.communicate(timeout=180) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    mlflow.set_tracking_uri(uri)
    try:
        runs = mlflow.search_runs(experiment_names=["fmnist"], output_format="list")
        assert len(runs) == n and {r.info.status for r in runs} == {"FINISHED"}
    finally:
        mlflow.set_tracking_uri(None)


def test_sweep_workers_started_together_on_a_fresh_store_all_finish(tmp_path):
    import yaml

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "together", "models": ["model1"], "losses": ["ce"],
                                    "optimizers": ["adam", "sgd", "rmsprop"],
                                    "lr": {"adam": 0.001, "sgd": 0.05, "rmsprop": 0.001}, "batch_size": 64,
                                    "epochs": 1, "seeds": [0]}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [sys.executable, "-m", "fmnist_mlflow", "sweep", "--grid", str(grid), "--subset", "300", "--device", "cpu",
            "--threads", "1", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"]
    procs = [subprocess.Popen(args, env=cli_env(MLFLOW_TRACKING_URI=uri), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    mlflow.set_tracking_uri(uri)
    try:
        runs = mlflow.search_runs(experiment_names=["fmnist"], output_format="list")
        parents = [r for r in runs if r.data.tags.get("fmnist.kind") == "sweep"]
        children = [r for r in runs if r.data.tags.get("fmnist.kind") == "sweep-child"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert sorted(r.data.params["optimizer"] for r in children) == ["adam", "rmsprop", "sgd"]
        assert {r.info.status for r in children} == {"FINISHED"}
    finally:
        mlflow.set_tracking_uri(None)
