"""The Optuna search space as data: read `experiments/search.yaml`, validate it, suggest RunConfigs.

The file fixes some of model/loss/optimizer/batch_size/seed and searches others: `optimizer` (and
`model`, `loss`) as choices, `dropout` as a float range, `lr` as a range per optimizer (named
`lr_<optimizer>` in Optuna, so each optimizer's learning rate is modelled on its own scale). Problems
raise `SpecError` naming the file and value, before any run or study is created.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .config import LOSSES, MODELS, OPTIMIZERS, ConfigError, RunConfig
from .grid import SpecError, read_yaml
from .summary import SELECT

PRUNERS = ("median", "hyperband", "none")
SAMPLERS = ("tpe", "random")
DEFAULT_SPACE = Path(__file__).resolve().parent.parent / "experiments" / "search.yaml"
FIXABLE = {"model": str, "loss": str, "optimizer": str, "batch_size": int, "seed": int, "dropout": float, "lr": float}
CHOICES = {"model": MODELS, "loss": LOSSES, "optimizer": OPTIMIZERS}


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Space:
    name: str
    metric: str  # a key of summary.SELECT
    fixed: dict  # name -> value
    choices: dict  # name -> tuple of choices (model, loss, optimizer)
    dropout: Range | None
    lr: dict  # optimizer -> Range
    source: str

    @property
    def direction(self) -> str:
        return "maximize" if SELECT[self.metric] else "minimize"

    def suggest(self, trial, *, epochs: int, subset: int = 0, device: str = "auto", precision: str = "fp32") -> RunConfig:
        """The trial's RunConfig: fixed values, plus what the trial samples."""
        values = dict(self.fixed)
        for name, options in self.choices.items():
            values[name] = trial.suggest_categorical(name, list(options))
        if self.dropout is not None:
            values["dropout"] = trial.suggest_float("dropout", self.dropout.low, self.dropout.high)
        optimizer = values.get("optimizer", "adam")
        if optimizer in self.lr:
            r = self.lr[optimizer]
            values["lr"] = trial.suggest_float(f"lr_{optimizer}", r.low, r.high, log=r.log)
        return RunConfig(**values, epochs=epochs, subset=subset, device=device, precision=precision)

    def params_for(self, config: dict) -> dict:
        """Optuna params that reproduce a config (e.g. the grid's best), keeping what this space holds."""
        params = {}
        for name, options in self.choices.items():
            if config.get(name) in options:
                params[name] = config[name]
        optimizer = params.get("optimizer", self.fixed.get("optimizer"))
        if self.dropout is not None and "dropout" in config:
            params["dropout"] = min(max(float(config["dropout"]), self.dropout.low), self.dropout.high)
        if optimizer in self.lr and "lr" in config:
            r = self.lr[optimizer]
            params[f"lr_{optimizer}"] = min(max(float(config["lr"]), r.low), r.high)
        return params


def _range(where: str, name: str, spec) -> Range:
    if not isinstance(spec, dict) or set(spec) - {"low", "high", "log"} or not {"low", "high"} <= set(spec):
        raise SpecError(f"{where}: {name} must be {{low: X, high: Y[, log: true]}}, got {spec!r}")
    low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
    for bound in (low, high):
        if not isinstance(bound, (int, float)) or isinstance(bound, bool) or not math.isfinite(bound):
            raise SpecError(f"{where}: {name} bounds must be numbers, got {bound!r}")
    if low > high:
        raise SpecError(f"{where}: {name} has low {low} > high {high}")
    if log and low <= 0:
        raise SpecError(f"{where}: {name} is on a log scale, so its bounds must be > 0 (low is {low})")
    return Range(float(low), float(high), log)


def load_space(path: str | Path = DEFAULT_SPACE) -> Space:
    spec = read_yaml(path)
    where = str(path)
    unknown = set(spec) - {"name", "metric", "fixed", "search"}
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: name, metric, fixed, search")
    metric = spec.get("metric", "val_accuracy")
    if metric not in SELECT:
        raise SpecError(f"{where}: metric {metric!r} is not one of {', '.join(SELECT)}")
    fixed, search = spec.get("fixed") or {}, spec.get("search") or {}
    if not isinstance(fixed, dict) or not isinstance(search, dict):
        raise SpecError(f"{where}: fixed and search must be mappings")
    for name, value in fixed.items():
        if name not in FIXABLE:
            raise SpecError(f"{where}: unknown fixed parameter {name!r}; allowed: {', '.join(FIXABLE)}")
        if name in CHOICES and value not in CHOICES[name]:
            raise SpecError(f"{where}: unknown {name} {value!r}; choose from {', '.join(CHOICES[name])}")
    choices, dropout, lr = {}, None, {}
    for name, value in search.items():
        if name in CHOICES:
            options = value.get("choices") if isinstance(value, dict) else None
            if not options or any(o not in CHOICES[name] for o in options):
                raise SpecError(f"{where}: search.{name} must be {{choices: [...]}} from {', '.join(CHOICES[name])}, "
                                f"got {value!r}")
            choices[name] = tuple(options)
        elif name == "dropout":
            dropout = _range(where, "search.dropout", value)
            if dropout.high >= 1 or dropout.low < 0:
                raise SpecError(f"{where}: search.dropout must lie in [0, 1), got {dropout.low}..{dropout.high}")
        elif name == "lr":
            if not isinstance(value, dict) or not value:
                raise SpecError(f"{where}: search.lr must map optimizers to ranges, got {value!r}")
            for optimizer, r in value.items():
                if optimizer not in OPTIMIZERS:
                    raise SpecError(f"{where}: unknown optimizer {optimizer!r} in search.lr")
                lr[optimizer] = _range(where, f"search.lr.{optimizer}", r)
        else:
            raise SpecError(f"{where}: unknown search parameter {name!r}; allowed: model, loss, optimizer, dropout, lr")
        if name in fixed:
            raise SpecError(f"{where}: {name} is both fixed and searched")
    if not choices and dropout is None and not lr:
        raise SpecError(f"{where}: search is empty; nothing to tune")
    models = choices.get("model", (fixed.get("model", "model1"),))
    if dropout is not None and "model1" in models:
        raise SpecError(f"{where}: dropout is searched but model1 has no dropout layer")
    space = Space(name=str(spec.get("name", Path(where).stem)), metric=metric, fixed=fixed, choices=choices,
                  dropout=dropout, lr=lr, source=where)
    try:  # the corners of the space must be valid configs
        RunConfig(**{**fixed, **{k: v[0] for k, v in choices.items()}}, device="cpu")
    except (ConfigError, TypeError) as exc:
        raise SpecError(f"{where}: {exc}") from None
    return space
