"""The main job's comparison with the best (pooled seed noise) and its racing of seeds: a config already
shown worse than the leader gets no more seeds, its points PRUNED with the reason and no run, with one
worker, two, and on a resume; `--no-race` runs every point."""

import math

import mlflow
import optuna
import pytest
import yaml
from click.testing import CliRunner
from scipy import stats as sps

from fmnist_mlflow.cli import main as cli
from fmnist_mlflow import schema
from fmnist_mlflow.results import stats
from fmnist_mlflow.results import seeds

# adam learns in one epoch; SGD at lr 1e-6 without momentum stays near chance (10%): clearly behind
RACE_GRID = {"name": "race", "models": ["model1"], "losses": ["ce"], "optimizers": ["adam", "sgd"],
             "lr": {"adam": 0.003, "sgd": 1e-6}, "batch_size": 64, "epochs": 1, "seeds": [0, 1, 2],
             "seed_sd": 0.01}  # fmt: skip


# --- the comparison, on a fixed table --------------------------------------------------------------


def table() -> dict:
    """Seven configs of one family, three seeds each: six spread 1 point (sd 0.01), one 2 points (sd 0.02)
    and 4 points behind the best."""
    t = {"best": [0.92, 0.93, 0.94]}
    for i, mean in enumerate((0.91, 0.90, 0.88, 0.87, 0.86)):
        t[f"c{i}"] = [mean - 0.01, mean, mean + 0.01]
    t["wide"] = [0.87, 0.89, 0.91]
    return t


def test_a_wide_config_far_behind_is_not_equal_to_the_best_under_the_pooled_test():
    t = table()
    family = {k: "model1" for k in t}
    # Welch alone: se^2 = (1e-4 + 4e-4) / 3, t = 0.04 / 0.012910 = 3.098 on ~2.9 df: p ~0.055, "="
    assert stats.welch_p(t["best"], t["wide"]) == pytest.approx(0.0548, abs=0.002)
    # pooled: ss = 6 * 2e-4 + 8e-4 = 2e-3 over 14 df, sd = 0.011952; se = sd * sqrt(2/3) = 0.009759;
    # t = 4.0988 on 14 df: p = 0.0011, "<"
    noise = stats.seed_noise(t, family)
    assert noise.pooled and noise.of("model1") == pytest.approx((math.sqrt(2e-3 / 14), 14))
    p = stats.compare_with_best(t, "best", noise, family)
    assert p["wide"] == pytest.approx(2 * sps.t.sf(0.04 / (math.sqrt(2e-3 / 14) * math.sqrt(2 / 3)), 14), rel=1e-6)
    assert p["wide"] < 0.002 and not stats.indistinguishable(p["wide"])
    assert stats.indistinguishable(p["c0"]) and p["best"] is None  # 2 points behind with t = 2.05: p 0.06


def test_families_with_different_spreads_are_compared_with_their_own():
    t = {"a1": [0.90, 0.91, 0.92], "a2": [0.89, 0.90, 0.91], "a3": [0.88, 0.89, 0.90],
         "b1": [0.80, 0.86, 0.92], "b2": [0.78, 0.84, 0.90], "b3": [0.77, 0.83, 0.89]}
    family = {k: k[0] for k in t}
    noise = stats.seed_noise(t, family)
    assert not noise.pooled and noise.levene_p < 0.05  # b's seeds spread 6x a's
    assert noise.of("a")[0] == pytest.approx(0.01) and noise.of("b")[0] == pytest.approx(0.06)
    assert "per model family" in noise.describe()
    # b1 (4 points behind a1, b's spread) is "="; a3 (2 points behind, a's spread, 4 df) is "<"
    p = stats.compare_with_best(t, "a1", noise, family)
    assert stats.indistinguishable(p["b1"]) and not stats.indistinguishable(p["a3"])


def test_race_verdict_uses_the_prior_until_a_family_has_two_seeds():
    family = {"lead": "m3", "close": "m1", "far": "m1"}
    done = {"lead": [0.92], "close": [0.915], "far": [0.85]}
    assert stats.race_verdict(done, family, "close", "val_accuracy", 0.008) == ""
    why = stats.race_verdict(done, family, "far", "val_accuracy", 0.008)
    assert "7.00 points behind the leader lead" in why
    assert why.endswith("prior seed sd 0.80 points: no model family has a config with two seeds yet")
    assert stats.race_verdict(done, family, "far", "val_accuracy", None) == ""  # one seed each, no prior: no test
    assert stats.race_verdict(done, family, "lead", "val_accuracy", 0.008) == ""  # the leader always races on
    assert stats.race_verdict({**done, "far": []}, family, "far", "val_accuracy", 0.008) == ""  # nothing finished yet


# --- racing in a real sweep ------------------------------------------------------------------------


# With two workers, a point of the previous round may still run when the next round starts; it then counts
# from the round after. A third config, as good as adam, puts two points between sgd's seeds 0 and 1, so
# that sgd's seed 0 has ended when its seed 1 is claimed. The prior is wide (5 points) so that rmsprop is
# not raced out on a first seed's luck; sgd, ~70 points behind, is.
TWO_WORKER_GRID = {**RACE_GRID, "optimizers": ["adam", "rmsprop", "sgd"],
                   "lr": {"adam": 0.003, "rmsprop": 0.003, "sgd": 1e-6}, "seed_sd": 0.05}


def grid_file(tmp_path, spec=RACE_GRID):
    path = tmp_path / "race.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep(tmp_path, *extra, spec=RACE_GRID):
    """The grid at its own size (full data, 1 epoch): the size its prior seed_sd is for."""
    args = ["sweep", "--grid", str(grid_file(tmp_path, spec)), "--device", "cpu",
            "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", *extra]
    return CliRunner().invoke(cli.main, args, catch_exceptions=False)


def study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    (only,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=only.study_name, storage=storage)


def children():
    runs = mlflow.search_runs(experiment_names=["fmnist"], output_format="list")
    return sorted((r.data.params["optimizer"], r.data.params["seed"], r.info.status)
                  for r in runs if r.data.tags.get(schema.TAG_KIND) == "sweep-child")


def parent():
    (run,) = mlflow.search_runs(experiment_names=["fmnist"], output_format="list",
                                filter_string=f"tags.`{schema.TAG_KIND}` = 'sweep'")
    return run


def assert_raced(tmp_path) -> None:
    """sgd ran seed 0 only: its seeds 1 and 2 are PRUNED trials that say why, and have no run; every
    other point ran once, or was raced out the same way."""
    trials = study(tmp_path).trials
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert all(schema.ATTR_RACED_OUT in t.user_attrs and schema.ATTR_RUN not in t.user_attrs for t in pruned)
    assert all("behind the leader" in t.user_attrs[schema.ATTR_RACED_OUT] for t in pruned)
    raced = {(t.params["config"].split("-")[2], str(t.params["seed"])) for t in pruned}
    assert {("sgd", "1"), ("sgd", "2")} <= raced
    ran = children()
    assert [r for r in ran if r[0] == "sgd"] == [("sgd", "0", "FINISHED")]
    assert [r for r in ran if r[0] == "adam"] == [("adam", s, "FINISHED") for s in "012"]  # the leader
    points = [(o, s) for o, s, _ in ran] + sorted(raced)
    assert len(points) == len(set(points)) == len(trials) == 3 * len({o for o, _ in points})  # each once


def test_a_config_clearly_behind_is_raced_out_also_across_an_interrupted_seed_and_the_answer_says_so(store, tmp_path):
    """The worker is stopped in adam's seed 1 (Ctrl-C: its run KILLED, its point queued again); the resume
    runs that point again, races sgd out of seeds 1 and 2 as an uninterrupted sweep would, and writes the
    answer."""
    from fmnist_mlflow.studies import grid, sweep as sweep_mod
    from fmnist_mlflow.studies.engine import Hooks
    from fmnist_mlflow.tracking.experiment import use_experiment
    from fmnist_mlflow.training import data

    g = grid.load_grid(grid_file(tmp_path))

    def stop_in_adam_seed_1(trial, config):
        def on_epoch_end(metrics):
            if config.optimizer == "adam" and config.seed == 1:
                raise KeyboardInterrupt("simulated Ctrl-C")
        return on_epoch_end, None

    with pytest.raises(KeyboardInterrupt):
        sweep_mod.run_sweep(g, g.configs(device="cpu"), data.load(), experiment_id=use_experiment("fmnist"),
                            storage_url=f"sqlite:///{tmp_path / 'optuna.db'}",
                            hooks=Hooks(progress=stop_in_adam_seed_1))
    assert ("adam", "1", "KILLED") in children()
    result = sweep(tmp_path, "--jobs", "1")
    assert result.exit_code == 0, result.output
    assert "model1-ce-sgd seed 1: raced out, not run" in result.output
    assert children() == [("adam", "0", "FINISHED"), ("adam", "1", "FINISHED"), ("adam", "1", "KILLED"),
                          ("adam", "2", "FINISHED"), ("sgd", "0", "FINISHED")]
    trials = study(tmp_path).trials
    # Optuna's dashboard names the value, and the study says where its answer is (not in its "best trial")
    assert study(tmp_path).metric_names == ["val_accuracy"]
    assert "seed mean of val_accuracy" in study(tmp_path).user_attrs[schema.ATTR_ANSWER]
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] * 4 + ["FAIL"] + ["PRUNED"] * 2  # FAIL: the stopped one
    assert all(schema.ATTR_RACED_OUT in t.user_attrs and "behind the leader" in t.user_attrs[schema.ATTR_RACED_OUT]
               for t in trials if t.state.name == "PRUNED")
    p = parent()
    assert p.data.tags[schema.TAG_RACE] == "on" and p.data.tags["best_model"] == "model1"
    note = p.data.tags["mlflow.note.content"]  # the run's Overview in the UI: the ranked answer
    assert note.startswith("**Best by mean val_accuracy: model1-ce-adam**")
    assert f"runs/{p.data.tags[schema.TAG_BEST_RUN]}?workflowType=machine_learning" in note
    assert "| 1 | model1-ce-adam | 3 |" in note and "Raced out" in note and "model1-ce-sgd after 1 seed(s)" in note
    md = mlflow.artifacts.load_text(f"runs:/{p.info.run_id}/summary.md")
    assert "raced out after 1 seed(s)" in md and "- model1-ce-sgd: after 1 seed(s)" in md
    assert "the seed spread behind the first verdict: prior seed sd 1.00 points" in md
    assert "'=' marks the configs not shown worse than the best" in md
    assert "did not finish" not in result.output  # raced out is not a failure
    # the study was raced: resuming it without racing would mix two rules, and is refused in one line
    mixed = CliRunner().invoke(cli.main, ["sweep", "--grid", str(grid_file(tmp_path)), "--device", "cpu", "--no-race",
                                          "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"])
    assert mixed.exit_code == 1 and "runs with --race true; this command asks --race false" in mixed.output


def test_two_workers_and_a_resume_never_run_a_raced_out_point(store, tmp_path):
    result = sweep(tmp_path, "--jobs", "2", "--threads", "1", spec=TWO_WORKER_GRID)
    assert result.exit_code == 0, result.output
    assert_raced(tmp_path)
    before = children()
    again = sweep(tmp_path, "--jobs", "1", spec=TWO_WORKER_GRID)
    assert again.exit_code == 0, again.output
    assert f"{len(before)} (config, seed) run(s) had already finished" in again.output
    assert children() == before  # nothing new ran: the raced-out points stay PRUNED


def test_a_smoke_run_at_another_size_races_on_measured_spreads_only(store, tmp_path):
    """The prior is the spread at the grid's own size: with --subset, seed 1 of every config runs."""
    result = sweep(tmp_path, "--subset", "600", "--jobs", "1")
    assert result.exit_code == 0, result.output
    assert ("sgd", "1", "FINISHED") in children()


def test_no_race_runs_every_point(store, tmp_path):
    result = sweep(tmp_path, "--no-race", "--jobs", "2", "--threads", "1", "--subset", "2000")
    assert result.exit_code == 0, result.output
    assert [s for _, _, s in children()] == ["FINISHED"] * 6
    assert parent().data.tags[schema.TAG_RACE] == "off"
    assert "Raced out" not in parent().data.tags["mlflow.note.content"]


def test_summary_rows_of_raced_out_points_are_not_failures():
    rows = [{"model": "model1", "loss": "ce", "optimizer": o, "lr": 0.001, "seed": s, "status": st,
             "train_loss": 0.3, "val_loss": 0.3, "val_nll": 0.3, "val_accuracy": acc, "train_seconds": 1.0,
             "group": o, "run_id": f"{o}{s}"}
            for o, s, st, acc in (("adam", 0, "FINISHED", 0.9), ("adam", 1, "FINISHED", 0.91),
                                  ("sgd", 0, "FINISHED", 0.5), ("sgd", 1, seeds.RACED_OUT, None))]
    configs = {c.name: c for c in seeds.aggregate(rows, raced={"sgd": "after 1 seed(s), far behind"})}
    assert configs["model1-ce-sgd"].status == "raced out after 1 seed(s)" and configs["model1-ce-sgd"].runs == 1
