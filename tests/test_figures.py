"""The figures say what their legends say: the grid's accuracy bars on a 0-100% axis with seed counts and
intervals only for configs that got every seed; pruned trials visible in the search's curves, even one
stopped after its first epoch; parallel coordinates of one optimizer's trials, without "None" values."""

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.visualization import matplotlib as ovm

from fmnist_mlflow.results import figures, stats
from fmnist_mlflow.results.seeds import ConfigRow
from fmnist_mlflow.studies import fidelity, search_report


def row(name: str, accuracies: list, raced: str = "") -> ConfigRow:
    return ConfigRow(name=name, model="model3", loss="ce", optimizer=name, lr=0.001, group=name, runs=len(accuracies),
                     seeds=tuple(range(len(accuracies))), val_accuracy=stats.estimate(accuracies, fraction=True),
                     val_nll=None, train_loss=None, train_seconds=1.0, best_run_id="r", raced_out=raced)


def test_accuracy_bars_start_at_zero_and_draw_intervals_only_for_configs_with_every_seed():
    # the raced-out config's two seeds are far apart: a t-interval over them would run past 100%
    fig = figures.accuracy_bars([row("adam", [0.91, 0.92, 0.915]), row("rmsprop", [0.90, 0.905, 0.91]),
                                 row("sgd", [0.50, 0.99], raced="behind the leader")])
    (ax,) = fig.axes
    assert ax.get_xlim() == (0, 100)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["sgd (2 seeds)", "rmsprop (3 seeds)", "adam (3 seeds)"]  # ranked, each with its seeds
    (intervals,) = [c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]
    rows = sorted(segment[0][1] for segment in intervals.lines[2][0].get_segments())  # the bars' y positions
    assert rows == [1, 2]  # rmsprop and adam; none on the raced-out sgd (row 0)
    assert "raced out (or a seed failed): mean of its fewer seeds, no interval" in [t.get_text() for t in fig.legends[0].get_texts()]
    figures.close(fig)


def study_with_pruned_and_two_optimizers() -> optuna.Study:
    study = optuna.create_study(direction="maximize", study_name="figs")
    curves = {0: [0.80, 0.85, 0.88], 1: [0.70], 2: [0.82, 0.86, 0.87], 3: [0.60, 0.70], 4: [0.81, 0.84, 0.89]}
    optimizers = {0: "adamw", 1: "adamw", 2: "sgd", 3: "adamw", 4: "adamw"}
    for number, curve in curves.items():
        optimizer = optimizers[number]
        params = {"optimizer": optimizer, f"lr_{optimizer}": 0.001 * (number + 1), "dropout": 0.1 * number}
        dists = {"optimizer": CategoricalDistribution(["adamw", "sgd"]), f"lr_{optimizer}": FloatDistribution(1e-4, 1e-1),
                 "dropout": FloatDistribution(0.0, 0.6)}
        state = optuna.trial.TrialState.COMPLETE if len(curve) == 3 else optuna.trial.TrialState.PRUNED
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=dists, state=state, value=curve[-1] if len(curve) == 3 else None,
            intermediate_values=dict(enumerate(curve, start=1))))
    return study


def test_a_trial_pruned_after_its_first_epoch_is_drawn_in_the_curves():
    study = study_with_pruned_and_two_optimizers()
    fig = fidelity.figure(study, 3, "val_accuracy")
    ax = fig.axes[0]
    pruned = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(pruned) == 2 and all(line.get_marker() == "x" for line in pruned)
    assert [len(line.get_xdata()) for line in pruned] == [1, 2]  # the one-epoch trial is its marker
    assert "2 pruned" in ax.get_title()


def test_parallel_coordinates_show_one_optimizers_trials_with_no_none_values():
    study = study_with_pruned_and_two_optimizers()
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    fig = search_report._parallel(ovm, study, completed)
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert "lr_sgd" not in " ".join(ticks) and any("lr_adamw" in t for t in ticks)
    assert all(t.get_rotation() == 30 for t in ax.get_xticklabels())
    assert "optimizer adamw: 2 of 3 completed trials" in ax.get_title()
    texts = [t.get_text() for a in fig.axes for t in a.get_yticklabels()]
    assert "None" not in texts
