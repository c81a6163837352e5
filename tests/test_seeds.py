"""Seeds: the grid's seed dimension and its resume, the statistics on known numbers, one-seed summaries,
the confirm step of the search, the widened search space, and registering by the seed mean."""

import math
import re

import mlflow
import optuna
import pytest
import yaml
from click.testing import CliRunner

from fmnist_mlflow import schema
from fmnist_mlflow.cli import main as cli
from fmnist_mlflow.studies import grid
from fmnist_mlflow.tracking import registry
from fmnist_mlflow.tracking.fit import tracked_fit
from fmnist_mlflow.results import stats
from fmnist_mlflow.results import seeds
from fmnist_mlflow.studies import sweep
from fmnist_mlflow.training.config import RunConfig
from fmnist_mlflow.studies.engine import Hooks
from fmnist_mlflow.studies.space import load_space
from fmnist_mlflow.tracking import experiment as experiments
from fmnist_mlflow.results import report

SMALL = {
    "name": "seeded", "models": ["model1"], "losses": ["ce"], "optimizers": ["adam", "sgd"],
    "lr": {"adam": 0.001, "sgd": 0.05}, "batch_size": 64, "epochs": 1, "seeds": [0, 1],
}  # fmt: skip


def write_yaml(tmp_path, spec, name="grid.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def children():
    return [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
            if "mlflow.parentRunId" in r.data.tags]


# --- statistics, against numbers worked out by hand ---------------------------------------------------


def test_estimate_on_known_numbers():
    est = stats.estimate([0.90, 0.92, 0.94])
    # mean 0.92; std sqrt(((-0.02)^2 + 0 + 0.02^2) / 2) = 0.02; t(0.975, df=2) = 4.302653;
    # half-width 4.302653 * 0.02 / sqrt(3) = 0.049683
    assert est.n == 3 and est.mean == pytest.approx(0.92) and est.std == pytest.approx(0.02)
    assert est.ci95 == pytest.approx((0.870317, 0.969683), abs=1e-6)
    one = stats.estimate([0.9])
    assert (one.n, one.mean, one.std, one.ci95) == (1, 0.9, None, None)  # no fake interval


def test_welch_test_on_known_numbers():
    # [1, 2, 3] vs [4, 5, 6]: means 2 and 5, variances 1 and 1; t = -3 / sqrt(1/3 + 1/3) = -3.674235;
    # Welch df = (2/3)^2 / ((1/3)^2/2 * 2) = 4; two-sided p for |t| = 3.674235 with 4 df = 0.021312
    assert stats.welch_p([1, 2, 3], [4, 5, 6]) == pytest.approx(0.021312, abs=1e-5)
    assert stats.indistinguishable(0.021312) is False and stats.indistinguishable(0.2) is True
    assert stats.welch_p([1.0], [2.0, 3.0]) is None  # one seed: no test
    assert stats.welch_p([1.0, 1.0], [1.0, 1.0]) == 1.0 and stats.welch_p([1.0, 1.0], [2.0, 2.0]) == 0.0


def rows_for(values: dict) -> list:
    """Summary rows of made-up runs: {optimizer: [val_accuracy per seed]}."""
    out = []
    for optimizer, accs in values.items():
        for seed, acc in enumerate(accs):
            config = RunConfig(optimizer=optimizer, seed=seed, device="cpu")
            history = [{"epoch": 1, "train_loss": 0.3, "val_loss": 0.3, "val_nll": 1 - acc, "val_accuracy": acc,
                        "epoch_seconds": 1.0}]
            out.append(seeds.row(config, "FINISHED", history, f"run-{optimizer}-{seed}"))
    return out


def test_aggregate_ranks_by_mean_and_marks_configs_indistinguishable_from_the_best():
    rows = rows_for({"adam": [0.90, 0.92, 0.94], "sgd": [0.91, 0.93, 0.95], "rmsprop": [0.50, 0.51, 0.52]})
    configs = seeds.aggregate(rows, "val_accuracy")
    best = seeds.best(configs)
    assert best.optimizer == "sgd" and best.val_accuracy.mean == pytest.approx(0.93)
    assert best.best_run_id == "run-sgd-2"  # the seed best on validation
    by_name = {c.optimizer: c for c in configs}
    assert by_name["adam"].same_as_best is True and by_name["adam"].p_vs_best > 0.05
    assert by_name["rmsprop"].same_as_best is False and by_name["rmsprop"].p_vs_best < 0.05
    markdown = report.to_markdown(rows, "val_accuracy")
    assert "| 1 | model1 | ce | sgd |" in markdown and "93.00% ± 2.00" in markdown
    assert "[88.03, 97.97]" in markdown  # 93 ± 4.302653 * 2 / sqrt(3) = 93 ± 4.97
    assert "51.00% ± 1.00 | [48.52, 53.48]" in markdown  # 51 ± 4.302653 * 1 / sqrt(3) = 51 ± 2.48
    assert "Indistinguishable from it at the 5% level: model1-ce-adam." in markdown
    # several configs "=" to the best are listed by rank, not by name; a loss's interval never goes below 0
    close_rows = rows_for({"adam": [0.91, 0.93, 0.95], "rmsprop": [0.92, 0.94, 0.96], "sgd": [0.93, 0.95, 0.97]})
    close = seeds.aggregate(close_rows, "val_accuracy")
    assert "Indistinguishable from it at the 5% level: model1-ce-rmsprop, model1-ce-adam." in report.to_markdown(
        close_rows)
    assert all(c.val_nll.ci95[0] >= 0 for c in close)
    assert stats.estimate([0.02, 0.6], nonnegative=True).ci95[0] == 0.0 < stats.estimate([0.02, 0.6]).ci95[1]
    # by NLL (lower is better) the same data ranks the same way
    assert seeds.best(seeds.aggregate(rows, "val_nll")).optimizer == "sgd"


def test_one_seed_summary_prints_no_interval():
    markdown = report.to_markdown(rows_for({"adam": [0.9], "sgd": [0.8]}), "val_accuracy")
    assert "n/a (1 seed)" in markdown and "no interval can be given" in markdown
    table = [line for line in markdown.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(table) == 2 and table[0].startswith("| 1 | model1 | ce | adam |")
    assert all("±" not in line and "(p " not in line for line in table)


# --- the grid's seed dimension ----------------------------------------------------------------------


def test_grid_seeds_expand_and_cli_overrides_them(tmp_path):
    g = grid.load_grid(write_yaml(tmp_path, SMALL))
    configs = g.configs(device="cpu")
    assert [(c.optimizer, c.seed) for c in configs] == [("adam", 0), ("adam", 1), ("sgd", 0), ("sgd", 1)]
    assert len({c.digest() for c in configs}) == 4 and len({c.group for c in configs}) == 2
    assert [c.seed for c in g.configs(device="cpu", seeds=(5,))] == [5, 5]
    assert grid.parse_seeds("0,1,2") == (0, 1, 2)
    for bad in ("0,0", "a,b", "-1", str(2**63), "", " ", "0,,1", "0,1,"):
        with pytest.raises(ValueError):
            grid.parse_seeds(bad)


def test_seeded_sweep_groups_seeds_and_resumes_per_config_and_seed(store, tmp_path, tiny_data):
    g = grid.load_grid(write_yaml(tmp_path, SMALL))
    configs = g.configs(subset=600, device="cpu")
    experiment_id = experiments.use_experiment("fmnist")

    def interrupt(config):
        def on_epoch_end(metrics):
            if config.optimizer == "sgd" and config.seed == 1:
                raise KeyboardInterrupt("simulated Ctrl-C")
        return on_epoch_end, None

    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(g, configs, tiny_data, experiment_id=experiment_id, race=False,  # every point runs
                        hooks=Hooks(progress=lambda trial, config: interrupt(config)))
    statuses = sorted((c.data.params["optimizer"], c.data.params["seed"], c.info.status) for c in children())
    # seed by seed: both seed-0 runs came first, then adam seed 1, then sgd seed 1 was interrupted
    assert statuses == [("adam", "0", "FINISHED"), ("adam", "1", "FINISHED"), ("sgd", "0", "FINISHED"),
                        ("sgd", "1", "KILLED")]
    started = []
    result = sweep.run_sweep(g, configs, tiny_data, experiment_id=experiment_id, race=False,
                             hooks=Hooks(on_start=lambda k, n, config, *_: started.append((config.optimizer, config.seed))))
    assert started == [("sgd", 1)] and result.skipped == 3  # only the interrupted (config, seed) runs again
    finished = [c for c in children() if c.info.status == "FINISHED"]
    assert len(finished) == 4
    for run in finished:  # what the UI groups seeds by: a shared tag, and the seed in the name and as a param
        config_name = f"model1-ce-{run.data.params['optimizer']}-{run.data.tags[schema.TAG_CONFIG_GROUP][:6]}"
        assert run.data.tags[schema.TAG_CONFIG_NAME] == config_name
        assert run.info.run_name == f"{config_name}-seed{run.data.params['seed']}"
    groups = {}
    for run in finished:
        groups.setdefault(run.data.tags[schema.TAG_CONFIG_GROUP], set()).add(run.data.params["seed"])
    assert sorted(groups.values(), key=sorted) == [{"0", "1"}, {"0", "1"}]
    assert [c.seeds for c in result.configs] == [(0, 1), (0, 1)]
    assert all(c.val_accuracy.ci95 is not None for c in result.configs)
    parent = mlflow.get_run(result.parent_run_id)
    assert parent.data.params["seeds"] == "0,1" and "best_val_accuracy_ci95_low" in parent.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.parent_run_id)}
    assert {"summary.csv", "summary_by_config.csv", "summary.md", "loss_curves.png", "val_accuracy.png"} <= artifacts


# --- the widened search space and the confirm step ---------------------------------------------------


SPACE = {
    "name": "wide", "metric": "val_accuracy", "fixed": {"model": "model3", "loss": "ce", "seed": 0},
    "search": {"optimizer": {"choices": ["adam"]}, "lr": {"adam": {"low": 1e-3, "high": 3e-3, "log": True}},
               "weight_decay": {"low": 1e-6, "high": 1e-2, "log": True},
               "schedule": {"choices": ["constant", "cosine", "onecycle"]}, "batch_size": {"choices": [64, 128]},
               "label_smoothing": {"low": 0.0, "high": 0.1}, "augment": {"choices": ["none", "flip", "flip-shift"]}},
}  # fmt: skip


def test_the_default_space_loads_and_suggests_every_new_setting():
    import optuna

    space = load_space()
    assert {"weight_decay", "label_smoothing", "dropout"} <= set(space.ranges)
    assert {"optimizer", "augment"} <= set(space.choices)
    config = space.suggest(optuna.trial.FixedTrial({"optimizer": "sgd", "dropout": 0.2, "lr_sgd": 0.05,
                                                    "weight_decay": 1e-4, "label_smoothing": 0.1, "augment": "flip"}),
                           epochs=10, device="cpu")
    assert (config.schedule, config.batch_size, config.augment, config.weight_decay) == ("onecycle", 128, "flip", 1e-4)
    assert (config.width, config.tta, config.ema, config.warmup) == (1.5, True, 0.0, 0.3)  # the measured levers
    # warm start from MLflow params, which come back as strings
    params = space.params_for({"optimizer": "adam", "batch_size": "64", "schedule": "constant", "lr": "0.001",
                               "weight_decay": "0.0", "dropout": "0.0", "augment": "none", "label_smoothing": "0.0"})
    assert params["augment"] == "none" and params["weight_decay"] == 1e-6 and params["lr_adam"] == 0.001


def test_widened_settings_reach_the_optimizer_schedule_and_loss_and_train_reproducibly(tiny_data):
    import torch

    from fmnist_mlflow.training import train

    config = RunConfig(model="model3", epochs=2, subset=600, device="cpu", weight_decay=1e-3, schedule="onecycle",
                       warmup=0.2, label_smoothing=0.1, augment="flip-shift", batch_size=128)
    model = train.prepare_model(config)
    optimizer = train.make_optimizer(config, model.parameters())
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 1e-3
    steps = 2 * 25  # 2 epochs of 25 batches
    schedule, lrs = train.make_schedule(config, optimizer, 25), []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    # onecycle: from lr / 25 up to lr at 20% of the steps, then down to almost nothing
    assert lrs[0] == pytest.approx(config.lr / 25) and max(lrs) == pytest.approx(config.lr)
    assert lrs.index(max(lrs)) == round(0.2 * steps) - 1 and lrs[-1] < config.lr / 1000
    cosine = RunConfig(model="model3", epochs=2, subset=600, device="cpu", schedule="cosine", optimizer="sgd")
    sgd = train.make_optimizer(cosine, train.prepare_model(cosine).parameters())
    half = train.make_schedule(cosine, sgd, 25)
    for _ in range(25):
        sgd.step()
        half.step()
    assert sgd.param_groups[0]["lr"] == pytest.approx(cosine.lr / 2)  # half way: half the rate
    logits, y = torch.tensor([[8.0] + [0.0] * 9]), torch.tensor([0])
    assert train.loss_fn("ce", logits, y, label_smoothing=0.1) > train.loss_fn("ce", logits, y)
    first, again = train.fit(config, tiny_data).history, train.fit(config, tiny_data).history
    assert len(first) == 2 and all(math.isfinite(m["val_nll"]) for m in first)
    assert [m["val_accuracy"] for m in first] == [m["val_accuracy"] for m in again]  # the same seed: the same run


def test_augment_flips_and_shifts_within_the_image():
    import torch

    from fmnist_mlflow.training import train

    x = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    x[:, 0, 10:18, 3:6] = 255  # a bar near the left edge
    g = torch.Generator().manual_seed(0)
    flipped = train.augment(x, "flip", g)
    assert flipped.dtype == torch.uint8 and flipped.shape == x.shape
    mirrored = (flipped[:, 0, 10:18, 22:25] == 255).all(dim=(1, 2))
    assert 10 < int(mirrored.sum()) < 54  # about half mirrored
    shifted = train.augment(x, "flip-shift", g)
    assert (shifted.flatten(1).sum(1) == x.flatten(1).sum(1)).all()  # shifts of <= 2 px keep the whole bar


def test_confirm_reruns_the_best_trials_on_fresh_seeds_nested_and_names_the_champion_by_the_mean(store, tmp_path):
    space_path = write_yaml(tmp_path, {**SPACE, "fixed": {**SPACE["fixed"], "model": "model2"},
                                       "search": {"optimizer": {"choices": ["adam", "sgd"]},
                                                  "lr": {"adam": {"low": 1e-3, "high": 3e-3},
                                                         "sgd": {"low": 1e-5, "high": 2e-5}}}}, "space.yaml")
    args = ["search", "--space", str(space_path), "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--trials", "3",
            "--epochs", "1", "--subset", "600", "--pruner", "none", "--seed", "1", "--confirm", "2", "--seeds", "2"]
    result = CliRunner().invoke(cli.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    all_runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    (parent,) = [r for r in all_runs if r.data.tags.get(schema.TAG_KIND) == "search"]
    confirm_runs = [r for r in all_runs if r.data.tags.get(schema.TAG_KIND) == "confirm"]
    assert len(confirm_runs) == 4 and {r.data.tags["mlflow.parentRunId"] for r in confirm_runs} == {parent.info.run_id}
    assert sorted(r.data.params["seed"] for r in confirm_runs) == ["1", "1", "2", "2"]  # fresh seeds, not 0
    # the champion is the config with the best mean over its confirm seeds
    means = {}
    for r in confirm_runs:
        means.setdefault(r.data.tags[schema.TAG_CONFIG_GROUP], []).append(r.data.metrics["val_accuracy"])
    best_group = max(means, key=lambda g: sum(means[g]) / len(means[g]))
    assert parent.data.tags["fmnist.champion_config_group"] == best_group
    champion_run = mlflow.get_run(parent.data.tags["fmnist.champion_run_id"])
    assert champion_run.data.tags[schema.TAG_CONFIG_GROUP] == best_group
    assert "**champion**" in result.output and "champion: trial" in result.output
    assert re.search(r"\[confirm\] trial \d+ seed 2: val_accuracy \d+\.\d\d%", result.output)  # each run's figure
    assert "confirm.md" in {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}
    # confirming again resumes: nothing is re-run
    again = CliRunner().invoke(cli.main, [*args[:args.index("--trials") + 1], "0", *args[args.index("--trials") + 2:]],
                               catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert "[confirm" not in again.output
    assert len([r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
                if r.data.tags.get(schema.TAG_KIND) == "confirm"]) == 4
    # then register, as the README's search block does: a confirmed contender, weighed over its seeds
    registered = CliRunner().invoke(cli.main, ["register"], catch_exceptions=False)
    assert registered.exit_code == 0, registered.output
    version = mlflow.MlflowClient().get_model_version_by_alias("fmnist-cnn", "champion")
    # one champion: the confirm's, on its fresh seeds only (not the search's seed 0), in the parent, the
    # version and the search study
    assert version.tags[schema.TAG_CONFIG_GROUP] == best_group and version.tags["seeds"] == "1,2"
    assert "the champion of the confirm of search wide (seeds 1,2" in version.description
    assert "the newest confirmed search (wide) names the champion" in registered.output
    study = optuna.load_study(study_name="wide", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.user_attrs["champion"]["config_group"] == best_group
    # asking to confirm more trials than completed says so, and confirms those it has
    more = CliRunner().invoke(cli.main, [*args[:args.index("--trials") + 1], "0", *args[args.index("--trials") + 2:],
                                         "--confirm", "9"], catch_exceptions=False)
    assert more.exit_code == 0 and "note: --confirm 9: the study has 3 completed trial(s); confirming those" in more.output


# --- registering by the seed mean --------------------------------------------------------------------


def test_register_selects_by_the_seed_mean_and_reports_test_accuracy_over_seeds(store, tiny_data):
    experiments.use_experiment("fmnist")
    seeded = [tracked_fit(RunConfig(epochs=2, subset=600, seed=s, device="cpu"), tiny_data) for s in (0, 1, 2)]
    # a single lucky run of another config must not beat a mean over seeds
    tracked_fit(RunConfig(optimizer="rmsprop", epochs=2, subset=600, seed=7, device="cpu"), tiny_data)
    result = CliRunner().invoke(cli.main, ["register"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "1 single-seed config(s) were left out" in result.output
    version = mlflow.MlflowClient().get_model_version_by_alias("fmnist-cnn", "champion")
    best_seed = max(seeded, key=lambda r: r.final["val_accuracy"])
    assert version.tags["source_run_id"] == best_seed.run_id and version.tags["seeds"] == "0,1,2"
    test_accs = [registry.evaluation_run(mlflow.get_run(r.run_id)).data.metrics["test_accuracy"]
                 for r in seeded]  # every seed evaluated, each in its own evaluation run
    est = stats.estimate(test_accs)
    assert float(version.tags["test_accuracy_mean"]) == pytest.approx(est.mean, abs=1e-6)
    assert float(version.tags["test_accuracy_ci95_low"]) == pytest.approx(est.ci95[0], abs=1e-6)
    assert f"mean {100 * est.mean:.2f}%" in result.output
    assert "Test accuracy over its 3 seed(s)" in version.description
    assert mlflow.MlflowClient().get_registered_model("fmnist-cnn").description
