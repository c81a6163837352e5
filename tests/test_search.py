"""`fmnist search`: trials as nested runs, resumption, pruning, concurrent workers, PostgreSQL, bad input."""

import dataclasses
from pathlib import Path

import mlflow
import optuna
import yaml
from click.testing import CliRunner

from conftest import free_port
from fmnist_mlflow import schema
from fmnist_mlflow.cli import main as cli
from fmnist_mlflow.studies import engine
from fmnist_mlflow.studies import search
from fmnist_mlflow.studies.space import load_space
from fmnist_mlflow.tracking import experiment as experiments

ROOT = Path(__file__).resolve().parents[1]
SPACE = {
    "name": "tiny", "metric": "val_accuracy",
    "fixed": {"model": "model2", "loss": "ce", "batch_size": 64, "seed": 0},
    "search": {"optimizer": {"choices": ["adam", "rmsprop"]}, "dropout": {"low": 0.0, "high": 0.6},
               "lr": {"adam": {"low": 1e-4, "high": 1e-2, "log": True}, "rmsprop": {"low": 1e-4, "high": 1e-2, "log": True}}},
}  # fmt: skip


def write_space(tmp_path, name="space.yaml", **changes):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**SPACE, **changes}))
    return path


def search_args(tmp_path, *extra, trials=3):
    """CLI args of a tiny search; `write_space` is called so the file exists."""
    return ["search", "--space", str(write_space(tmp_path)), "--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
            "--trials", str(trials), "--epochs", "1", "--subset", "300", "--pruner", "none", *extra]


def logged_models(run):
    return mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                       filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list")


def study_runs():
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    parents = [r for r in runs if r.data.tags.get(schema.TAG_KIND) == "search"]
    trials = [r for r in runs if r.data.tags.get(schema.TAG_KIND) == "trial"]
    return parents, trials


def test_tiny_search_end_to_end_then_resume(store, tmp_path):
    result = CliRunner().invoke(cli.main, search_args(tmp_path), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (parent,), trials = study_runs()
    assert len(trials) == 3 and {t.info.status for t in trials} == {"FINISHED"}
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {parent.info.run_id}
    assert sorted(int(t.data.tags[schema.TAG_TRIAL]) for t in trials) == [0, 1, 2]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.metric_names == ["val_accuracy"]  # Optuna's dashboard names the value
    for t in trials:
        assert t.data.params["model"] == "model2" and t.data.tags[schema.TAG_STATE] == "COMPLETE"
        assert 0 <= float(t.data.params["dropout"]) <= 0.6 and "val_accuracy" in t.data.metrics
        assert len(logged_models(t)) == 1
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "optimization_history.png", "parallel_coordinate.png"} <= artifacts
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.user_attrs[schema.ATTR_PARENT] == parent.info.run_id
    best_run = parent.data.tags["fmnist.best_run_id"]
    assert best_run == study.best_trial.user_attrs["mlflow_run_id"]
    assert parent.data.metrics["best_val_accuracy"] == study.best_value

    result = CliRunner().invoke(cli.main, search_args(tmp_path, trials=2), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (again,), trials = study_runs()
    assert again.info.run_id == parent.info.run_id and len(trials) == 5
    assert sorted(int(t.data.tags[schema.TAG_TRIAL]) for t in trials) == [0, 1, 2, 3, 4]


@dataclasses.dataclass(frozen=True)
class AlwaysPruned(search.Search):
    def pruner(self):
        return optuna.pruners.ThresholdPruner(lower=0.999)  # no tiny run reaches 99.9%: every trial is pruned


def always_pruned(tmp_path, name: str, *, epochs: int, trials: int, data) -> engine.SharedStudy:
    """A tiny search of `trials` trials whose pruner would stop every one, run to its end."""
    space = load_space(write_space(tmp_path))
    plan = AlwaysPruned(name, space, search.SearchSettings(epochs=epochs, subset=600, device="cpu"),
                        sampler_name="random", seed=0)
    shared = engine.SharedStudy.open(plan, f"sqlite:///{tmp_path / 'o.db'}", name, experiments.use_experiment("fmnist"))
    shared.run(data, budget=trials)
    return shared


def test_pruned_trials_end_killed_tagged_pruned_without_a_model(store, tmp_path, tiny_data):
    summary = always_pruned(tmp_path, "pruned", epochs=3, trials=2, data=tiny_data).close()
    assert summary.states == {"PRUNED": 2} and summary.epochs_saved == 4 and summary.best is None
    _, trials = study_runs()
    assert len(trials) == 2
    for t in trials:
        assert t.info.status == "KILLED" and t.data.tags[schema.TAG_STATE] == "PRUNED"
        assert "pruned after epoch 1" in t.data.tags[schema.TAG_FAILURE]
        assert logged_models(t) == []


def _assert_one_parent_and_whole_trials(storage, study_name, expected):
    study = optuna.load_study(study_name=study_name, storage=storage)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == expected and len(set(numbers)) == expected
    parents, trials = study_runs()
    assert len(parents) == 1
    assert len(trials) == expected
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {parents[0].info.run_id}
    assert sorted(int(t.data.tags[schema.TAG_TRIAL]) for t in trials) == sorted(numbers)
    assert study.user_attrs[schema.ATTR_PARENT] == parents[0].info.run_id


def test_postgresql_storage_with_jobs_2(mlflow_server, postgres_url, tmp_path):
    result = CliRunner().invoke(cli.main, [*search_args(tmp_path, "--jobs", "2", "--study", "pg", trials=4)[:4],
                                           postgres_url, *search_args(tmp_path, "--jobs", "2", "--study", "pg", trials=4)[5:]],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "2 workers" in result.output
    _assert_one_parent_and_whole_trials(postgres_url, "pg", 4)


def test_warm_start_from_the_grid_best(store, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "models": ["model2"], "losses": ["ce"], "optimizers": ["adam", "rmsprop"],
                                    "lr": {"adam": 0.002, "rmsprop": 0.0005}, "dropout": {"model2": 0.5},
                                    "batch_size": 64, "epochs": 1}))
    assert CliRunner().invoke(cli.main, ["sweep", "--grid", str(grid), "--subset", "300"]).exit_code == 0
    sweep_parent = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
                    if r.data.tags.get(schema.TAG_KIND) == "sweep"][0]
    best = mlflow.get_run(sweep_parent.data.tags["fmnist.best_run_id"]).data.params
    result = CliRunner().invoke(cli.main, search_args(tmp_path, trials=1), catch_exceptions=False)
    assert result.exit_code == 0 and "warm start" in result.output
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    first = study.trials[0].params
    assert first["optimizer"] == best["optimizer"] and first["dropout"] == 0.5
    assert first[f"lr_{best['optimizer']}"] == float(best["lr"])


def test_unreachable_postgres_fails_fast_hiding_the_password(store, tmp_path):
    args = search_args(tmp_path)
    args[args.index("--storage") + 1] = f"postgresql://me:secret@127.0.0.1:{free_port()}/x"
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 1 and "cannot open Optuna storage" in result.output
    assert "secret" not in result.output
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_a_trial_is_never_pruned_after_its_last_epoch(store, tmp_path, tiny_data):
    shared = always_pruned(tmp_path, "last", epochs=1, trials=1, data=tiny_data)
    assert [t.state.name for t in shared.study.trials] == ["COMPLETE"]
    (_, (trial,)) = study_runs()
    assert trial.info.status == "FINISHED" and trial.data.tags[schema.TAG_STATE] == "COMPLETE"


def test_a_study_resumed_with_another_pruner_or_sampler_is_refused_naming_its_rules(store, tmp_path):
    """A study half pruned by one rule and half by another answers neither: its rules are kept with it."""
    assert CliRunner().invoke(cli.main, search_args(tmp_path, trials=1)).exit_code == 0  # --pruner none, tpe
    for change, words in ((["--pruner", "median"], "runs with --pruner none; this command asks --pruner median"),
                          (["--sampler", "random"], "runs with --sampler tpe; this command asks --sampler random")):
        result = CliRunner().invoke(cli.main, search_args(tmp_path, *change, trials=1))
        assert result.exit_code == 1 and words in result.output and "Traceback" not in result.output, result.output
    assert len(study_runs()[1]) == 1  # nothing more ran


def test_a_journal_file_storage_runs_and_resumes_a_search(store, tmp_path):
    journal = f"journal:{tmp_path / 'studies.log'}"
    for trials in (2, 1):
        args = search_args(tmp_path, trials=trials)
        args[args.index("--storage") + 1] = journal
        result = CliRunner().invoke(cli.main, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
    (parent,), trials = study_runs()
    assert len(trials) == 3 and {t.info.status for t in trials} == {"FINISHED"}
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="tiny",
                              storage=optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "studies.log"))))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert study.user_attrs[schema.ATTR_PARENT] == parent.info.run_id


def test_timeout_stops_starting_trials_within_the_budget_and_leaves_none_running(store, tmp_path):
    """--timeout with a budget the time cannot reach, and a pruner that prunes from the fourth trial on:
    trials start until the time is up, each one started ends (completed or pruned), and the budget is not
    exceeded."""
    result = CliRunner().invoke(cli.main, search_args(tmp_path, "--timeout", "6", "--pruner", "halve1", "--epochs",
                                                      "2", trials=40), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    assert 1 <= len(states) < 40 and set(states) <= {"COMPLETE", "PRUNED"}, states
    _, runs = study_runs()
    assert len(runs) == len(states) and "RUNNING" not in {r.info.status for r in runs}
