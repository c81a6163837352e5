"""What a new user meets first: links that open the UI's Model training view, names that tell configs apart,
quiet output, `fmnist predict`'s default model, and bad input refused at the boundary (exit 2, before any
work) or in one line (exit 1), with nothing left RUNNING."""

import sys

import mlflow
import numpy as np
import yaml
from click.testing import CliRunner

from fmnist_mlflow import schema
from fmnist_mlflow.cli import main as cli
from fmnist_mlflow.results import stats

TRAIN = ["train", "--device", "cpu", "--epochs", "2", "--subset", "300"]
SPACE = {
    "name": "tiny", "metric": "val_accuracy",
    "fixed": {"model": "model2", "loss": "ce", "batch_size": 64, "seed": 0},
    "search": {"optimizer": {"choices": ["adam"]}, "dropout": {"low": 0.0, "high": 0.6},
               "lr": {"adam": {"low": 1e-4, "high": 1e-2, "log": True}}},
}  # fmt: skip
GRID = {"name": "small", "models": ["model1"], "losses": ["ce", "bce"], "optimizers": ["adam"],
        "lr": {"adam": 0.001}, "batch_size": 64, "epochs": 1, "seeds": [0]}


def invoke(*args, **kwargs):
    return CliRunner().invoke(cli.main, [str(a) for a in args], **kwargs)


def all_runs():
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def write(tmp_path, name, spec):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def search_args(tmp_path, space, *extra, trials=2):
    return ["search", "--space", space, "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--trials", trials,
            "--epochs", "1", "--subset", "300", "--pruner", "none", "--device", "cpu", *extra]


# --- the UI and the printed output ---------------------------------------------------------------------


def test_printed_links_open_the_model_training_view_and_epochs_print_once(store):
    result = invoke(*TRAIN, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (link,) = [line for line in result.output.splitlines() if line.startswith("view it:")]
    assert "#/experiments/" in link and link.endswith("?workflowType=machine_learning")
    # not a terminal: one line per epoch, no progress-bar label before it
    assert len([line for line in result.output.splitlines() if " epoch " in line]) == 2


def test_different_configs_never_share_a_run_or_model_name(store):
    for lr in ("0.001", "0.002", "0.001"):
        assert invoke(*TRAIN, "--lr", lr, "--epochs", "1", catch_exceptions=False).exit_code == 0
    runs = all_runs()
    names = {r.info.run_name for r in runs}
    assert len(names) == 2 and all(n.startswith("model1-ce-adam-") for n in names)
    by_lr = {}
    for r in runs:
        by_lr.setdefault(r.data.params["lr"], set()).add(r.info.run_name)
    assert all(len(v) == 1 for v in by_lr.values())  # the same config keeps its name
    models = mlflow.search_logged_models(experiment_ids=[runs[0].info.experiment_id], output_format="list")
    assert {m.name for m in models} == names


def test_search_prints_its_link_and_its_trials_have_their_own_names(store, tmp_path):
    space = write(tmp_path, "space.yaml", SPACE)
    result = invoke(*search_args(tmp_path, space, "--seed", "3", trials=3), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert any(line.startswith("view it:") and "workflowType=machine_learning" in line
               for line in result.output.splitlines())
    trials = [r for r in all_runs() if r.data.tags.get(schema.TAG_KIND) == "trial"]
    assert len(trials) == 3 and len({r.info.run_name for r in trials}) == 3
    # the epoch lines name each trial's run, digest included: trials of one model and optimizer differ in it
    for run in trials:
        assert f"[trial {run.data.tags['fmnist.trial']}] {run.info.run_name} epoch" in result.output


def test_warm_start_says_why_a_grid_value_was_moved_into_the_space(store, tmp_path):
    g = write(tmp_path, "grid.yaml", {**GRID, "models": ["model2"], "losses": ["ce"], "dropout": {"model2": 0.5}})
    assert invoke("sweep", "--grid", g, "--subset", "300", "--device", "cpu").exit_code == 0
    space = write(tmp_path, "space.yaml", {**SPACE, "search": {**SPACE["search"],
                                                               "weight_decay": {"low": 1e-6, "high": 1e-2, "log": True}}})
    result = invoke(*search_args(tmp_path, space, trials=1), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "warm start" in result.output and "weight_decay 1e-06 for the grid's 0.0" in result.output
    # what was carried over, and that the rest is the space's own (it may change schedule, batch, width...)
    assert "carries over the grid's best config where this space can hold it" in result.output
    assert "the rest is the space's own" in result.output
    assert "log-scale range cannot hold" in result.output


def test_predict_defaults_to_the_champion_and_says_when_there_is_none(store, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((28, 28), dtype=np.uint8))
    result = invoke("predict", tmp_path / "x.npy")
    assert result.exit_code == 1 and "no registered model 'fmnist-cnn'" in result.output
    assert "fmnist register" in result.output and "Traceback" not in result.output
    assert invoke(*TRAIN, catch_exceptions=False).exit_code == 0
    assert invoke("register", catch_exceptions=False).exit_code == 0
    result = invoke("predict", tmp_path / "x.npy")
    assert result.exit_code == 0 and "x.npy:" in result.output, result.output
    result = invoke("predict", "--model-uri", "models:/fmnist-cnn@nobody", tmp_path / "x.npy")
    assert result.exit_code == 1 and "has no alias 'nobody'" in result.output


# --- faults: each a clear error, nothing left RUNNING --------------------------------------------------------


def test_jobs_beyond_the_work_left_are_capped_and_said(store, tmp_path):
    g = write(tmp_path, "grid.yaml", GRID)  # 2 points
    result = invoke("sweep", "--grid", g, "--subset", "300", "--device", "cpu", "--jobs", "1000", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "2 workers" in result.output and "--jobs 1000 capped at the 2 point(s) left" in result.output
    assert not [r for r in all_runs() if r.info.status == "RUNNING"]


def test_a_bad_heartbeat_setting_is_one_line_before_any_store_is_touched(store, tmp_path, monkeypatch):
    space = write(tmp_path, "space.yaml", SPACE)
    monkeypatch.setenv("FMNIST_HEARTBEAT_S", "abc")
    result = invoke(*search_args(tmp_path, space))
    assert result.exit_code == 1 and "FMNIST_HEARTBEAT_S='abc'" in result.output, result.output
    assert "Traceback" not in result.output and result.output.strip().splitlines()[-1].startswith("Error: FMNIST")
    assert all_runs() == []


def test_predict_refuses_an_array_of_strings_and_a_folder_in_one_line_each(store, tmp_path):
    assert invoke(*TRAIN, catch_exceptions=False).exit_code == 0
    assert invoke("register", catch_exceptions=False).exit_code == 0
    np.save(tmp_path / "s.npy", np.array([["a"] * 28] * 28))
    folder = tmp_path / "images"
    folder.mkdir()
    result = invoke("predict", tmp_path / "s.npy", folder)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "s.npy: dtype <U1 is not numeric" in result.output and "images: is a folder" in result.output


def test_a_data_dir_that_is_a_file_says_so(store, tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setenv("FMNIST_DATA_DIR", str(afile))
    result = invoke("data")
    assert result.exit_code == 1 and "is a file, not a folder" in result.output


def test_an_accuracy_interval_never_leaves_0_to_1():
    wide = stats.estimate([0.5, 1.0], fraction=True)
    assert wide.ci95[0] >= 0 and wide.ci95[1] == 1.0
    nll = stats.estimate([0.5, 1.0])  # not a fraction: not clipped
    assert nll.ci95[1] > 1


def test_a_full_disk_is_one_line_and_the_next_command_ends_the_run(tiny_disk, monkeypatch):
    import subprocess

    uri = f"sqlite:///{tiny_disk / 'mlflow.db'}"
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("MLFLOW_RUN_ID", None)
    train = [sys.executable, "-m", "fmnist_mlflow", *TRAIN, "--model", "model3", "--epochs", "1"]
    first = subprocess.run(train, env=env, cwd=tiny_disk, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    filler = tiny_disk / "filler"
    free = __import__("shutil").disk_usage(tiny_disk).free
    filler.write_bytes(b"\0" * max(0, free - 64 * 1024))  # leave 64 kB: less than a model
    full = subprocess.run(train, env=env, cwd=tiny_disk, capture_output=True, text=True, timeout=300)
    # exit 1 with one line (MLflow's own traceback of the database error is silenced)
    assert full.returncode == 1, full.stderr[-3000:]
    assert full.stderr.count("\n") == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    error = full.stderr.strip().splitlines()[-1]
    assert error.startswith("Error:") and ("full" in error or "space" in error), error
    filler.unlink()
    again = subprocess.run(train, env=env, cwd=tiny_disk, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    mlflow.set_tracking_uri(uri)
    try:
        runs = all_runs()
        assert not [r for r in runs if r.info.status == "RUNNING"]
        failed = [r for r in runs if r.info.status == "FAILED"]
        assert len(failed) == 1 and len(runs) == 3
        assert "abandoned" in failed[0].data.tags[schema.TAG_FAILURE] or "No space" in failed[0].data.tags[
            schema.TAG_FAILURE] or "full" in failed[0].data.tags[schema.TAG_FAILURE]
    finally:
        mlflow.set_tracking_uri(None)
