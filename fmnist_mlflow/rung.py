"""A pruner that judges each trial once, after one early epoch: successive halving with a single rung.

Optuna's median and percentile pruners compare a trial with the *completed* trials only, so once they have
stopped the weak ones, the completed set is the strong ones and their median climbs: replayed on a study of
the default space they stopped 3 of its final top 5 (experiments/SEARCH.md). Optuna's successive halving
compares with every trial that reached the rung, pruned ones included, but halves again at every later
rung. `RungPruner` keeps the first half and drops the rest: after epoch `epoch` a trial goes on if its
value is within the best `keep` fraction of every trial of the study that has reached that epoch
(completed, pruned or still running), and is never judged again.
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState


class RungPruner(optuna.pruners.BasePruner):
    def __init__(self, epoch: int, keep: float = 0.5, n_startup: int = 5):
        if epoch < 1 or not 0 < keep < 1 or n_startup < 1:
            raise ValueError(f"RungPruner needs epoch >= 1, 0 < keep < 1, n_startup >= 1; got {epoch}, {keep}, {n_startup}")
        self.epoch, self.keep, self.n_startup = epoch, keep, n_startup

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if trial.last_step != self.epoch:
            return False
        value = trial.intermediate_values[self.epoch]
        others = sorted(t.intermediate_values[self.epoch] for t in study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
            if t.number != trial.number and self.epoch in t.intermediate_values)
        if len(others) < self.n_startup:
            return False
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        ranked = others[::-1] if maximize else others  # best first
        # the value of the last trial kept among the others: a trial must reach it (ties go on)
        bar = ranked[max(0, round(self.keep * len(others)) - 1)]
        return value < bar if maximize else value > bar
