"""One champion: confirm, register, the search parent and the study name the same config; confirm weighs the
search's baselines; a search stops itself once stagnant."""

import subprocess
import sys

import mlflow
import optuna
import pytest
import yaml
from click.testing import CliRunner

from conftest import cli_env
from fmnist_mlflow import schema
from fmnist_mlflow.cli import main as cli
from fmnist_mlflow.studies import stopping
from fmnist_mlflow.tracking import registry


def _run(parent_id, kind, group, seed, value, study=""):
    client = mlflow.MlflowClient()
    run = client.create_run("0", tags={schema.TAG_KIND: kind, schema.TAG_CONFIG_GROUP: group, "mlflow.parentRunId": parent_id,
                                       schema.TAG_CONFIRM_STUDY: study}, run_name=f"{group}-seed{seed}")
    for key, v in {"model": "model3", "loss": "ce", "optimizer": "adam", "lr": "0.001", "seed": str(seed),
                   "train_size": "600", "epochs": "1"}.items():
        client.log_param(run.info.run_id, key, v)
    client.log_metric(run.info.run_id, "val_accuracy", value)
    client.log_metric(run.info.run_id, "val_nll", 0.5)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def test_register_takes_the_confirmed_champion_where_seed_zero_crowned_another(store):
    """Seed 0 (the search's own trials) favours B; on the fresh seeds the confirm named A. Averaging the
    trial's seed 0 into the mean (the old rule) would crown B; every way register chooses names A."""
    client = mlflow.MlflowClient()
    parent = client.create_run("0", tags={schema.TAG_KIND: schema.KIND_SEARCH}, run_name="wide").info.run_id
    client.log_param(parent, "metric", "val_accuracy")
    _run(parent, schema.KIND_TRIAL, "A", 0, 0.80)
    _run(parent, schema.KIND_TRIAL, "B", 0, 0.97)
    for seed, (a, b) in {1: (0.90, 0.88), 2: (0.91, 0.89), 3: (0.92, 0.90)}.items():
        _run(parent, schema.KIND_CONFIRM, "A", seed, a, study="wide-confirm@x")
        _run(parent, schema.KIND_CONFIRM, "B", seed, b, study="wide-confirm@x")
    pooled = {g: [0.80, 0.90, 0.91, 0.92] if g == "A" else [0.97, 0.88, 0.89, 0.90] for g in "AB"}
    assert sum(pooled["B"]) > sum(pooled["A"])  # what pooling seed 0 in would have said
    # a parent whose confirm has not finished: register compares the runs itself, with confirm's rule
    chosen = registry.select_runs("val_accuracy", parent_run_id=parent)
    assert registry.group_of(chosen.pick) == "A" and "search trial run(s) were left out" in chosen.notes[0]
    assert sorted(int(r.data.params["seed"]) for r in chosen.runs) == [1, 2, 3]
    # the finished confirm's answer: taken as it is, with its statistics
    client.set_tag(parent, schema.TAG_CHAMPION_GROUP, "A")
    client.set_tag(parent, schema.TAG_CONFIRM_SEEDS, "1,2,3")
    client.set_tag(parent, schema.TAG_CONFIRM_STUDY, "wide-confirm@x")
    client.set_terminated(parent, "FINISHED")
    for how in ({"parent_run_id": parent}, {"experiment": "Default"}):
        chosen = registry.select_runs("val_accuracy", **how)
        assert registry.group_of(chosen.pick) == "A" and chosen.value.mean == pytest.approx(0.91)
        assert "the champion of the confirm of search wide (seeds 1,2,3" in chosen.decided_by


BASELINE_SPACE = {
    "name": "base", "metric": "val_accuracy", "seed_sd": 0.0019, "fixed": {"model": "model1", "loss": "ce", "seed": 0},
    "search": {"optimizer": {"choices": ["adam", "sgd"]},
               "lr": {"adam": {"low": 1e-3, "high": 3e-3}, "sgd": {"low": 1e-6, "high": 1e-6}}},
    # a recipe that learns, and one whose rate is too small to move the weights
    "start_points": [{"optimizer": "adam", "lr": 2e-3}, {"optimizer": "sgd", "lr": 1e-6}],
}  # fmt: skip


def test_confirm_weighs_the_baselines_and_the_parent_study_and_registry_agree(store, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(BASELINE_SPACE))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = ["search", "--space", str(space), "--storage", storage, "--trials", "3", "--epochs", "1", "--subset", "600",
            "--pruner", "none", "--seed", "3", "--confirm", "1", "--seeds", "2", "--jobs", "1"]
    result = CliRunner().invoke(cli.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="base", storage=storage)
    confirm_md = mlflow.artifacts.load_text(f"runs:/{study.user_attrs[schema.ATTR_PARENT]}/confirm.md")
    # the best trial and both start points are contenders (a start point that is also the best keeps both roles)
    assert "start point 0" in confirm_md and "start point 1" in confirm_md and "top 1" in confirm_md
    parent = mlflow.get_run(study.user_attrs[schema.ATTR_PARENT])
    description = parent.data.tags["mlflow.note.content"]
    assert description.startswith("**Champion: trial ") and "The search: 3 trial(s) (3 complete)." in description
    assert ("Against the baselines on the same seeds: " in description) or ("The champion is a baseline" in description)
    champion = parent.data.tags[schema.TAG_CHAMPION_GROUP]
    assert study.user_attrs[schema.ATTR_CHAMPION]["config_group"] == champion
    # two `fmnist register` at the same moment (two machines): one version of the run, one alias holder
    registers = [subprocess.Popen([sys.executable, "-m", "fmnist_mlflow", "register"], env=cli_env(MLFLOW_TRACKING_URI=store),
                                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in registers]
    assert [p.returncode for p in registers] == [0, 0], outputs
    assert not [o for o in outputs if "Warning:" in o], outputs  # no Python warning (UserWarning: ...) in its output
    versions = mlflow.MlflowClient().search_model_versions("name = 'fmnist-cnn'")
    assert len(versions) == 1, [(v.version, v.run_id) for v in versions]
    version = mlflow.MlflowClient().get_model_version_by_alias("fmnist-cnn", "champion")
    assert version.tags[schema.TAG_CONFIG_GROUP] == champion and version.tags["seeds"] == "1,2"
    assert "the champion of the confirm of search base (seeds 1,2" in version.description


def _scripted(values: list, sd: float, patience: int) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    study.optimize(lambda t: values[t.number], n_trials=len(values), callbacks=[stopping.Stagnation(sd, patience)])
    return study


def test_a_stagnant_search_stops_itself_and_an_improving_one_does_not():
    # steps of 0.15 points at most over the first (sd 0.19 points): no gain after it; 3 more and it stops
    flat = _scripted([0.930, 0.931, 0.920, 0.9315, 0.929, 0.933, 0.934], sd=0.0019, patience=3)
    assert len(flat.trials) == 4 and "after trial 3" in flat.user_attrs[schema.ATTR_STOPPED]
    assert "the best is trial 3 (0.9315)" in flat.user_attrs[schema.ATTR_STOPPED]
    # a gain of more than one sd every third trial resets the count
    rising = _scripted([0.90, 0.89, 0.88, 0.91, 0.90, 0.89, 0.92, 0.91, 0.90, 0.93], sd=0.0019, patience=3)
    assert len(rising.trials) == 10 and schema.ATTR_STOPPED not in rising.user_attrs
    assert stopping.stagnated([(0, 0.9, True)] * 1 + [(n, None, True) for n in range(1, 4)], 0.0019, 0) is None  # off
    # steps smaller than one sd add up: 0.902 is a gain over 0.900 (the last gain), though not over 0.901
    assert stopping.stagnated([(0, 0.900, True), (1, 0.901, True), (2, 0.902, True), (3, 0.8, True)], 0.0019, 2) is None


def test_the_search_command_stops_a_stagnant_study_for_every_worker_and_patience_0_goes_on(store, tmp_path):
    space = tmp_path / "space.yaml"
    # a seed sd of 50 points: no trial can gain on the first, so the study is stagnant from its first trial
    space.write_text(yaml.safe_dump({**BASELINE_SPACE, "seed_sd": 0.5, "start_points": []}))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = ["search", "--space", str(space), "--storage", storage, "--epochs", "1", "--subset", "300", "--pruner", "none",
            "--jobs", "1"]
    result = CliRunner().invoke(cli.main, [*args, "--trials", "6", "--patience", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="base", storage=storage)
    assert len(study.trials) == 3 and "stopped itself after trial 2" in result.output
    parent = mlflow.get_run(study.user_attrs[schema.ATTR_PARENT])
    assert parent.data.tags[schema.TAG_STOPPED].startswith("stopped itself after trial 2: no trial of the 2 finished")
    again = CliRunner().invoke(cli.main, [*args, "--trials", "2", "--patience", "2"], catch_exceptions=False)
    assert again.exit_code == 0 and len(optuna.load_study(study_name="base", storage=storage).trials) == 3
    more = CliRunner().invoke(cli.main, [*args, "--trials", "1", "--patience", "0"], catch_exceptions=False)
    assert more.exit_code == 0 and len(optuna.load_study(study_name="base", storage=storage).trials) == 4
