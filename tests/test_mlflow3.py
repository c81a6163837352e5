"""MLflow 3 as its users expect it: system metrics on training runs (and the switch that turns them off),
never on parents; the answer of a sweep on its parent's Overview. (Evaluation runs and linked versions:
tests/test_registry.py.)"""

import mlflow
from click.testing import CliRunner

from fmnist_mlflow.cli import main as cli
from fmnist_mlflow import schema

TRAIN = ["train", "--device", "cpu", "--subset", "2000", "--epochs", "2", "--threads", "1"]


def runs(kind):
    return [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
            if r.data.tags.get(schema.TAG_KIND) == kind]


def default_switch(monkeypatch) -> None:
    """MLflow's switch unset, as for a user, and unset again after the test (--no-system-metrics sets it
    in this process's environment, as it does for a command and its workers)."""
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "unset after the test")
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")


def test_training_runs_log_system_metrics_unless_switched_off(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # MLflow's: 5 samples a second, not 1 in 10 s
    default_switch(monkeypatch)
    result = CliRunner().invoke(cli.main, TRAIN)
    assert result.exit_code == 0, result.output
    (run,) = runs("train")
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    assert "monitoring system metrics" not in result.output  # MLflow's four INFO lines a run are quiet
    result = CliRunner().invoke(cli.main, [*TRAIN, "--no-system-metrics"])
    assert result.exit_code == 0, result.output
    newest = max(runs("train"), key=lambda r: r.info.start_time)
    assert not [k for k in newest.data.metrics if k.startswith("system/")]


def test_a_sweep_parent_logs_no_system_metrics_its_children_do(store, tmp_path, monkeypatch):
    import yaml

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    default_switch(monkeypatch)
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "sys", "models": ["model1"], "losses": ["ce"], "optimizers": ["adam"],
                                    "lr": {"adam": 0.001}, "batch_size": 64, "epochs": 2, "seeds": [0]}))
    result = CliRunner().invoke(cli.main, ["sweep", "--grid", str(grid), "--subset", "2000", "--device", "cpu",
                                           "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"])
    assert result.exit_code == 0, result.output
    (parent,) = runs("sweep")
    (child,) = runs("sweep-child")
    assert not [k for k in parent.data.metrics if k.startswith("system/")]
    assert [k for k in child.data.metrics if k.startswith("system/")]
