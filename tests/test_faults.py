"""Faults a user meets with a real `mlflow server`: the server dying mid-sweep, a server that refuses this
host name (the README's scaling-out recipe), passwords in URIs, unreadable inputs to `fmnist predict`."""

import os
import re
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest
import requests
import yaml
from click.testing import CliRunner

from conftest import cli_env, start_mlflow_server, free_port, reset_mlflow, stop, wait_http
from fmnist_mlflow import schema
from fmnist_mlflow.cli import main as cli
from fmnist_mlflow.tracking import connection
from fmnist_mlflow.training import inputs
from fmnist_mlflow.tracking import runs


def start_server(root, port, *extra):
    proc = start_mlflow_server(root, port, *extra)
    wait_http(f"http://127.0.0.1:{port}/health", proc)
    return proc


def test_a_tracking_server_dying_mid_sweep_stops_it_with_one_line_and_resume_reaps_the_orphans(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({
        "name": "doomed", "models": ["model1"], "losses": ["ce"], "optimizers": ["adam", "sgd"],
        "lr": {"adam": 0.001, "sgd": 0.05}, "batch_size": 64, "epochs": 12, "seeds": [0]}))
    args = [sys.executable, "-m", "fmnist_mlflow", "sweep", "--grid", str(grid_file), "--subset", "1500",
            "--device", "cpu", "--threads", "1"]
    # no HTTP retries: each call to the dead server fails at once (the default bound on retries is
    # tests/test_cli.py's; here it would only add its few seconds per call)
    env = cli_env(MLFLOW_TRACKING_URI=uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    server = start_server(root, port)
    try:
        sweep = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait until the first child has logged an epoch
            metrics = requests.post(f"{uri}/api/2.0/mlflow/runs/search", json={"experiment_ids": ["1"]}, timeout=10)
            if metrics.ok and any(m["key"] == "val_accuracy" for r in metrics.json().get("runs", [])
                                  for m in r["data"].get("metrics", [])):
                break
            time.sleep(1)
        stop(server)  # the server dies mid-config
        output, _ = sweep.communicate(timeout=240)  # a hang guard, not a measurement
        assert sweep.returncode == 1, output[-3000:]
        assert "Traceback" not in output and f"tracking store {uri} failed" in output, output[-3000:]

        server = start_server(root, port)  # the server is back
        mlflow.set_tracking_uri(uri)
        stuck = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
                 if r.info.status == "RUNNING"]
        assert stuck  # the dead server could not be told: the parent and the child were left RUNNING
        resumed = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
        assert [r for r in runs if r.info.status == "RUNNING"] == []
        parents = [r for r in runs if r.data.tags.get(schema.TAG_KIND) == "sweep"]
        children = [r for r in runs if r.data.tags.get(schema.TAG_KIND) == "sweep-child"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        orphans = [c for c in children if c.info.status == "KILLED"]
        assert len(orphans) == 1 and orphans[0].data.tags[schema.TAG_FAILURE].startswith("orphaned")
        finished = sorted(c.data.params["optimizer"] for c in children if c.info.status == "FINISHED")
        assert finished == ["adam", "sgd"]  # each config exactly once
    finally:
        reset_mlflow()
        stop(server)


def test_allowed_hosts_the_readme_recipe_and_a_clear_error_for_a_refused_host_name(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    # as the README says for a shared server: list the name the workers use
    server = start_server(root, port, "--allowed-hosts", f"tracking.example:{port},127.0.0.1:{port}")
    try:
        api = f"{uri}/api/2.0/mlflow/experiments/search"
        ok = requests.get(api, params={"max_results": 1}, headers={"Host": f"tracking.example:{port}"}, timeout=10)
        refused = requests.get(api, params={"max_results": 1}, headers={"Host": f"other.example:{port}"}, timeout=10)
        health = requests.get(f"{uri}/health", headers={"Host": f"other.example:{port}"}, timeout=10)
        assert ok.status_code == 200 and refused.status_code == 403 and health.ok  # /health alone proves nothing
        assert connection.check_reachable(uri) == uri
    finally:
        stop(server)
    server = start_server(root, port, "--allowed-hosts", "only.example")  # refuses 127.0.0.1
    try:
        with pytest.raises(connection.TrackingError, match="refused an API call: HTTP 403.*--allowed-hosts"):
            connection.check_reachable(uri)
    finally:
        stop(server)


@pytest.mark.parametrize("command", [["train", "--device", "cpu", "--subset", "300", "--epochs", "1"],
                                     ["predict", "nothing.npy"]])
def test_a_tracking_uri_of_an_unknown_scheme_is_one_line_naming_it(store, monkeypatch, command):
    """MLflow's own words were "Model registry functionality is unavailable"."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "notascheme://foo")
    mlflow.set_tracking_uri("notascheme://foo")
    result = CliRunner().invoke(cli.main, command)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "tracking store notascheme://foo: MLflow has no tracking store for the scheme 'notascheme'" in result.output
    assert "registry functionality" not in result.output


def test_no_password_is_ever_printed(store, tmp_path, monkeypatch):
    bad = f"http://user:secretpw@127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", bad)
    mlflow.set_tracking_uri(bad)
    result = CliRunner().invoke(cli.main, ["train", "--device", "cpu", "--subset", "300", "--epochs", "1"])
    assert result.exit_code == 1 and "secretpw" not in result.output and "user:***@127.0.0.1" in result.output
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    mlflow.set_tracking_uri(store)
    result = CliRunner().invoke(cli.main, ["search", "--storage", "postgresql://user:secretpw@host:notaport/db",
                                           "--trials", "1", "--subset", "300", "--epochs", "1", "--device", "cpu"])
    assert result.exit_code == 2 and "secretpw" not in result.output and "user:***@host" in result.output


def test_predict_treats_empty_arrays_and_decompression_bombs_as_bad_inputs(tmp_path):
    from PIL import Image

    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(inputs.InputError, match="empty.npy: not a readable .npy array"):
        inputs.read_input(str(tmp_path / "empty.npy"))
    for shape in ((0, 28, 28), (0, 1, 28, 28), (0,)):  # named as the file has it, not as reshaped
        np.save(tmp_path / "none.npy", np.zeros(shape, dtype=np.uint8))
        with pytest.raises(inputs.InputError, match=re.escape(f"none.npy: shape {shape} holds no image")):
            inputs.read_input(str(tmp_path / "none.npy"))
    bomb = tmp_path / "bomb.png"
    Image.new("L", (1, 1)).save(bomb)
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 0.5  # a 1-pixel PNG is now over the limit: the same code path as a real bomb
        with pytest.raises(inputs.InputError, match="bomb.png: refused, too many pixels"):
            inputs.read_input(str(bomb))
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    np.save(tmp_path / "ok.npy", np.zeros((2, 28, 28), dtype=np.uint8))
    assert inputs.read_input(str(tmp_path / "ok.npy")).images.shape == (2, 1, 28, 28)


def test_a_search_worker_killed_with_sigkill_is_noticed_its_run_ended_and_its_trial_retried(store, tmp_path):
    import optuna
    import signal

    from fmnist_mlflow.studies.storage import GRACE_FACTOR

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "name": "lost", "fixed": {"model": "model2", "loss": "ce", "seed": 0},
        "search": {"optimizer": {"choices": ["adam"]}, "lr": {"adam": {"low": 1e-3, "high": 2e-3}}}}))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = [sys.executable, "-m", "fmnist_mlflow", "search", "--space", str(space), "--storage", storage, "--trials",
            "1", "--epochs", "25", "--subset", "2000", "--device", "cpu", "--threads", "1", "--pruner", "none"]
    env = cli_env(MLFLOW_TRACKING_URI=store, FMNIST_HEARTBEAT_S="1")
    worker = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    study = None
    while time.monotonic() < deadline:
        time.sleep(1)
        try:
            study = optuna.load_study(study_name="lost", storage=storage)
        except KeyError:
            continue
        if study.trials and study.trials[0].intermediate_values:
            break
    os.kill(worker.pid, signal.SIGKILL)  # no chance to clean up
    worker.wait()
    lost_run = study.trials[0].user_attrs[schema.ATTR_RUN]
    assert mlflow.get_run(lost_run).info.status == "RUNNING"
    time.sleep(GRACE_FACTOR * 1 + 2)  # past the grace period
    resumed = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    study = optuna.load_study(study_name="lost", storage=storage)
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "COMPLETE"], states
    assert study.trials[1].params == study.trials[0].params  # the same config, retried
    lost = mlflow.get_run(lost_run)
    assert lost.info.status == "KILLED" and lost.data.tags[schema.TAG_FAILURE].startswith("worker lost")
    assert [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
            if r.info.status == "RUNNING"] == []


def test_a_server_that_accepts_connections_but_never_answers_fails_after_the_wait_it_promises():
    import socket

    assert connection.REACH_TIMEOUT_S == 15  # what the README promises; here a 3 s wait stands for it
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # accepts (the kernel completes the handshake) and never answers
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        # the message gives the seconds it waited: the wait asked for, not MLflow's 120 s timeout and retries
        with pytest.raises(connection.TrackingError, match=r"did not answer within 3 s \(no answer\)"):
            connection.check_reachable(uri, timeout=3)


@pytest.mark.parametrize("command", [["train", "--device", "cpu", "--subset", "300", "--epochs", "1"],
                                     ["predict", "--model-uri", "models:/fmnist-cnn@champion", "x.png"]])
def test_an_unreachable_database_or_server_fails_in_seconds_with_one_line(store, monkeypatch, tmp_path, command):
    port = free_port()  # nothing listens there
    # was 106 s (PostgreSQL) and 248 s (predict): now the connection is tried once with a short timeout, and a
    # refused port is given up after 3 s; the line says which
    for uri, reason in ((f"postgresql://user:secretpw@127.0.0.1:{port}/mlflow", "cannot be reached"),
                        (f"http://127.0.0.1:{port}", "connection refused: no server on that port")):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        result = CliRunner().invoke(cli.main, command)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and "secretpw" not in result.output
        assert reason in result.output, result.output
        assert uri.startswith("http") or "user:***@" in result.output  # the password hidden, the user kept
    mlflow.set_tracking_uri(store)


def test_a_run_ended_while_its_server_is_gone_is_forgotten_by_this_process(store, monkeypatch):
    """`runs._end` leans on `mlflow.end_run` taking the run off MLflow's stack of active runs before it
    tells the server: if MLflow changes that, a worker that lost its server would keep a dead run active."""
    import mlflow

    from conftest import free_port
    from fmnist_mlflow.tracking import runs

    with pytest.raises(RuntimeError):
        with runs.run("doomed", kind="train"):
            monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
            mlflow.set_tracking_uri(f"http://127.0.0.1:{free_port()}")  # nothing listens there: refused
            raise RuntimeError("the work failed, then the server went")
    assert mlflow.active_run() is None


def test_usage_errors_answer_before_torch_mlflow_or_optuna_are_imported(tmp_path):
    """The checks that need no torch come first: a usage error costs a fraction of a second, not the
    seconds torch and MLflow take to import on a loaded machine."""
    probe = ("import sys\nfrom fmnist_mlflow.cli.main import main\n"
             "try:\n    main(sys.argv[1:], prog_name='fmnist')\nexcept SystemExit as exc:\n"
             "    heavy = sorted(m for m in ('torch', 'mlflow', 'optuna') if m in sys.modules)\n"
             "    print('exit', exc.code, 'imported', heavy)\n")
    for args in (["train", "--model", "model1", "--dropout", "0.3"], ["train", "--lr", "0"],
                 ["sweep", "--seeds", "0,,1"], ["sweep", "--epochs", "3", "--subset", "2"],
                 ["search", "--space", os.devnull], ["search", "--trials", "0"]):
        proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=tmp_path,
                              env=cli_env(), timeout=120)
        assert "exit 2 imported []" in proc.stdout, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_sigterm_while_sweep_workers_start_ends_the_parent_killed_and_says_so(store, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "fmnist_mlflow", "sweep", "--seeds", "0", "--subset", "600",
                             "--epochs", "2", "--jobs", "2"], env=cli_env(MLFLOW_TRACKING_URI=store), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # the workers are being started: no child run can have begun
        lines.append(line)
        if "2 workers" in line:
            proc.terminate()
            break
    lines += proc.stdout.readlines()
    proc.wait(timeout=120)
    output = "".join(lines)
    assert proc.returncode == 130, output
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    parents = [r for r in runs if r.data.tags.get(schema.TAG_KIND) == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "KILLED", output
    assert f"interrupted: run {parents[0].info.run_id} ended KILLED" in output
    assert {r.info.status for r in runs} <= {"KILLED", "FINISHED"} and "Traceback" not in output


def test_an_interrupt_says_which_runs_it_ended_and_no_more(store):
    from fmnist_mlflow.cli.boundary import interrupted_line

    assert interrupted_line(KeyboardInterrupt()) == "interrupted (no run was open)"
    with pytest.raises(KeyboardInterrupt) as caught:
        with runs.run("outer", kind=schema.KIND_TRAIN) as outer:
            with runs.run("inner", kind=schema.KIND_EVALUATION, parent_run_id=outer.info.run_id) as inner:
                raise KeyboardInterrupt("simulated Ctrl-C")
    assert interrupted_line(caught.value) == f"interrupted: runs {inner.info.run_id}, {outer.info.run_id} ended KILLED"


def test_a_sweep_on_a_full_disk_is_one_line_and_its_resume_ends_the_stranded_runs(tiny_disk, tmp_path):
    """Optuna, failing to record the failed trial on the full disk, ends in its own AssertionError: the line
    names the store error behind it. (`fmnist train` on a full disk: tests/test_first_meet.py.)"""
    grid = tmp_path / "grid.yaml"  # four model3 configs: the store and its models (1 MB each) outgrow the 4 MB disk
    grid.write_text(yaml.safe_dump({"name": "full", "models": ["model3"], "losses": ["ce", "bce"], "optimizers": ["adam", "sgd"],
                                    "lr": {"adam": 0.001, "sgd": 0.05}, "batch_size": 64, "epochs": 1, "seeds": [0]}))
    command = ["sweep", "--grid", str(grid), "--seeds", "0", "--epochs", "1", "--jobs", "1", "--no-race"]
    env = cli_env()
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store, ./mlflow.db, on the full disk
    run = [sys.executable, "-m", "fmnist_mlflow", *command, "--subset", "600", "--device", "cpu"]
    # stdout and stderr go to the test's own disk: the full one could not hold the message
    proc = subprocess.run(run, cwd=tiny_disk, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "its disk is full" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # room again, the store as the failure left it: what a user does next
    subprocess.run(["mount", "-o", "remount,size=40m", str(tiny_disk)], check=True)
    # the same command again: the sweep resumes, its engine reaps the stranded child and retries its point
    # once its heartbeat has stopped
    again = subprocess.run(run, cwd=tiny_disk, env={**env, "FMNIST_HEARTBEAT_S": "1"}, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    mlflow.set_tracking_uri(f"sqlite:///{tiny_disk / 'mlflow.db'}")
    try:
        statuses = [r.info.status for r in mlflow.search_runs(search_all_experiments=True, output_format="list")]
    finally:
        reset_mlflow()
    assert "RUNNING" not in statuses and {"FAILED", "KILLED"} & set(statuses) and "FINISHED" in statuses
