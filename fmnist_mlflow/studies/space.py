"""The Optuna search space as data: read `experiments/search.yaml`, validate it, suggest RunConfigs.

The file fixes some run settings and searches others: categorical choices (`model`, `loss`, `optimizer`,
`schedule`, `augment`, `batch_size`, `width`, `ema`, `tta`), float ranges (`dropout`, `weight_decay`,
`label_smoothing`, `warmup`), and `lr` as a range per optimizer (named `lr_<optimizer>` in Optuna, so each
optimizer's learning rate is modelled on its own scale). `warmup` is onecycle's: a trial on another
schedule does not draw it. The file's schema is a pydantic model (`SpaceFile`); what spans several keys
(fixed and searched at once, warmup without onecycle, start points inside the space, the space's corners
valid RunConfigs) is checked after it. Problems raise `SpecError` naming the file, the key and the value,
before any run or study is created.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, Field

from ..training.config import (AUGMENTS, MAX_WIDTH, MIN_WIDTH, SCHEDULES, SELECT, ConfigError, RunConfig,
                               direction)
from .specs import SPECS, Choices, Loss, Model, Optimizer, Range, SpecError, Strict, read_yaml, validated

SAMPLERS = ("tpe", "random")
DEFAULT_SPACE = SPECS / "search.yaml"  # the default space (experiments/search.yaml)
ONECYCLE_ONLY = ("warmup",)  # drawn only by trials on the onecycle schedule

Schedule = Literal[SCHEDULES]
Augment = Literal[AUGMENTS]
Width = Annotated[float, Field(ge=MIN_WIDTH, le=MAX_WIDTH)]  # model3's channel multiplier
Decay = Annotated[float, Field(ge=0, lt=1)]  # an EMA decay per step; 0: off
BatchSize = Annotated[int, Field(ge=1)]


def within(low: float, high: float, open_high: bool):
    """A Range whose bounds lie in [low, high] (or [low, high) when `open_high`)."""
    bounds = f"[{low:g}, {high:g}{')' if open_high else ']'}"

    def check(r: Optional[Range]) -> Optional[Range]:
        if r is not None and (r.low < low or r.high > high or (open_high and r.high >= high)):
            raise ValueError(f"must lie in {bounds}, got {r.low:g}..{r.high:g}")
        return r

    return AfterValidator(check)


def positive(r: Range) -> Range:
    if r.low <= 0:
        raise ValueError(f"must be > 0 (low is {r.low:g})")
    return r


class FixedSpec(Strict):
    """Run settings every trial shares (anything a RunConfig holds but the data and device)."""

    model: Optional[Model] = None
    loss: Optional[Loss] = None
    optimizer: Optional[Optimizer] = None
    batch_size: Optional[BatchSize] = None
    seed: Optional[int] = None
    dropout: Optional[float] = None
    lr: Optional[float] = None
    momentum: Optional[float] = None
    weight_decay: Optional[float] = None
    schedule: Optional[Schedule] = None
    label_smoothing: Optional[float] = None
    augment: Optional[Augment] = None
    warmup: Optional[float] = None
    width: Optional[Width] = None
    ema: Optional[Decay] = None
    tta: Optional[bool] = None


class SearchSpec(Strict):
    """What Optuna searches: categorical choices, float ranges within what a RunConfig allows, lr per optimizer."""

    model: Optional[Choices[Model]] = None
    loss: Optional[Choices[Loss]] = None
    optimizer: Optional[Choices[Optimizer]] = None
    schedule: Optional[Choices[Schedule]] = None
    augment: Optional[Choices[Augment]] = None
    batch_size: Optional[Choices[BatchSize]] = None
    width: Optional[Choices[Width]] = None
    ema: Optional[Choices[Decay]] = None
    tta: Optional[Choices[bool]] = None
    dropout: Annotated[Optional[Range], within(0, 1, True)] = None
    weight_decay: Annotated[Optional[Range], within(0, float("inf"), False)] = None
    label_smoothing: Annotated[Optional[Range], within(0, 1, True)] = None
    warmup: Annotated[Optional[Range], within(0, 1, True)] = None
    lr: Optional[dict[Optimizer, Annotated[Range, AfterValidator(positive)]]] = None


class SpaceFile(Strict):
    """The search-space file's schema: experiments/search.yaml, with a comment on every choice."""

    name: Optional[str] = None  # default: the file's stem
    metric: Literal[tuple(SELECT)] = "val_accuracy"
    fixed: FixedSpec = FixedSpec()
    search: SearchSpec
    start_points: list[dict[str, Any]] = []  # known-good recipes tried first on a new study
    # prior seed-to-seed sd of the metric at the search's own size, for racing in confirm
    seed_sd: Optional[Annotated[float, Field(gt=0, lt=1)]] = None


CATEGORICAL = ("model", "loss", "optimizer", "schedule", "augment", "batch_size", "width", "ema", "tta")
RANGES = ("dropout", "weight_decay", "label_smoothing", "warmup")


def brief_params(params: dict) -> str:
    """Trial params for people: floats to 3 significant digits."""
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def drawn(name: str, schedule: Optional[str]) -> bool:
    """Whether a trial on `schedule` draws the range `name` (warmup: onecycle only)."""
    return name not in ONECYCLE_ONLY or schedule == "onecycle"


def _same_param(option, value) -> bool:
    """A choice and a value read back (MLflow params are strings: "64", "1.0", "True")."""
    if isinstance(option, bool) or not isinstance(option, (int, float)):
        return str(option) == str(value)
    try:
        return float(value) == option
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class Space:
    name: str
    metric: str  # a key of config.SELECT
    fixed: dict  # name -> value
    choices: dict  # name -> tuple of choices (see SearchSpec)
    ranges: dict  # name -> Range (see SearchSpec)
    lr: dict  # optimizer -> Range
    source: str
    start_points: tuple = ()  # Optuna params dicts enqueued first on a new study
    # prior seed-to-seed sd of the metric at the search's own size, for racing in confirm (see `results.stats.race_verdict`); not
    # part of the digest: it says how noisy a trial is, not what the space searches
    seed_sd: Optional[float] = None

    @property
    def direction(self) -> str:
        return direction(self.metric)

    def digest(self) -> str:
        """Identifies what the space searches (not its name or file): a study holds one space."""
        parts = {"metric": self.metric, "fixed": self.fixed, "choices": self.choices,
                 "ranges": {k: (r.low, r.high, r.log) for k, r in self.ranges.items()},
                 "lr": {k: (r.low, r.high, r.log) for k, r in self.lr.items()}, "start_points": self.start_points}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=list).encode()).hexdigest()[:16]

    def suggest(self, trial, *, epochs: int, subset: int = 0, device: str = "auto", precision: str = "auto") -> RunConfig:
        """The trial's RunConfig: fixed values, plus what the trial samples."""
        values = dict(self.fixed)
        for name, options in self.choices.items():
            values[name] = trial.suggest_categorical(name, list(options))
        for name, r in self.ranges.items():
            if drawn(name, values.get("schedule")):
                values[name] = trial.suggest_float(name, r.low, r.high, log=r.log)
        optimizer = values.get("optimizer", "adam")
        if optimizer in self.lr:
            r = self.lr[optimizer]
            values["lr"] = trial.suggest_float(f"lr_{optimizer}", r.low, r.high, log=r.log)
        return RunConfig(**values, epochs=epochs, subset=subset, device=device, precision=precision)

    def clamped(self, config: dict) -> list:
        """Notes on the values of `config` (e.g. the grid's best) that `params_for` had to move into the
        space's ranges, and why."""
        notes = []
        for name, r in self.ranges.items():
            if name in config and not r.low <= float(config[name]) <= r.high:
                why = (f"a log-scale range cannot hold {config[name]}; {r.low:g} is its lowest and as good as none"
                       if r.log and float(config[name]) <= 0 else f"the space holds {r.low:g}..{r.high:g}")
                notes.append(f"{name} {min(max(float(config[name]), r.low), r.high):g} for the grid's {config[name]} ({why})")
        return notes

    def params_for(self, config: dict) -> dict:
        """Optuna params that reproduce a config (e.g. the grid's best), keeping what this space holds."""
        params = {}
        for name, options in self.choices.items():
            # MLflow params come back as strings ("64"): match on the string form
            match = [o for o in options if _same_param(o, config.get(name))]
            if match:
                params[name] = match[0]
        optimizer = params.get("optimizer", self.fixed.get("optimizer"))
        schedule = params.get("schedule", self.fixed.get("schedule", config.get("schedule")))
        for name, r in self.ranges.items():
            if name in config and drawn(name, schedule):
                params[name] = min(max(float(config[name]), r.low), r.high)
        if optimizer in self.lr and "lr" in config:
            r = self.lr[optimizer]
            params[f"lr_{optimizer}"] = min(max(float(config["lr"]), r.low), r.high)
        return params


def load_space(path: str | Path = DEFAULT_SPACE) -> Space:
    """The space of a file, checked whole; SpecError names what is wrong."""
    where = str(path)
    spec = validated(SpaceFile, read_yaml(path), where)
    fixed = spec.fixed.model_dump(exclude_unset=True)
    searched = spec.search.model_dump(exclude_unset=True)
    choices = {k: tuple(getattr(spec.search, k).choices) for k in CATEGORICAL if k in searched}
    ranges = {k: getattr(spec.search, k) for k in RANGES if k in searched}
    lr = dict(spec.search.lr or {})
    both = [name for name in searched if name in fixed]
    if both:
        raise SpecError(f"{where}: {both[0]} is both fixed and searched")
    if not choices and not ranges and not lr:
        raise SpecError(f"{where}: search is empty; nothing to tune")
    schedules = choices.get("schedule", (fixed.get("schedule", RunConfig.schedule),))
    if ("warmup" in fixed or "warmup" in ranges) and "onecycle" not in schedules:
        # RunConfig cannot tell a given warmup from its default (0.3): refuse it here, where it was given
        raise SpecError(f"{where}: warmup applies to the onecycle schedule only, and this space's schedule is "
                        f"{', '.join(map(str, schedules))}: drop warmup or use schedule onecycle")
    models = choices.get("model", (fixed.get("model", "model1"),))
    if "dropout" in ranges and "model1" in models:
        raise SpecError(f"{where}: dropout is searched but model1 has no dropout layer")
    space = Space(name=spec.name or Path(where).stem, metric=spec.metric, fixed=fixed, choices=choices,
                  ranges=ranges, lr=lr, source=where, seed_sd=spec.seed_sd)
    space = dataclasses.replace(space, start_points=tuple(
        _start_point(where, space, i, p) for i, p in enumerate(spec.start_points)))
    try:  # the corners of the space must be valid configs
        corner = {**fixed, **{k: v[0] for k, v in choices.items()}}
        corner.update({k: r.high for k, r in ranges.items() if drawn(k, corner.get("schedule"))})
        RunConfig(**corner, device="cpu")
    except (ConfigError, TypeError) as exc:
        raise SpecError(f"{where}: {exc}") from None
    return space


def _start_point(where: str, space: Space, index: int, point: dict) -> dict:
    """A start point as Optuna params (lr as lr_<optimizer>), checked against the space."""
    params = space.params_for(point)
    optimizer = params.get("optimizer", space.fixed.get("optimizer"))
    schedule = params.get("schedule", space.fixed.get("schedule"))
    ranges = [name for name in space.ranges if drawn(name, schedule)]
    for name in [*space.choices, *ranges, *([f"lr_{optimizer}"] if optimizer in space.lr else [])]:
        if name not in params:
            raise SpecError(f"{where}: start_points[{index}] has no valid value for {name}")
    extra = set(point) - set(space.choices) - set(space.ranges) - {"lr"}
    if extra:
        raise SpecError(f"{where}: start_points[{index}] sets {', '.join(sorted(map(str, extra)))}, not searched")
    for name in ranges:
        r = space.ranges[name]
        if not r.low <= float(point[name]) <= r.high:
            raise SpecError(f"{where}: start_points[{index}].{name} {point[name]} is outside {r.low:g}..{r.high:g}")
    if optimizer in space.lr and "lr" in point:
        r = space.lr[optimizer]
        if not r.low <= float(point["lr"]) <= r.high:
            raise SpecError(f"{where}: start_points[{index}].lr {point['lr']} is outside {r.low:g}..{r.high:g} "
                            f"(search.lr.{optimizer})")
    return params
