"""A search that stops itself once further trials are unlikely to beat its best by more than the seed noise.

The rule (stagnation in units of the seed spread): the trials are taken in the order they started; a trial
*gains* when its value beats the value of the last trial that gained by more than one seed standard
deviation (the space file's `seed_sd`: what a second seed of the same config would move), so that small
steps add up to a gain; the first trial gains. Once `patience` trials have
finished (completed, pruned or failed: a pruned trial was below the median, no gain) since the last gain,
the study stops: the best it has is within one seed's noise of what the next trials found, so the confirm,
on fresh seeds, decides among them. Replayed on every committed study before it was made the default
(experiments/SEARCH.md, "A search that stops itself"; `scripts/study_replay.py`).

`Stagnation` is an Optuna callback: it calls Optuna's own `study.stop()` (which ends this process's
`optimize`) and writes why in the study's user attribute `stopped_because`, which every other worker (other
processes, other machines) reads before starting a trial (`Search.more`). The command's trial budget and
`--timeout` hold as before: whichever comes first stops the search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..schema import ATTR_STOPPED

DEFAULT_PATIENCE = 10  # see experiments/SEARCH.md: the TPE start-up (5 random trials after the start points) has run


def stagnated(trials: list, sd: float, patience: int, maximize: bool = True) -> Optional[str]:
    """Why the study should stop ("" / None if not): `trials` are (number, value or None, finished) in the
    order they started; a None value (pruned, failed) never gains."""
    if patience <= 0:
        return None
    best, best_number, anchor, last_gain, since = None, None, None, None, 0
    for number, value, finished in sorted(trials, key=lambda t: t[0]):
        if not finished:
            continue
        if value is not None and (anchor is None or (value - anchor if maximize else anchor - value) > sd):
            anchor, last_gain, since = value, number, 0  # a gain over the last gain
            if best is None or (value > best if maximize else value < best):
                best, best_number = value, number
            continue
        if value is not None and (value > best if maximize else value < best):
            best, best_number = value, number  # better, within the noise of the last gain: the best, no gain
        since += 1
    if best is None or since < patience:
        return None
    return (f"no trial of the {since} finished since trial {last_gain} beat it by more than one seed sd ({sd:.4g}); "
            f"the best is trial {best_number} ({best:.4f}): the trials after it are within its noise")


@dataclass(frozen=True)
class Stagnation:
    """An Optuna callback: after each trial, stop the study (every worker) once it has stagnated."""

    sd: float
    patience: int = DEFAULT_PATIENCE

    def __call__(self, study, trial) -> None:
        import optuna
        from optuna.trial import TrialState

        if ATTR_STOPPED in study.user_attrs:
            study.stop()
            return
        finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        rows = [(t.number, t.value if t.state == TrialState.COMPLETE else None, t.state in finished)
                for t in study.get_trials(deepcopy=False)]
        why = stagnated(rows, self.sd, self.patience, study.direction == optuna.study.StudyDirection.MAXIMIZE)
        if why:
            study.set_user_attr(ATTR_STOPPED, f"stopped itself after trial {trial.number}: {why}")
            study.stop()


def stopped_because(study) -> str:
    """Why the study stopped itself, or ""."""
    return study.user_attrs.get(ATTR_STOPPED, "")
