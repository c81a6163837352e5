"""A search that spends its compute where it pays: what early epochs say, pruner replays, the default
pruner, and racing in the confirm step."""

import csv
import io

import mlflow
import optuna
import pytest
import yaml
from click.testing import CliRunner
from scipy.stats import spearmanr

from fmnist_mlflow import schema
from fmnist_mlflow.cli import main as cli
from fmnist_mlflow.studies import fidelity
from fmnist_mlflow.studies import pruners
from fmnist_mlflow.studies import search
from test_search import SPACE, study_runs


def artifact(run, name: str) -> str:
    return mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{name}")


def curve_study(curves: dict, direction="maximize") -> optuna.Study:
    """An in-memory study of completed trials with these curves ({number: [value per epoch]}), in order."""
    study = optuna.create_study(direction=direction, study_name="curves")
    for values in curves.values():
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=values[-1],
                                                  intermediate_values={e + 1: v for e, v in enumerate(values)}))
    return study


def test_replay_judges_each_trial_against_the_trials_before_it():
    """Median pruner from epoch 2 once 3 trials completed: the first three are never judged; of the later
    ones only those below the earlier trials' median stop, and a late bloomer among the final top 5 is
    reported as lost."""
    good = [0.80, 0.85, 0.88, 0.90]
    curves = {0: good, 1: [g + 0.01 for g in good], 2: [g - 0.01 for g in good],
              3: [0.60, 0.62, 0.64, 0.66],  # clearly behind from the first epoch: stopped after epoch 2
              4: [0.70, 0.70, 0.80, 0.95],  # a late bloomer, the final best: stopped after epoch 2 all the same
              5: [0.81, 0.86, 0.89, 0.905]}
    r = pruners.replay(curve_study(curves), "median", epochs=4)
    assert r.trials == 6 and r.stopped == {3: 2, 4: 2}
    assert r.top == (4, 1, 5, 0, 2) and r.top_stopped == (4,)
    assert r.epochs_saved == 4 and r.share_saved == pytest.approx(4 / 24)
    assert "trial 4 (final rank 1)" in r.line()
    assert pruners.replay(curve_study(curves), "none", epochs=4).stopped == {}


def test_early_epoch_table_ranks_and_names_the_top_trials_below_the_median():
    curves = {n: [0.5 + 0.01 * n, 0.6 + 0.01 * n, 0.7 + 0.01 * n] for n in range(6)}
    curves[6] = [0.40, 0.50, 0.90]  # last at epochs 1-2, first at the end
    rows = fidelity.early_epochs(curve_study(curves), epochs=3)
    assert [r.epoch for r in rows] == [1, 2]
    expected = spearmanr([c[0] for c in curves.values()], [c[-1] for c in curves.values()]).statistic
    assert rows[0].spearman == pytest.approx(expected) and rows[0].trials == 7
    assert rows[0].top_below_median == (6,)  # the final best was below the median; the others of the top 5 not
    table = fidelity.markdown(rows, "val_accuracy")
    assert "| 1 | 0.25 | trial 6 |" in table  # 1 - 6 * (6² + 6 * 1²) / (7 * 48)


def test_a_tiny_search_logs_every_curve_and_the_early_epoch_table(store, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    args = ["search", "--space", str(space), "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--trials", "4",
            "--epochs", "3", "--subset", "300", "--pruner", "none", "--jobs", "1"]
    result = CliRunner().invoke(cli.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (parent,), trials = study_runs()
    client = mlflow.MlflowClient()
    assert {"curves.csv", "early_epochs.md", "curves.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    rows = list(csv.DictReader(io.StringIO(artifact(parent, "curves.csv"))))
    assert len(rows) == 4 * 3 and {r["state"] for r in rows} == {"COMPLETE"}
    logged = {(t.data.tags[schema.TAG_TRIAL], s.step): s.value for t in trials
              for s in client.get_metric_history(t.info.run_id, "val_accuracy")}
    assert all(float(r["value"]) == pytest.approx(logged[(r["number"], int(r["epoch"]))]) for r in rows)
    table = artifact(parent, "early_epochs.md")
    assert "| 1 |" in table and "| 2 |" in table and "| 3 |" not in table.split("Each pruner")[0]
    for name in pruners.PRUNERS:
        if name != "none":
            assert f"| {name} |" in table
    assert "replayed on the completed trials, the percentile pruner would stop" in result.output


RACE_SPACE = {**SPACE, "search": {"optimizer": {"choices": ["adam", "sgd"]}, "dropout": {"low": 0.0, "high": 0.6},
                                  "lr": {"adam": {"low": 3e-3, "high": 3e-3}, "sgd": {"low": 1e-6, "high": 1e-6}}},
              # a recipe that learns, and one whose rate is too small to move the weights: clearly behind
              "start_points": [{"optimizer": "adam", "lr": 3e-3, "dropout": 0.2},
                               {"optimizer": "sgd", "lr": 1e-6, "dropout": 0.2}]}  # fmt: skip


def confirm_runs():
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    return [r for r in runs if r.data.tags.get(schema.TAG_KIND) == "confirm"]


def test_confirm_races_a_contender_clearly_behind_and_a_resume_does_not_run_it(store, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(RACE_SPACE))
    common = ["search", "--space", str(space), "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--epochs", "2",
              "--subset", "600", "--pruner", "none", "--jobs", "1", "--confirm", "2", "--seeds", "3"]
    result = CliRunner().invoke(cli.main, [*common, "--trials", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    good, bad = (t.number for t in sorted(study.trials, key=lambda t: t.params["optimizer"]))  # adam, sgd
    runs = confirm_runs()
    seeds = {n: sorted(int(r.data.params["seed"]) for r in runs if r.data.tags[schema.TAG_CONFIRMS] == str(n))
             for n in (good, bad)}
    # the smoke size has no prior: two seeds each measure the spread, then the contender behind is out
    assert seeds == {good: [1, 2, 3], bad: [1, 2]}
    assert f"trial {bad} seed 3: raced out, not run" in result.output
    (parent,) = study_runs()[0]
    parent = mlflow.get_run(parent.info.run_id)
    assert parent.data.tags["fmnist.champion_trial"] == str(good)
    markdown = artifact(parent, "confirm.md")
    assert "Raced out (no more seeds):" in markdown and f"- trial {bad}: after 2 seed(s)" in markdown
    assert "raced out after 2 seed(s)" in artifact(parent, "confirm.csv")

    again = CliRunner().invoke(cli.main, [*common, "--trials", "0"], catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert len(confirm_runs()) == 5 and "[confirm" not in again.output  # the confirm study is done
    assert f"- trial {bad}: after 2 seed(s)" in again.output

    # the same confirm without racing would mix two rules in one ranking: refused in one line
    every = CliRunner().invoke(cli.main, [*common, "--trials", "0", "--no-race"])
    assert every.exit_code == 1 and "race" in every.output and len(confirm_runs()) == 5, every.output


def test_the_space_files_seed_spread_counts_only_at_the_search_size():
    from fmnist_mlflow.studies import confirm
    from fmnist_mlflow.studies.space import load_space

    space = load_space()
    assert space.seed_sd == pytest.approx(0.0019)
    assert confirm.prior_sd(space, search.SearchSettings()) == space.seed_sd
    assert confirm.prior_sd(space, search.SearchSettings(subset=600)) is None
    assert confirm.prior_sd(space, search.SearchSettings(epochs=3)) is None


def test_the_default_pruner_stops_a_trial_clearly_behind_and_its_run_ends_killed_at_that_epoch(store, tmp_path):
    """Six recipes that learn, then one whose rate cannot move the weights: the default pruner (whatever
    the measurement chose) stops that one once it may judge, and its run ends KILLED, saying after which
    epoch; the trials line says so too."""
    default = pruners.PRUNERS[0]
    good = [{"optimizer": "adam", "lr": 3e-3, "dropout": d} for d in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)]
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({**RACE_SPACE, "start_points": [*good, {"optimizer": "sgd", "lr": 1e-6,
                                                                              "dropout": 0.2}]}))
    epochs = 5
    args = ["search", "--space", str(space), "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--trials", "7",
            "--epochs", str(epochs), "--subset", "600", "--jobs", "1"]  # no --pruner: the default
    result = CliRunner().invoke(cli.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    (bad,) = [t for t in study.trials if t.params["optimizer"] == "sgd"]
    assert bad.state.name == "PRUNED", (default, result.output)
    stopped = max(bad.intermediate_values)
    assert pruners.CATALOGUE[default].first_epoch(epochs) <= stopped < epochs
    (run,) = [r for r in study_runs()[1] if r.data.tags[schema.TAG_TRIAL] == str(bad.number)]
    assert run.info.status == "KILLED" and run.data.tags[schema.TAG_STATE] == "PRUNED"
    assert f"pruned after epoch {stopped} " in run.data.tags[schema.TAG_FAILURE]
    assert f"trial {bad.number} PRUNED" in result.output and f"after epoch {stopped}" in result.output
    # the replays of the other pruners see completed trials only, and the summary says so beside them
    pruned = sum(t.state.name == "PRUNED" for t in study.trials)
    assert f"the replays judge completed trials only: the {pruned} trial(s) this study's pruner stopped" in result.output


def test_the_rung_pruner_judges_once_against_every_trial_that_got_there_pruned_ones_included():
    from fmnist_mlflow.studies.pruners import RungPruner

    study = optuna.create_study(direction="maximize", pruner=RungPruner(epoch=1, keep=0.5, n_startup=3))

    def run(curve):
        """Report the curve epoch by epoch; the epoch after which the pruner stopped it, or None."""
        trial = study.ask()
        for epoch, value in enumerate(curve, 1):
            trial.report(value, epoch)
            if trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                return epoch
        study.tell(trial, curve[-1])
        return None

    assert [run([v, 0.9]) for v in (0.80, 0.50, 0.60)] == [None, None, None]  # the first 3 are never judged
    assert run([0.55, 0.95]) == 1  # below the median (0.60) of the 3 before it: stopped after epoch 1
    # the stopped trial counts: epoch-1 values 0.80, 0.50, 0.60, 0.55 -> the median 0.575
    assert run([0.58, 0.10]) is None  # above it goes on, and is never judged again, however it ends
    assert run([0.57, 0.99]) == 1  # 0.80, 0.50, 0.60, 0.55, 0.58: the median 0.58
    minimize = optuna.create_study(direction="minimize", pruner=RungPruner(epoch=2, keep=0.5, n_startup=1))
    first = minimize.ask()
    first.report(0.3, 1), first.report(0.3, 2)
    minimize.tell(first, 0.3)
    second = minimize.ask()
    second.report(0.9, 1)
    assert not second.should_prune()  # not its epoch yet
    second.report(0.9, 2)
    assert second.should_prune()  # worse than the one before it at epoch 2, minimizing
    with pytest.raises(ValueError):
        RungPruner(epoch=0)


@pytest.mark.parametrize("before, median", [
    ((0.80, 0.70, 0.60, 0.50), 0.65),  # 4 earlier trials: the mean of the middle two
    ((0.80, 0.70, 0.60, 0.55, 0.50), 0.60),  # 5: the middle one (the rule before was stricter: 0.70 here)
    ((0.91, 0.90, 0.89, 0.88, 0.87, 0.86, 0.85, 0.84, 0.10), 0.87),  # 9, one far below: the 5th
])
def test_halve1_stops_below_the_median_of_the_trials_before_as_its_help_says(before, median):
    """`--pruner halve1`: "stopped if below the median of every trial that reached epoch 1": a trial just
    above the median goes on, one at it goes on, one just below is stopped."""
    from fmnist_mlflow.studies import pruners

    for value, stopped in ((median + 0.001, False), (median, False), (median - 0.001, True)):
        study = optuna.create_study(direction="maximize", pruner=pruners.make("halve1", 10))
        for v in before:
            trial = study.ask()
            trial.report(v, 1)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        trial = study.ask()
        trial.report(value, 1)
        assert trial.should_prune() is stopped, (value, median)
