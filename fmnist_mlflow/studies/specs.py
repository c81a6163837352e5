"""The experiment files' common layer: read a short YAML mapping safely (`read_yaml`), check it against a
pydantic schema (`validated`: unknown keys refused, types and ranges checked, no coercion) and say what is
wrong in one line naming the file, the key path and the value (`SpecError`); the schema pieces both files
share (the names of models, losses and optimizers, a range, a list of choices); training seeds as a file or
the command line gives them (`parse_seeds`). The grid (`grid`) and the search space (`space`) are built on it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Generic, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, model_validator

from ..errors import FmnistError
from ..schema import FILTER_UNSAFE
from ..training.config import LOSSES, MODELS, OPTIMIZERS

# experiments/grid.yaml and experiments/search.yaml, shipped inside the package (fmnist_mlflow/specs/ links
# to experiments/ in the repository)
SPECS = Path(__file__).parents[1] / "specs"


class SpecError(FmnistError, ValueError):
    """An experiment file (grid or search space) is invalid; the message names the file and value."""


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


MAX_SPEC_BYTES = 1_000_000  # a grid or space file is a page of YAML; refuse megabytes before parsing them


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


def distinct(values: list) -> list:
    if len({repr(v) for v in values}) != len(values):
        raise ValueError("lists an entry twice")
    return values


def finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Model = Literal[MODELS]
Loss = Literal[LOSSES]
Optimizer = Literal[OPTIMIZERS]
Finite = Annotated[float, AfterValidator(finite)]
# A name that becomes a run name and is matched in MLflow filter strings.
Name = Annotated[str, AfterValidator(lambda v: v if v.strip() and not set(v) & set(FILTER_UNSAFE) else
                                     _fail("may not be empty or contain quotes, backticks or backslashes (it names "
                                           "the parent run and is matched in MLflow filter strings)"))]


def _fail(message: str):
    raise ValueError(message)


class Strict(BaseModel):
    """A part of an experiment file: no unknown keys, no coercion ("64" is not 64, true is not 1)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Range(Strict):
    """A float range searched by Optuna: {low: X, high: Y[, log: true]}."""

    low: Finite
    high: Finite
    log: bool = False

    @model_validator(mode="after")
    def ordered(self) -> "Range":
        if self.low > self.high:
            raise ValueError(f"low {self.low:g} > high {self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError(f"on a log scale the bounds must be > 0 (low is {self.low:g})")
        return self


T = TypeVar("T")


class Choices(Strict, Generic[T]):
    """A categorical parameter searched by Optuna: {choices: [...]}, each choice once."""

    choices: Annotated[list[T], AfterValidator(distinct)]

    @model_validator(mode="after")
    def some(self) -> "Choices":
        if not self.choices:
            raise ValueError("give at least one choice")
        return self


FORMS = {"Choices": "{choices: [...]}", "Range": "{low: X, high: Y[, log: true]}"}  # parts' forms, for errors


def validated(schema: type, spec: dict, where: str):
    """`spec` as an instance of the pydantic `schema`, or SpecError naming the file, the first problem's key
    path and value, and how many more there are."""
    try:
        return schema.model_validate(spec)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        path = ".".join(str(p) for p in first["loc"] if p != "[key]" and not str(p).startswith(("function-", "tagged-")))
        what = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            what = f"unknown key; allowed: {', '.join(_fields(schema, first['loc'][:-1]))}"
        elif first["type"] == "model_type":  # a part given as something else than a mapping
            what = f"must be {FORMS.get(first['ctx']['class_name'].split('[')[0], 'a mapping')}"
        if first["type"] != "missing" and path and ", got " not in what and not isinstance(first["input"], dict):
            what += f", got {brief(first['input'])}"
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise SpecError(f"{where}: {path or 'the file'}: {what}{more}") from None


def _fields(schema: type, loc: tuple) -> list:
    """The keys allowed at `loc` of `schema` (for an unknown key's message)."""
    for part in loc:
        field = getattr(schema, "model_fields", {}).get(part)
        annotation = getattr(field, "annotation", None)
        args = [a for a in getattr(annotation, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        schema = args[0] if args else annotation
    return list(getattr(schema, "model_fields", {}))
