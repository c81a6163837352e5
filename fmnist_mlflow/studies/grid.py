"""The fixed grid as data: read `experiments/grid.yaml`, validate it, expand it into RunConfigs.

Every problem (broken YAML, a missing or unknown key, a wrong type, an unknown model/loss/optimizer, a
bad value) raises `SpecError` naming the file, the key and the value, before any run is created: the file's
schema is a pydantic model (`GridFile`), and every combination must make a valid RunConfig.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

from pydantic import AfterValidator, Field, model_validator

from ..training.config import ConfigError, RunConfig
from .specs import (SPECS, Loss, Model, Name, Optimizer, SpecError, Strict, distinct, parse_seeds, read_yaml,
                    validated)

DEFAULT_GRID = SPECS / "grid.yaml"  # the report's 18 configs


@dataclass(frozen=True)
class Grid:
    name: str
    models: tuple
    losses: tuple
    optimizers: tuple
    lr: dict  # optimizer -> learning rate
    momentum: dict  # optimizer -> momentum
    dropout: dict  # model -> dropout rate
    batch_size: int
    epochs: int
    seeds: tuple  # training seeds: every config runs once per seed
    source: str  # the file it was read from
    seed_sd: Optional[float] = None  # prior seed-to-seed sd of the selection metric, for racing (see `results.stats.race_verdict`)

    def configs(self, epochs: int | None = None, subset: int = 0, device: str = "auto", precision: str = "auto",
                seeds: tuple | None = None) -> list:
        """One RunConfig per model x loss x optimizer x seed, in the report's table order (seeds innermost).
        `seeds` overrides the grid's own."""
        return [
            RunConfig(
                model=m, loss=l, optimizer=o, lr=self.lr[o], momentum=self.momentum.get(o, 0.0),
                dropout=self.dropout.get(m, 0.0), batch_size=self.batch_size, epochs=epochs or self.epochs,
                seed=seed, device=device, subset=subset, precision=precision,
            )
            for m, l, o, seed in itertools.product(self.models, self.losses, self.optimizers, seeds or self.seeds)
        ]


def sweep_digest(configs: list) -> str:
    """Identifies one sweep: the same configs (in any order) give the same digest."""
    joined = ",".join(sorted(c.digest() for c in configs))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


class GridFile(Strict):
    """The grid file's schema: experiments/grid.yaml, with a comment on every choice."""

    name: Name
    models: Annotated[list[Model], AfterValidator(distinct)]
    losses: Annotated[list[Loss], AfterValidator(distinct)]
    optimizers: Annotated[list[Optimizer], AfterValidator(distinct)]
    lr: dict[Optimizer, float]  # per optimizer
    momentum: dict[Optimizer, float] = {}
    dropout: dict[Model, float] = {}
    batch_size: int
    epochs: int
    seed: Optional[int] = None  # one training seed, or
    seeds: Optional[list] = None  # several: every config runs once per seed (checked by parse_seeds)
    seed_sd: Optional[Annotated[float, Field(gt=0, lt=1)]] = None  # prior seed spread of the selection metric

    @model_validator(mode="after")
    def whole(self) -> "GridFile":
        for key in ("models", "losses", "optimizers"):
            if not getattr(self, key):
                raise ValueError(f"{key} is empty")
        missing = [o for o in self.optimizers if o not in self.lr]
        if missing:
            raise ValueError(f"lr has no value for optimizer {missing[0]!r}")
        if self.seed is not None and self.seeds is not None:
            raise ValueError("give seed or seeds, not both")
        return self


def load_grid(path: str | Path = DEFAULT_GRID) -> Grid:
    """The grid of a file, checked whole (every combination a valid RunConfig); SpecError names what is wrong."""
    where = str(path)
    spec = validated(GridFile, read_yaml(path), where)
    try:
        seeds = parse_seeds(spec.seeds if spec.seeds is not None else [spec.seed or 0])
    except ValueError as exc:
        raise SpecError(f"{where}: seeds: {exc}") from None
    grid = Grid(name=spec.name, models=tuple(spec.models), losses=tuple(spec.losses), optimizers=tuple(spec.optimizers),
                lr=dict(spec.lr), momentum=dict(spec.momentum), dropout=dict(spec.dropout), batch_size=spec.batch_size,
                epochs=spec.epochs, seeds=seeds, source=where, seed_sd=spec.seed_sd)
    try:
        grid.configs(device="cpu")  # every combination must be a valid RunConfig
    except ConfigError as exc:
        raise SpecError(f"{where}: {exc}") from None
    return grid
