"""Racing the grid's seeds: a config already shown worse than the leader gets no more seeds.

The grid runs seed by seed. Before a config's next seed starts, its finished seeds of the earlier rounds
are compared with the leader's (the config with the best mean over those rounds) by the test that marks
"=" in the summary (`stats.difference_p`, two-sided, 5%), with each model family's seed spread pooled over
its configs that hold two seeds (`stats.seed_noise`), or, for a family with none yet, the grid file's prior
`seed_sd` taken as known. A config that test calls worse ("<") is out of the race for good (F-race's
rule): its remaining points end as PRUNED Optuna trials with the reason, and no MLflow run is created for
them. The leader and every config still "=" to it get their next seed. Only earlier rounds count, so the
verdicts do not depend on how many workers run the grid or in which order a round's points end.
Replayed on the committed 3-seed grids (scripts/race_replay.py, experiments/GRID.md): the same winner and
the same "=" set as with every seed. `--no-race` gives every config every seed.
"""

from __future__ import annotations

from typing import Optional

from . import stats
from .config import SELECT, pick_best


def verdict(done: dict, family: dict, config: str, select: str, prior_sd: Optional[float],
            name: Optional[dict] = None) -> str:
    """Why `config` gets no more seeds, or "" if it stays in the race. `done`: config -> finished values of
    `select` (one per seed); `family`: config -> model family; `name`: config -> a readable name."""
    if not done.get(config):
        return ""
    scored = [key for key, values in done.items() if values]
    mean = {key: sum(done[key]) / len(done[key]) for key in scored}
    leader = pick_best(scored, select, key=mean.get)
    if leader == config:
        return ""
    noise = stats.seed_noise({k: done[k] for k in scored}, family, prior_sd)
    if noise is None:  # one seed each and no prior: nothing tells a seed's spread yet
        return ""
    p = stats.difference_p(done[leader], done[config], noise.of(family[leader]), noise.of(family[config]))
    if stats.indistinguishable(p):
        return ""
    name = name or {}
    gap = abs(mean[leader] - mean[config]) * (100 if select == "val_accuracy" else 1)
    unit = " points" if select == "val_accuracy" else ""
    return (f"after {len(done[config])} seed(s), {gap:.2f}{unit} {'behind' if SELECT[select] else 'above'} the leader "
            f"{name.get(leader, leader)} ({len(done[leader])} seed(s)) on {select}, p {p:.4f} < {stats.ALPHA}; "
            f"{noise.describe(percent=select == 'val_accuracy')}")
