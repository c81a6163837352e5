"""Processes that open a fresh store at the same instant. A new sqlite tracking file (the default) gets its
schema created once, under a lock, instead of the processes racing MLflow's migrations (seen: one of two
`fmnist search` workers started together died with alembic's "Online migration expected to match one row"
or "table _alembic_tmp_experiments already exists"). Sweep and search workers started together on a new
store and a new Optuna storage: one creates the study, its parent and its queue, the others wait for it,
and each queued trial is claimed by one worker (storage.serialize_sqlite)."""

import subprocess
import sys

import mlflow

from conftest import cli_env

# Each process imports everything first, then waits at a barrier until all have (a file each in a folder),
# then does what every `fmnist` command does first: check the store (which creates its schema), select the
# experiment, log a run.
BARRIER = """
import os, sys, time
folder, n = sys.argv[1], int(sys.argv[2])
open(os.path.join(folder, str(os.getpid())), "w").close()
while len(os.listdir(folder)) < n:
    time.sleep(0.001)
"""
OPEN_AT = """
import sys
from fmnist_mlflow.tracking import connection, records
from fmnist_mlflow.tracking import experiment as experiments
from fmnist_mlflow.tracking import runs
from fmnist_mlflow.schema import KIND_TRAIN
""" + BARRIER + """
connection.check_reachable()
experiment = experiments.use_experiment("fmnist")
with runs.run("together", kind=KIND_TRAIN, experiment_id=experiment):
    records.log_report(metrics={"x": 1.0})
print("ok")
"""


def barrier(tmp_path) -> str:
    folder = tmp_path / "barrier"
    folder.mkdir()
    return str(folder)


# A client we did not start: MLflow's own, opening the same file (a notebook, `mlflow ui`).
FOREIGN_AT = """
import sys
import mlflow
""" + BARRIER + """
client = mlflow.MlflowClient(sys.argv[3])
client.search_experiments(max_results=1)
client.search_registered_models(max_results=1)
print("ok")
"""


def test_processes_and_a_client_we_did_not_start_opening_a_fresh_sqlite_file_together_all_succeed(tmp_path):
    """Two of ours (the first steps of every command: check the store, select the experiment, log a run)
    and MLflow's own client, started at one instant on a new sqlite file, in two folders at once. Ours take
    turns under a file lock; the other client does not take it (seen: "duplicate column name:
    routing_strategy", or a file left half-migrated with "_alembic_tmp_latest_metrics"), so ours never
    migrates beside it: a new file is made aside and linked into place, or the other client is waited for.
    Every process succeeds, every run is FINISHED, each file is whole."""
    import sqlite3

    procs, files = [], []
    for i in range(2):
        folder = tmp_path / f"store{i}"
        folder.mkdir()
        files.append(folder / "mlflow.db")
        uri = f"sqlite:///{files[-1]}"
        gate = barrier(folder)
        for code in (OPEN_AT, OPEN_AT, FOREIGN_AT):
            procs.append(subprocess.Popen([sys.executable, "-c", code, gate, "3", uri],
                                          env=cli_env(MLFLOW_TRACKING_URI=uri), cwd=folder,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.strip().endswith("ok") and "Traceback" not in err, err[-3000:]
    for path in files:
        with sqlite3.connect(path) as db:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            assert not [t for t in tables if t.startswith("_alembic_tmp_")]
            assert len(db.execute("SELECT version_num FROM alembic_version").fetchall()) == 1
        mlflow.set_tracking_uri(f"sqlite:///{path}")
        try:
            runs = mlflow.search_runs(experiment_names=["fmnist"], output_format="list")
            assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
        finally:
            mlflow.set_tracking_uri(None)
    assert not [p for p in tmp_path.rglob("*.new*")]  # no private file left beside a store


# A `fmnist` command that imports everything first, then starts when all the others have (the barrier).
COMMAND_AT = """
import sys
import torch, mlflow, optuna
from fmnist_mlflow.cli import main as cli
from fmnist_mlflow.studies import search, sweep
from fmnist_mlflow.tracking import connection, experiment, runs
""" + BARRIER + """
cli.main(sys.argv[3:], prog_name="fmnist")
"""
SMALL_GRID = {"name": "together", "models": ["model1"], "losses": ["ce"], "optimizers": ["adam", "sgd"],
              "lr": {"adam": 0.001, "sgd": 0.05}, "batch_size": 64, "epochs": 1, "seeds": [0, 1]}  # 4 points
SMALL_SPACE = {"name": "together", "metric": "val_accuracy", "fixed": {"model": "model1", "loss": "ce", "seed": 0},
               "search": {"optimizer": {"choices": ["adam"]}, "lr": {"adam": {"low": 1e-4, "high": 1e-2, "log": True}}}}
SMALL = ["--subset", "300", "--device", "cpu", "--threads", "1", "--jobs", "1"]


def start_together(tmp_path, n: int, args: list, uri: str) -> None:
    """`n` commands started at one instant; every one must exit 0 without a traceback."""
    folder = barrier(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", COMMAND_AT, folder, str(n), *args],
                              env=cli_env(MLFLOW_TRACKING_URI=uri, FMNIST_HEARTBEAT_S="5"), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0 and "Traceback" not in err, (out + err)[-3000:]


def study_and_runs(uri: str, storage: str, kind: str):
    import optuna

    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    mlflow.set_tracking_uri(uri)
    try:
        runs = mlflow.search_runs(experiment_names=["fmnist"], output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
    parents = [r for r in runs if r.data.tags.get("fmnist.kind") == kind]
    child_kind = {"sweep": "sweep-child", "search": "trial"}[kind]
    children = [r for r in runs if r.data.tags.get("fmnist.kind") == child_kind]
    return study, parents, children


def check_sweep(uri: str, storage: str) -> None:
    """Every point COMPLETE once and its run FINISHED once, under one parent."""
    study, parents, children = study_and_runs(uri, storage, "sweep")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    points = [(t.params["config"], t.params["seed"]) for t in study.trials if t.state.name == "COMPLETE"]
    assert len(points) == len(set(points)) == 4
    # a worker that asked as the last points were taken leaves a PRUNED trial that says so and ran nothing
    others = [t for t in study.trials if t.state.name != "COMPLETE"]
    assert all(t.state.name == "PRUNED" and "no_point" in t.user_attrs for t in others), others
    finished = sorted((r.data.params["optimizer"], r.data.params["seed"]) for r in children)
    assert finished == [("adam", "0"), ("adam", "1"), ("sgd", "0"), ("sgd", "1")]
    assert {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}


def check_search(uri: str, storage: str, trials: int) -> None:
    """Every trial COMPLETE, each with one FINISHED run, under one parent."""
    study, parents, children = study_and_runs(uri, storage, "search")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * trials
    assert sorted(int(r.data.tags["fmnist.trial"]) for r in children) == list(range(trials))
    assert {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}


def sweep_args(tmp_path) -> list:
    import yaml

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(SMALL_GRID))
    # every point must run here (what is tested is that each is claimed once); racing has its own tests
    return ["sweep", "--grid", str(grid), "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--no-race", *SMALL]


def search_args(tmp_path, trials: int) -> list:
    import yaml

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SMALL_SPACE))
    return ["search", "--space", str(space), "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--trials",
            str(trials), "--epochs", "1", "--pruner", "none", *SMALL]


def test_sweep_workers_started_together_on_a_fresh_store_all_finish(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start_together(tmp_path, 3, sweep_args(tmp_path), uri)
    check_sweep(uri, f"sqlite:///{tmp_path / 'optuna.db'}")


def test_search_workers_started_together_on_a_fresh_store_all_finish(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    n = 3
    start_together(tmp_path, n, search_args(tmp_path, 1), uri)
    check_search(uri, f"sqlite:///{tmp_path / 'optuna.db'}", n)


def test_workers_started_together_on_a_fresh_tracking_server_all_finish(tmp_path, mlflow_server):
    """The same against a new sqlite-backed `mlflow server`: three sweep workers at one instant create the
    experiment and the parent through its REST API (search workers coordinate through their Optuna storage
    as on a sqlite store, above)."""
    start_together(tmp_path, 3, sweep_args(tmp_path), mlflow_server)
    check_sweep(mlflow_server, f"sqlite:///{tmp_path / 'optuna.db'}")


def test_sweep_workers_started_together_on_a_new_postgresql_storage_all_finish(tmp_path, postgres_url):
    """Three workers at one instant on a new PostgreSQL database (Optuna's tables not yet created)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = sweep_args(tmp_path)
    args[args.index("--storage") + 1] = postgres_url
    start_together(tmp_path, 3, args, uri)
    check_sweep(uri, postgres_url)


def test_a_new_sqlite_file_is_made_aside_whatever_its_name_or_query_and_a_memory_store_makes_no_file(tmp_path, monkeypatch):
    from fmnist_mlflow.tracking import connection, fresh_sqlite

    folder = tmp_path / "a folder ?#%20"  # characters a file: URI must escape
    folder.mkdir()
    monkeypatch.chdir(folder)
    assert not fresh_sqlite.made(folder / "mlflow.db")
    connection.check_reachable("sqlite:///mlflow.db?timeout=30")  # relative, with a query: kept on the private file
    assert fresh_sqlite.made(folder / "mlflow.db")
    assert sorted(p.name for p in folder.iterdir()) == ["mlflow.db"]  # no private file, no journal left
    connection.check_reachable("sqlite:///:memory:")
    assert sorted(p.name for p in folder.iterdir()) == ["mlflow.db"]


def test_an_old_journal_beside_an_absent_file_is_never_linked_under_and_the_store_is_made_in_place(tmp_path):
    """Linking a new file under a name whose crashed journal lies beside it would replay that journal into
    it: the store is then made in place, where SQLite discards a journal beside an empty file."""
    from fmnist_mlflow.tracking import connection, fresh_sqlite

    (tmp_path / "mlflow.db-journal").write_bytes(b"\xd9\xd5\x05\xf9\x20\xa1\x63\xd7" + bytes(504))
    made = []
    assert not fresh_sqlite.make_aside(tmp_path / "mlflow.db", str, made.append) and made == []
    connection.check_reachable(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert fresh_sqlite.made(tmp_path / "mlflow.db")


def test_waiting_for_another_client_ends_when_the_file_is_made_or_quiet(tmp_path, empty_store):
    import shutil

    from fmnist_mlflow.tracking import fresh_sqlite

    whole = tmp_path / "whole.db"
    shutil.copyfile(empty_store, whole)
    assert fresh_sqlite.wait_until_made(whole, quiet_s=0.2, empty_quiet_s=0.4) is True
    # quiet files nobody writes are given up on, each after its own wait (the other one, 60 s, would
    # overrun the 2 s timeout: TimeoutError)
    empty = tmp_path / "empty.db"
    empty.touch()
    assert fresh_sqlite.wait_until_made(empty, quiet_s=60, empty_quiet_s=0.2, timeout_s=2) is False
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database")
    assert fresh_sqlite.wait_until_made(junk, quiet_s=0.2, empty_quiet_s=60, timeout_s=2) is False
