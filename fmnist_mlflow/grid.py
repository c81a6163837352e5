"""The fixed grid as data: read `experiments/grid.yaml`, validate it, expand it into RunConfigs.

Every problem (broken YAML, a missing or unknown key, a wrong type, an unknown model/loss/optimizer, a
bad value) raises `SpecError` naming the file and the value, before any run is created.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from .config import LOSSES, MODELS, OPTIMIZERS, ConfigError, RunConfig
from .errors import FmnistError

# experiments/grid.yaml, shipped inside the package (specs/ links to experiments/ in the repository)
DEFAULT_GRID = Path(__file__).parent / "specs" / "grid.yaml"


class SpecError(FmnistError, ValueError):
    """An experiment file (grid or search space) is invalid; the message names the file and value."""


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
    seed_sd: Optional[float] = None  # prior seed-to-seed sd of the selection metric, for racing (see `race`)

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


def brief(value, limit: int = 80) -> str:
    """A value as an error message shows it: short, whatever its size (a YAML alias bomb expands hugely)."""
    text = f"a {type(value).__name__} of {len(value)} item(s)" if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_seeds(values) -> tuple:
    """Training seeds from a list (grid file) or "0,1,2" (command line): distinct ints in [0, 2**63)."""
    if isinstance(values, str):
        parts = values.split(",")
        if not values.strip():
            raise ValueError("no seed given (leave --seeds out, or give `grid`, for the grid file's seeds)")
        if any(not v.strip() for v in parts):
            raise ValueError(f"an empty seed in {values!r}: expected comma-separated integers, e.g. 0,1,2")
        try:
            values = [int(v) for v in parts]
        except ValueError:
            raise ValueError(f"expected comma-separated integers, got {values!r}") from None
    if not values:
        raise ValueError("no seed given")
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
            raise ValueError(f"each seed must be an integer in [0, 2**63), got {brief(value)}")
    if len(set(values)) != len(values):
        raise ValueError(f"a seed is listed twice: {list(values)}")
    return tuple(values)


# key -> (type, required). Checked by hand, not with pydantic (installed with MLflow): a strict pydantic model
# (extra="forbid", Literal choices, a model validator for lr) says the same in about as many lines, but
# its messages drop the offending value ("models.1: Input should be 'model1', 'model2' or 'model3'" for
# model7) and would need a translation layer to keep today's; tried on the bad-file tests' cases.
_KEYS = {
    "name": (str, True), "models": (list, True), "losses": (list, True), "optimizers": (list, True),
    "lr": (dict, True), "momentum": (dict, False), "dropout": (dict, False),
    "batch_size": (int, True), "epochs": (int, True), "seed": (int, False), "seeds": (list, False),
    "seed_sd": (float, False),
}  # fmt: skip


MAX_SPEC_BYTES = 1_000_000  # a grid or space file is a page of YAML; refuse megabytes before parsing them
MAX_NAMED = 5  # unknown keys named in an error; the rest are counted


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from `path`, or SpecError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"{path}: cannot read ({exc.strerror})") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: larger than {MAX_SPEC_BYTES // 1000} kB; a grid or search-space file is a short YAML file")
    try:
        spec = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not a text (UTF-8) file: byte {exc.start} is 0x{raw[exc.start]:02x}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: broken YAML: {brief(str(exc), 300)}") from None
    if not isinstance(spec, dict):
        raise SpecError(f"{path}: expected a mapping of keys, got {type(spec).__name__}")
    return spec


def check_known(where: str, prefix: str, mapping: dict, allowed) -> None:
    """SpecError naming (at most MAX_NAMED of) the keys of `mapping` that are not in `allowed`."""
    unknown = sorted(map(str, set(mapping) - set(allowed)))
    if unknown:
        named = ", ".join(prefix + k[:40] for k in unknown[:MAX_NAMED])
        more = f" and {len(unknown) - MAX_NAMED:,} more" if len(unknown) > MAX_NAMED else ""
        raise SpecError(f"{where}: unknown key(s) {named}{more}; allowed: {', '.join(prefix + a for a in allowed)}")


def load_grid(path: str | Path = DEFAULT_GRID) -> Grid:
    spec = read_yaml(path)
    where = str(path)
    check_known(where, "", spec, _KEYS)
    for key, (kind, required) in _KEYS.items():
        if key not in spec:
            if required:
                raise SpecError(f"{where}: missing key {key!r}")
            continue
        value = spec[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = spec[key] = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise SpecError(f"{where}: {key} must be a {kind.__name__}, got {brief(value)}")
    if "seed" in spec and "seeds" in spec:
        raise SpecError(f"{where}: give seed or seeds, not both")
    seeds = spec.get("seeds", [spec.get("seed", 0)])
    try:
        seeds = parse_seeds(seeds)
    except ValueError as exc:
        raise SpecError(f"{where}: seeds: {exc}") from None
    for key, allowed in (("models", MODELS), ("losses", LOSSES), ("optimizers", OPTIMIZERS)):
        if not spec[key]:
            raise SpecError(f"{where}: {key} is empty")
        if len(set(map(str, spec[key]))) != len(spec[key]):
            raise SpecError(f"{where}: {key} lists an entry twice")
        for value in spec[key]:
            if value not in allowed:
                raise SpecError(f"{where}: unknown {key[:-1] if key != 'losses' else 'loss'} {brief(value)} in {key}; "
                                f"choose from {', '.join(allowed)}")
    if not spec["name"].strip() or any(ch in spec["name"] for ch in "'\"`\\"):
        raise SpecError(f"{where}: name {brief(spec['name'])} may not be empty or contain quotes, backticks or "
                        "backslashes (it names the parent run and is matched in MLflow filter strings)")
    for key, names, allowed in (("lr", spec["optimizers"], OPTIMIZERS), ("momentum", (), OPTIMIZERS),
                                ("dropout", (), MODELS)):
        table = spec.get(key, {})
        # a typo (`modle3`) would otherwise silently leave that model or optimizer at its default
        check_known(where, f"{key}.", table, allowed)
        for name, value in table.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise SpecError(f"{where}: {key}.{name} must be a number, got {brief(value)}")
        for name in names:
            if name not in table:
                raise SpecError(f"{where}: lr has no value for optimizer {name!r}")
    grid = Grid(
        name=spec["name"], models=tuple(spec["models"]), losses=tuple(spec["losses"]),
        optimizers=tuple(spec["optimizers"]), lr=dict(spec["lr"]), momentum=dict(spec.get("momentum", {})),
        dropout=dict(spec.get("dropout", {})), batch_size=spec["batch_size"], epochs=spec["epochs"],
        seeds=seeds, source=where, seed_sd=spec.get("seed_sd"),
    )  # fmt: skip
    if grid.seed_sd is not None and not 0 < grid.seed_sd < 1:
        raise SpecError(f"{where}: seed_sd must be above 0 and below 1 (a spread of the selection metric), "
                        f"got {brief(grid.seed_sd)}")
    try:
        grid.configs(device="cpu")  # every combination must be a valid RunConfig
    except ConfigError as exc:
        raise SpecError(f"{where}: {exc}") from None
    return grid
