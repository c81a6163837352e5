"""The search's pruners, and a replay of each on a study's recorded curves: what it would have stopped.

Every pruner here is an Optuna pruner (Optuna's own, or `RungPruner`), configured for a 10-epoch run
whose learning rate follows a schedule (onecycle peaks at 30% of the run, so early epochs could rank trials
otherwise than the last: the fidelity is measured in `fidelity`, not assumed). `replay` runs a pruner over a study's completed trials
in the order they started, each judged against the trials before it (pruned ones with the curve they
had when stopped), as a study with that pruner would have judged them; it reports the trial-epochs it
would have saved beside which of the study's final top trials it would have stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import optuna

TOP = 5  # the final top trials a pruner must not stop (the shortlist a confirm step draws from)


@dataclass(frozen=True)
class Pruner:
    name: str
    make: Callable[[int], optuna.pruners.BasePruner]  # epochs -> a fresh pruner
    first_epoch: Callable[[int], int]  # epochs -> the first epoch after which it can stop a trial
    what: str  # one line for --help and the reports


def _optuna(name: str, **settings) -> Callable:
    """A factory of Optuna's pruner `name` (optuna is imported when a pruner is made, not by the CLI)."""

    def make(epochs: int):
        import optuna

        return getattr(optuna.pruners, name)(**{k: v(epochs) if callable(v) else v for k, v in settings.items()})

    return make


def _rung(epoch: int) -> Callable:
    """A factory of `RungPruner` judging after `epoch`, keeping the better half once 3 trials reached it."""

    def make(epochs: int):
        import optuna

        optuna.pruners.BasePruner.register(RungPruner)  # what Optuna asks of a pruner: `prune(study, trial)`
        return RungPruner(epoch=min(epoch, max(1, epochs - 1)), keep=0.5, n_startup=3)

    return make


class RungPruner:
    """An Optuna pruner (registered as a `BasePruner` when made, so that this module imports no Optuna for
    the CLI's help): successive halving with a single rung: each trial is judged once, after one early epoch.

    Optuna's median and percentile pruners compare a trial with the *completed* trials only, so once they
    have stopped the weak ones, the completed set is the strong ones and their median climbs: replayed on a
    study of the default space they stopped 3 of its final top 5 (experiments/SEARCH.md). Optuna's
    successive halving compares with every trial that reached the rung, pruned ones included, but halves
    again at every later rung. This one keeps the first half and drops the rest: after epoch `epoch` a
    trial goes on if its value is within the best `keep` fraction of every trial of the study that has
    reached that epoch (completed, pruned or still running), and is never judged again."""

    def __init__(self, epoch: int, keep: float = 0.5, n_startup: int = 5):
        if epoch < 1 or not 0 < keep < 1 or n_startup < 1:
            raise ValueError(f"RungPruner needs epoch >= 1, 0 < keep < 1, n_startup >= 1; got {epoch}, {keep}, {n_startup}")
        self.epoch, self.keep, self.n_startup = epoch, keep, n_startup

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        import optuna
        from optuna.trial import TrialState

        if trial.last_step != self.epoch:
            return False
        value = trial.intermediate_values[self.epoch]
        others = sorted(t.intermediate_values[self.epoch] for t in study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
            if t.number != trial.number and self.epoch in t.intermediate_values)
        if len(others) < self.n_startup:
            return False
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        bar = self.bar(others, maximize)
        return value < bar if maximize else value > bar  # ties go on

    def bar(self, others: list, maximize: bool) -> float:
        """What a trial must reach: the `keep` quantile of the others from the top, interpolated between two
        values as a median is (keep 0.5: the median; of 0.80, 0.70, 0.60, 0.55, 0.50 that is 0.60, of four
        values the mean of the middle two)."""
        import numpy as np

        return float(np.quantile(others, 1 - self.keep if maximize else self.keep))


CATALOGUE = {p.name: p for p in (
    # The default, chosen by replaying every candidate on a study of the default space (experiments/SEARCH.md,
    # "Choosing the pruner"): the most trial-epochs saved (34%, 28% with the bar at the median as documented,
    # 2026-12-05, still stopping none of the final top 5) with none of the final top 5 stopped. Epoch 1
    # ranked the 16 trials with Spearman 0.90, and every final top-5 trial was 3 points or more above the
    # epoch-1 median; at epoch 2 (0.96) one was only 0.4 points above it.
    *(Pruner(f"halve{k}", _rung(k), lambda e, k=k: k,
             f"judged once, after epoch {k}: stopped if below the median of every trial that reached epoch {k} "
             f"(pruned ones included), once 3 had") for k in (1, 2, 3)),
    # Optuna's own, and the default before the measurement (percentile: the bottom quarter from epoch 4)
    Pruner("percentile", _optuna("PercentilePruner", percentile=75.0, n_startup_trials=6, n_min_trials=4,
                                 n_warmup_steps=lambda e: max(1, e // 2 - 1)),
           lambda e: max(1, e // 2 - 1), "the bottom quarter at the same epoch, from epoch 4 of 10, once 6 trials completed"),
    Pruner("percentile-early", _optuna("PercentilePruner", percentile=75.0, n_startup_trials=5, n_min_trials=4,
                                       n_warmup_steps=2),
           lambda e: 2, "the bottom quarter at the same epoch, from epoch 2, once 5 trials completed"),
    # n_warmup_steps is the first step Optuna judges at
    Pruner("median", _optuna("MedianPruner", n_startup_trials=3, n_warmup_steps=2), lambda e: 2,
           "below the median at the same epoch, from epoch 2, once 3 trials completed"),
    Pruner("median-late", _optuna("MedianPruner", n_startup_trials=5, n_warmup_steps=lambda e: max(1, e // 2 - 1)),
           lambda e: max(1, e // 2 - 1), "below the median at the same epoch, from epoch 4 of 10, once 5 trials completed"),
    Pruner("hyperband", _optuna("HyperbandPruner", min_resource=1, max_resource=lambda e: e, reduction_factor=3),
           lambda e: 1, "Hyperband: brackets of successive halving from epochs 1, 3 and 9"),
    Pruner("asha", _optuna("SuccessiveHalvingPruner", min_resource=1, reduction_factor=3),
           lambda e: 1, "asynchronous successive halving: only the top third goes on at epochs 1, 3 and 9"),
    Pruner("none", _optuna("NopPruner"), lambda e: e, "no pruning: every trial runs every epoch"),
)}  # fmt: skip
PRUNERS = tuple(CATALOGUE)  # the first is the default


def make(name: str, epochs: int) -> "optuna.pruners.BasePruner":
    return CATALOGUE[name].make(epochs)


@dataclass(frozen=True)
class Replay:
    """How a pruner would have treated a study's completed trials, in the order they started."""

    pruner: str
    trials: int  # completed trials with a whole curve, replayed
    epochs: int  # epochs per trial
    stopped: dict  # trial number -> the epoch after which the pruner would have stopped it
    top: tuple  # the study's final top trials (numbers, best first)

    @property
    def epochs_saved(self) -> int:
        return sum(self.epochs - at for at in self.stopped.values())

    @property
    def share_saved(self) -> float:
        return self.epochs_saved / (self.trials * self.epochs) if self.trials else 0.0

    @property
    def top_stopped(self) -> tuple:
        return tuple(n for n in self.top if n in self.stopped)

    def line(self) -> str:
        lost = ", ".join(f"trial {n} (final rank {self.top.index(n) + 1})" for n in self.top_stopped) or "none"
        return (f"would stop {len(self.stopped)} of {self.trials} completed trials, saving {self.epochs_saved} of "
                f"{self.trials * self.epochs} trial-epochs ({100 * self.share_saved:.0f}%); of the final top "
                f"{len(self.top)} it would stop: {lost}")


def whole_curves(study: optuna.Study, epochs: int) -> list:
    """The completed trials that reported every epoch, in the order they started."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and all(e in t.intermediate_values for e in range(1, epochs + 1))]
    return sorted(done, key=lambda t: (t.datetime_start or t.datetime_complete, t.number))


def top_trials(trials: list, maximize: bool, top: int = TOP) -> tuple:
    return tuple(t.number for t in sorted(trials, key=lambda t: t.value, reverse=maximize)[:top])


def replay(study: optuna.Study, name: str, epochs: int, top: int = TOP) -> Replay:
    """Replay pruner `name` (a fresh one) over the study's completed trials: a new in-memory study asks a
    trial for each, reports its recorded epochs and asks the pruner after each but the last, as the
    search does. A trial the replay stops is told PRUNED with the curve it had, so later ones are judged
    against what a study with that pruner would have held. Trials ran side by side in the real study,
    and its sampler saw no pruned trials: the replay is a sequential approximation."""
    import optuna
    from optuna.trial import TrialState

    trials = whole_curves(study, epochs)
    # the study's own name: Hyperband puts a trial in a bracket by a hash of the study's name and its number
    replayed = optuna.create_study(study_name=study.study_name, direction=study.direction, pruner=make(name, epochs),
                                   sampler=optuna.samplers.RandomSampler(seed=0))
    stopped = {}
    for trial in trials:
        t = replayed.ask()
        for epoch in range(1, epochs + 1):
            t.report(trial.intermediate_values[epoch], epoch)
            if epoch < epochs and t.should_prune():
                stopped[trial.number] = epoch
                replayed.tell(t, state=TrialState.PRUNED)
                break
        else:
            replayed.tell(t, trial.value)
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return Replay(name, len(trials), epochs, stopped, top_trials(trials, maximize, top))


def replay_all(study: optuna.Study, epochs: int) -> tuple:
    return tuple(replay(study, name, epochs) for name in PRUNERS if name != "none")
