"""`fmnist sweep`: nested runs, summary artifacts, resumption, local failures, bad grid files."""

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from click.testing import CliRunner

from conftest import cli_env, reset_mlflow
from fmnist_mlflow import schema
from fmnist_mlflow.cli import main as cli
from fmnist_mlflow.studies import grid
from fmnist_mlflow.studies import engine, sweep
from fmnist_mlflow.studies.engine import Hooks
from fmnist_mlflow.tracking import experiment as experiments

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "name": "small", "models": ["model1"], "losses": ["ce", "bce"], "optimizers": ["adam"],
    "lr": {"adam": 0.001}, "batch_size": 64, "epochs": 1, "seed": 0,
}  # fmt: skip


def write_grid(tmp_path, name="grid.yaml", **changes):
    spec = {**SMALL, **changes}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep_cli(*args):
    return CliRunner().invoke(cli.main, ["sweep", "--subset", "300", *args], catch_exceptions=False)


def label(run) -> str:
    """model-loss-optimizer of a run named model-loss-optimizer-<config digest>-seed<N>."""
    return run.info.run_name.rsplit("-", 2)[0]


def all_runs():
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def parents_and_children():
    runs = all_runs()
    parents = [r for r in runs if r.data.tags.get(schema.TAG_KIND) == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_small_grid_makes_one_parent_with_finished_children_and_artifacts(store, tmp_path):
    path = write_grid(tmp_path, optimizers=["adam", "rmsprop"], lr={"adam": 0.001, "rmsprop": 0.001})
    result = sweep_cli("--grid", str(path))
    assert result.exit_code == 0, result.output
    (parent,), children = parents_and_children()
    assert parent.info.status == "FINISHED" and parent.info.run_name == "small"
    assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {label(c) for c in children} == {"model1-ce-adam", "model1-bce-adam", "model1-ce-rmsprop",
                                            "model1-bce-rmsprop"}
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "summary.md", "loss_curves.png", "val_accuracy.png"} <= artifacts
    best_id = parent.data.tags[schema.TAG_BEST_RUN]
    best = max((c for c in children), key=lambda c: c.data.metrics["val_accuracy"])
    assert best_id == best.info.run_id
    assert parent.data.metrics["best_val_accuracy"] == best.data.metrics["val_accuracy"]
    assert "[4/4]" in result.output and "| model1 | CrossEntropyLoss |" in result.output


def test_interrupted_sweep_resumes_under_the_same_parent(store, tmp_path, tiny_data):
    g = grid.load_grid(write_grid(tmp_path, optimizers=["adam", "sgd"], lr={"adam": 0.001, "sgd": 0.05}))
    configs = g.configs(subset=600)
    experiment_id = experiments.use_experiment("fmnist")

    def interrupt_second(config):
        def on_epoch_end(metrics):
            if config == configs[1]:
                raise KeyboardInterrupt("simulated Ctrl-C")
        return on_epoch_end, None

    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(g, configs, tiny_data, experiment_id=experiment_id, hooks=Hooks(progress=lambda trial, config: interrupt_second(config)))
    (parent,), children = parents_and_children()
    assert parent.info.status == "KILLED"
    assert sorted(c.info.status for c in children) == ["FINISHED", "KILLED"]

    started = []
    result = sweep.run_sweep(g, configs, tiny_data, experiment_id=experiment_id,
                             hooks=Hooks(on_start=lambda k, n, config, *_: started.append(config)))
    assert result.parent_run_id == parent.info.run_id and result.skipped == 1
    assert sorted(started, key=configs.index) == configs[1:]  # the finished config is not redone
    (parent,), children = parents_and_children()
    assert parent.info.status == "FINISHED" and schema.TAG_FAILURE not in parent.data.tags
    assert sorted(c.info.status for c in children) == ["FINISHED"] * 4 + ["KILLED"]
    assert [r["status"] for r in result.rows] == ["FINISHED"] * 4

    again = sweep.run_sweep(g, configs, tiny_data, experiment_id=experiment_id)
    assert again.skipped == 4 and len(parents_and_children()[1]) == 5  # idempotent


def test_a_new_tracking_store_beside_an_old_optuna_db_starts_a_new_sweep(store, tmp_path, monkeypatch):
    path = write_grid(tmp_path)
    assert sweep_cli("--grid", str(path), "--epochs", "1").exit_code == 0
    (first,), _ = parents_and_children()
    reset_mlflow()
    other = f"sqlite:///{tmp_path / 'other.db'}"  # the same optuna.db, another tracking store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    mlflow.set_tracking_uri(other)
    result = sweep_cli("--grid", str(path), "--epochs", "1")
    assert result.exit_code == 0, result.output
    (second,), children = parents_and_children()
    assert second.info.run_id != first.info.run_id and len(children) == 2
    assert "0 (config, seed) run(s) had already finished" not in result.output and "[2/2]" in result.output


def test_diverging_config_fails_alone(store, tmp_path):
    path = write_grid(tmp_path, optimizers=["adam", "sgd"], lr={"adam": 0.001, "sgd": 1e12})
    result = sweep_cli("--grid", str(path))
    assert result.exit_code == 0, result.output
    (parent,), children = parents_and_children()
    status = {label(c): c.info.status for c in children}
    assert status == {"model1-ce-adam": "FINISHED", "model1-bce-adam": "FINISHED",
                      "model1-ce-sgd": "FAILED", "model1-bce-sgd": "FAILED"}
    failed = [c for c in children if c.info.status == "FAILED"]
    assert all("training loss became" in c.data.tags[schema.TAG_FAILURE] for c in failed)
    assert parent.info.status == "FINISHED"
    assert "model1-ce-sgd" in parent.data.tags["fmnist.failed_configs"]
    assert parent.data.tags["best_optimizer"] == "adam"
    assert "did not finish: model1-ce-sgd (FAILED)" in result.output


def test_mlflow_run_main_entry_point_is_the_sweep(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    small = write_grid(tmp_path)
    proc = subprocess.run(
        [f"{Path(sys.executable).parent}/mlflow", "run", str(ROOT), "--env-manager", "local",
         "-P", f"grid={small}", "-P", "epochs=1", "-P", "subset=300",
         "-P", f"storage=sqlite:///{tmp_path / 'optuna.db'}"],  # `mlflow run` works in the project folder
        env=cli_env(MLFLOW_TRACKING_URI=uri), cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    try:
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
        (parent,) = [r for r in runs if r.data.tags.get(schema.TAG_KIND) == "sweep"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert parent.info.status == "FINISHED" and len(children) == 2
        assert parent.data.params["epochs"] == "1"
        # without --experiment-name `mlflow run` uses Default, where `fmnist register` never looks: the work
        # lands in experiment fmnist, and the run `mlflow run` made says where it went
        experiment = mlflow.get_experiment(parent.info.experiment_id)
        assert experiment.name == "fmnist" and experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        (launcher,) = [r for r in runs if r.data.tags.get(schema.TAG_KIND) == "launcher"]
        assert launcher.info.experiment_id == "0" and "fmnist" in launcher.data.tags["mlflow.note.content"]
        # it points at the parent, says how to avoid it, and its seeds param says what the sweep used
        assert launcher.data.tags["fmnist.parent"] == parent.info.run_id
        assert parent.info.run_id in launcher.data.tags["mlflow.note.content"]
        assert "--experiment-name fmnist" in launcher.data.tags["mlflow.note.content"]
        assert launcher.data.params["seeds"] == "grid"
        assert "workflowType=machine_learning" in proc.stdout
        # not a terminal: one line per epoch, no progress-bar label line before it
        assert (proc.stderr + proc.stdout).count(" epoch ") == 2  # the two configs' epoch lines, no bar labels
    finally:
        mlflow.set_tracking_uri(None)


def test_a_failed_start_leaves_nothing_that_blocks_the_next_run(store, tmp_path, monkeypatch, tiny_data):
    """A start that fails after creating the study (here: the parent run cannot be made) deletes the study:
    the next command would otherwise wait for a parent that never comes, and fail."""
    import optuna

    g = grid.load_grid(write_grid(tmp_path))
    configs = g.configs(subset=600, device="cpu")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    experiment_id = experiments.use_experiment("fmnist")
    real = engine.create_run

    def store_gone(*args, **kwargs):
        raise RuntimeError("tracking store gone")

    monkeypatch.setattr(engine, "create_run", store_gone)  # the engine's way to the parent run
    with pytest.raises(RuntimeError, match="tracking store gone"):
        sweep.run_sweep(g, configs, tiny_data, experiment_id=experiment_id, storage_url=storage)
    assert optuna.get_all_study_summaries(storage) == []
    monkeypatch.setattr(engine, "create_run", real)
    result = sweep.run_sweep(g, configs, tiny_data, experiment_id=experiment_id, storage_url=storage)
    assert len(result.rows) == 2 and not result.failed
