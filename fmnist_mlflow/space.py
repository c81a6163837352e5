"""The Optuna search space as data: read `experiments/search.yaml`, validate it, suggest RunConfigs.

The file fixes some run settings and searches others: categorical choices (`model`, `loss`, `optimizer`,
`schedule`, `augment`, `batch_size`, `width`, `ema`, `tta`), float ranges (`dropout`, `weight_decay`,
`label_smoothing`, `warmup`), and `lr` as a range per optimizer (named `lr_<optimizer>` in Optuna, so each
optimizer's learning rate is modelled on its own scale). `warmup` is onecycle's: a trial on another
schedule does not draw it. Problems raise `SpecError` naming the file and value, before any run or
study is created.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import (AUGMENTS, LOSSES, MAX_WIDTH, MIN_WIDTH, MODELS, OPTIMIZERS, SCHEDULES, SELECT, ConfigError,
                     RunConfig, direction)
from .grid import SpecError, brief as _brief, check_known, read_yaml


SAMPLERS = ("tpe", "random")
DEFAULT_SPACE = Path(__file__).parent / "specs" / "search.yaml"  # experiments/search.yaml, shipped in the package
FIXABLE = {"model": str, "loss": str, "optimizer": str, "batch_size": int, "seed": int, "dropout": float, "lr": float,
           "momentum": float, "weight_decay": float, "schedule": str, "label_smoothing": float, "augment": str,
           "warmup": float, "width": float, "ema": float, "tta": bool}
# Categorical parameters and their allowed values: a tuple, or a check of one value and what it says.
CHOICES = {"model": MODELS, "loss": LOSSES, "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "augment": AUGMENTS,
           "batch_size": (lambda v: _is_int(v) and v >= 1, "integers >= 1"),
           "width": (lambda v: _is_number(v) and MIN_WIDTH <= v <= MAX_WIDTH, f"numbers in {MIN_WIDTH:g}..{MAX_WIDTH:g}"),
           "ema": (lambda v: _is_number(v) and 0 <= v < 1, "decays in [0, 1) (0: off)"),
           "tta": (True, False)}
# Float parameters searched as ranges: name -> (lowest allowed, highest allowed, high bound exclusive).
RANGES = {"dropout": (0.0, 1.0, True), "weight_decay": (0.0, math.inf, False), "label_smoothing": (0.0, 1.0, True),
          "warmup": (0.0, 1.0, True)}
ONECYCLE_ONLY = ("warmup",)  # drawn only by trials on the onecycle schedule


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


def _not_allowed(name: str, value) -> Optional[str]:
    """None if `value` is one of CHOICES[name]; else what is allowed, for the error message."""
    allowed = CHOICES[name]
    if callable(allowed[0]):
        check, what = allowed
        return None if check(value) else what
    same = any(value is a or (value == a and type(value) is type(a)) for a in allowed)  # true is not 1
    return None if same else ", ".join(str(a).lower() if isinstance(a, bool) else a for a in allowed)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Space:
    name: str
    metric: str  # a key of config.SELECT
    fixed: dict  # name -> value
    choices: dict  # name -> tuple of choices (see CHOICES)
    ranges: dict  # name -> Range (see RANGES)
    lr: dict  # optimizer -> Range
    source: str
    start_points: tuple = ()  # Optuna params dicts enqueued first on a new study
    # prior seed-to-seed sd of the metric at the search's own size, for racing in confirm (see `race`); not
    # part of the digest: it says how noisy a trial is, not what the space searches
    seed_sd: Optional[float] = None

    @property
    def direction(self) -> str:
        return direction(self.metric)

    def digest(self) -> str:
        """Identifies what the space searches (not its name or file): a study holds one space."""
        parts = {"metric": self.metric, "fixed": self.fixed, "choices": self.choices,
                 "ranges": {k: dataclasses.astuple(r) for k, r in self.ranges.items()},
                 "lr": {k: dataclasses.astuple(r) for k, r in self.lr.items()}, "start_points": self.start_points}
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


def _range(where: str, name: str, spec) -> Range:
    if not isinstance(spec, dict) or set(spec) - {"low", "high", "log"} or not {"low", "high"} <= set(spec):
        raise SpecError(f"{where}: {name} must be {{low: X, high: Y[, log: true]}}, got {_brief(spec)}")
    low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
    for bound in (low, high):
        if not isinstance(bound, (int, float)) or isinstance(bound, bool) or not math.isfinite(bound):
            raise SpecError(f"{where}: {name} bounds must be finite numbers, got {_brief(bound)}")
    if low > high:
        raise SpecError(f"{where}: {name} has low {low} > high {high}")
    if log and low <= 0:
        raise SpecError(f"{where}: {name} is on a log scale, so its bounds must be > 0 (low is {low})")
    return Range(float(low), float(high), log)


def _choices(where: str, name: str, value) -> tuple:
    options = value.get("choices") if isinstance(value, dict) and set(value) == {"choices"} else None
    if not isinstance(options, list) or not options:
        raise SpecError(f"{where}: search.{name} must be {{choices: [...]}}, got {_brief(value)}")
    for option in options:
        wrong = _not_allowed(name, option)
        if wrong:
            raise SpecError(f"{where}: search.{name} has {_brief(option)}; choose from {wrong}")
    if len(set(options)) != len(options):
        raise SpecError(f"{where}: search.{name} lists a choice twice")
    return tuple(options)


def load_space(path: str | Path = DEFAULT_SPACE) -> Space:
    spec = read_yaml(path)
    where = str(path)
    check_known(where, "", spec, ("name", "metric", "fixed", "search", "start_points", "seed_sd"))
    metric = spec.get("metric", "val_accuracy")
    if metric not in SELECT:
        raise SpecError(f"{where}: metric {_brief(metric)} is not one of {', '.join(SELECT)}")
    fixed, search = spec.get("fixed") or {}, spec.get("search") or {}
    if not isinstance(fixed, dict) or not isinstance(search, dict):
        raise SpecError(f"{where}: fixed and search must be mappings")
    for name, value in fixed.items():
        if name not in FIXABLE:
            raise SpecError(f"{where}: unknown fixed parameter {_brief(name)}; allowed: {', '.join(FIXABLE)}")
        wrong = _not_allowed(name, value) if name in CHOICES else None
        if wrong:
            raise SpecError(f"{where}: unknown {name} {_brief(value)}; choose from {wrong}")
    choices, ranges, lr = {}, {}, {}
    for name, value in search.items():
        if name in CHOICES:
            choices[name] = _choices(where, name, value)
        elif name in RANGES:
            r = _range(where, f"search.{name}", value)
            lowest, highest, open_high = RANGES[name]
            if r.low < lowest or r.high > highest or (open_high and r.high >= highest):
                bounds = f"[{lowest:g}, {highest:g}{')' if open_high else ']'}"
                raise SpecError(f"{where}: search.{name} must lie in {bounds}, got {r.low:g}..{r.high:g}")
            ranges[name] = r
        elif name == "lr":
            if not isinstance(value, dict) or not value:
                raise SpecError(f"{where}: search.lr must map optimizers to ranges, got {_brief(value)}")
            for optimizer, r in value.items():
                if optimizer not in OPTIMIZERS:
                    raise SpecError(f"{where}: unknown optimizer {_brief(optimizer)} in search.lr")
                lr[optimizer] = _range(where, f"search.lr.{optimizer}", r)
                if lr[optimizer].low <= 0:
                    raise SpecError(f"{where}: search.lr.{optimizer} must be > 0 (low is {lr[optimizer].low:g})")
        else:
            allowed = ", ".join([*CHOICES, *RANGES, "lr"])
            raise SpecError(f"{where}: unknown search parameter {_brief(name)}; allowed: {allowed}")
        if name in fixed:
            raise SpecError(f"{where}: {name} is both fixed and searched")
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
    seed_sd = spec.get("seed_sd")
    if seed_sd is not None and not (_is_number(seed_sd) and 0 < seed_sd < 1):
        raise SpecError(f"{where}: seed_sd must be a number above 0 and below 1 (a spread of {metric}), "
                        f"got {_brief(seed_sd)}")
    space = Space(name=str(spec.get("name", Path(where).stem)), metric=metric, fixed=fixed, choices=choices,
                  ranges=ranges, lr=lr, source=where, seed_sd=seed_sd)
    points = spec.get("start_points") or []
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise SpecError(f"{where}: start_points must be a list of mappings, got {_brief(points)}")
    space = dataclasses.replace(space, start_points=tuple(_start_point(where, space, i, p) for i, p in enumerate(points)))
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
