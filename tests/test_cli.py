"""The `fmnist` CLI against real tracking stores: sqlite, a real `mlflow server`, and `mlflow run`."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from conftest import cli_env, free_port
from fmnist_mlflow.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ARGS = ["train", "--epochs", "1", "--subset", "600", "--device", "cpu"]  # the tests check device params


def runs(experiment="fmnist"):
    exp = mlflow.get_experiment_by_name(experiment)
    return [] if exp is None else mlflow.search_runs([exp.experiment_id], output_format="list")


def invoke(args):
    return CliRunner().invoke(cli.main, args, catch_exceptions=False)


def test_every_command_has_help_naming_each_of_its_options():
    top = invoke(["--help"])
    assert top.exit_code == 0 and set(cli.main.commands) == {"data", "train", "sweep", "search", "register",
                                                             "predict", "bench"}
    for name, command in cli.main.commands.items():
        result = invoke([name, "--help"])
        assert result.exit_code == 0 and command.help and name in top.output, name
        assert " ".join(command.help.split())[:40] in " ".join(result.output.split()), name
        for param in command.params:
            assert all(opt in result.output for opt in param.opts if opt.startswith("--")), (name, param.opts)


def test_mlproject_and_cli_are_in_step():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    for entry, point in spec["entry_points"].items():
        command = point["command"]
        command_name = command.split()[3]
        assert command.startswith(f"python -m fmnist_mlflow {command_name}")
        assert entry == command_name or entry == "main"
        options = {opt for p in cli.main.commands[command_name].params for opt in p.opts}
        tokens = command.split()
        for name in point["parameters"]:
            assert f"{{{name}}}" in command, f"{entry}: parameter {name} is never passed"
            flag = tokens[tokens.index(f"{{{name}}}") - 1]
            assert flag in options, f"{entry}: {flag} is not an option of `fmnist {command_name}`"
        # every placeholder is a declared parameter
        for token in tokens:
            if token.startswith("{"):
                assert token.strip("{}") in point["parameters"]


def test_train_logs_everything_to_sqlite(store, monkeypatch):
    result = invoke(TRAIN_ARGS + ["--epochs", "2", "--model", "model3", "--dropout", "0.1"])
    assert result.exit_code == 0, result.output
    (run,) = runs()
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("model3-ce-adam-")
    assert run.data.tags["fmnist.config"] == f"model3-ce-adam-{run.data.tags['fmnist.config_group'][:6]}"
    assert run.info.run_name == run.data.tags["fmnist.config"] + "-seed0"  # each seed's run says its seed
    params = run.data.params
    assert params["model"] == "model3" and params["lr"] == "0.001" and params["dropout"] == "0.1"
    assert params["train_size"] == "600" and params["val_size"] == "120" and params["device"] == "cpu"
    client = mlflow.MlflowClient()
    for key in ("train_loss", "val_loss", "val_nll", "val_accuracy", "epoch_seconds"):
        # the final validation metrics are logged a second time at the last step, linked to the model
        assert sorted({m.step for m in client.get_metric_history(run.info.run_id, key)}) == [1, 2]
    assert run.data.tags["torch_version"] and run.data.tags["fmnist.config_hash"]
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"fashion-mnist-training", "fashion-mnist-validation"}
    assert "loss_curves.png" in {a.path for a in client.list_artifacts(run.info.run_id)}

    # MLflow 3's Models view: the model is named after its config, with params and linked validation metrics
    (logged,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert logged.name == run.info.run_name and logged.params["dropout"] == "0.1"
    linked = {m.key: m for m in logged.metrics}
    assert linked["val_accuracy"].value == run.data.metrics["val_accuracy"]
    assert linked["val_accuracy"].dataset_name == "fashion-mnist-validation"

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    model = mlflow.pyfunc.load_model(f"models:/{logged.model_id}")
    for n in (1, 5, 64):
        labels = model.predict(np.zeros((n, 1, 28, 28), dtype=np.float32))
        assert labels.shape == (n,) and set(labels) <= set(model.metadata.metadata["class_names"])
    assert len(model.metadata.metadata["class_names"]) == 10


def test_same_seed_same_logged_metrics(store):
    for _ in range(2):
        assert invoke(TRAIN_ARGS + ["--seed", "7"]).exit_code == 0
    a, b = runs()
    assert a.data.metrics["val_nll"] == b.data.metrics["val_nll"]
    assert a.data.metrics["train_loss"] == b.data.metrics["train_loss"]


def test_diverging_run_ends_failed_with_reason(store):
    result = CliRunner().invoke(cli.main, TRAIN_ARGS + ["--optimizer", "sgd", "--lr", "1e12"])
    assert result.exit_code == 1 and "training loss became" in result.output
    (run,) = runs()
    assert run.info.status == "FAILED"
    assert "training loss became" in run.data.tags["fmnist.failure_reason"]


def test_unreachable_server_fails_fast_naming_the_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run([sys.executable, "-m", "fmnist_mlflow", *TRAIN_ARGS], env=cli_env(MLFLOW_TRACKING_URI=uri),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert uri in proc.stderr and "did not answer" in proc.stderr and "Traceback" not in proc.stderr


def test_train_against_a_real_mlflow_server(mlflow_server):
    result = invoke(TRAIN_ARGS + ["--experiment", "over-http"])
    assert result.exit_code == 0, result.output
    (run,) = runs("over-http")
    assert run.info.status == "FINISHED" and "val_accuracy" in run.data.metrics
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/{run.info.run_name}")  # the artifact path is the run name
    assert model.predict(np.zeros((3, 1, 28, 28), dtype=np.float32), params={"output": "logits"}).shape == (3, 10)


def test_sigterm_marks_the_run_killed(store, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "fmnist_mlflow", "train", "--epochs", "50", "--subset", "2000"],
                            env=cli_env(MLFLOW_TRACKING_URI=store), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # wait until an epoch has been logged, then terminate
        lines.append(line)
        if "epoch  1/50" in line:
            proc.terminate()
            break
    proc.wait(timeout=60)
    assert proc.returncode == 130, "".join(lines)
    (run,) = runs()
    assert run.info.status == "KILLED"


def test_mlflow_run_train_entry_point(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run(
        [f"{Path(sys.executable).parent}/mlflow", "run", str(ROOT), "-e", "train", "--env-manager", "local",
         "-P", "model=model1", "-P", "epochs=1", "-P", "subset=600", "-P", "lr=0.002"],
        env=cli_env(MLFLOW_TRACKING_URI=uri), cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    try:
        found = mlflow.search_runs(search_all_experiments=True, output_format="list")
        # `mlflow run` without --experiment-name made its run in Default: it is left there as a launcher,
        # and the training run went to experiment fmnist, where `fmnist register` looks
        (run,) = [r for r in found if r.data.tags.get("fmnist.kind") == "train"]
        (launcher,) = [r for r in found if r.data.tags.get("fmnist.kind") == "launcher"]
        assert mlflow.get_experiment(run.info.experiment_id).name == "fmnist" and launcher.info.experiment_id == "0"
        assert run.info.status == "FINISHED"
        assert run.data.params["lr"] == "0.002" and run.data.params["model"] == "model1"
        assert run.data.tags["mlflow.runName"].startswith("model1-ce-adam-")
        assert "val_accuracy" in run.data.metrics
        assert launcher.data.tags["fmnist.parent"] == run.info.run_id
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("given", [None, "false"])
def test_commands_set_mlflow_defaults_while_they_run_and_the_users_own_settings_win(monkeypatch, given):
    """No telemetry, and bounded HTTP retries (MLflow's own, 7 retries with backoff factor 2 and a 120 s
    timeout, kept a sweep hanging about 16 minutes when its server died; tests/test_faults.py)."""
    import click

    from fmnist_mlflow.cli.boundary import reported

    keys = ("MLFLOW_DISABLE_TELEMETRY", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
            "MLFLOW_HTTP_REQUEST_TIMEOUT")
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    if given is not None:
        monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", given)
    seen = []

    @click.command()
    @reported
    def probe():  # every fmnist command runs inside `reported`, and its worker processes inherit this
        seen.append(tuple(os.environ.get(key) for key in keys))

    assert CliRunner().invoke(probe).exit_code == 0
    assert seen == [(given or "true", "3", "1", "30")]
    assert tuple(os.environ.get(key) for key in keys) == (given, None, None, None)  # the environment as it was
