"""Experiment files (the grid and the search space), every bad one refused: one table per file kind, each
row a change to a good file and the words of the one-line error (naming the file and the key path). The
library answers each row; the commands turn the same error into a usage error before any run or study."""

import pytest
import yaml
from click.testing import CliRunner

import mlflow
from fmnist_mlflow.cli import main as cli
from fmnist_mlflow.studies.grid import load_grid
from fmnist_mlflow.studies.space import load_space
from fmnist_mlflow.studies.specs import SpecError

GRID = {"name": "small", "models": ["model1", "model2"], "losses": ["ce", "bce"], "optimizers": ["adam", "sgd"],
        "lr": {"adam": 0.001, "sgd": 0.05}, "dropout": {"model2": 0.5}, "batch_size": 64, "epochs": 1, "seeds": [0, 1]}
SPACE = {
    "name": "tiny", "metric": "val_accuracy",
    "fixed": {"model": "model3", "loss": "ce", "batch_size": 64, "seed": 0},
    "search": {"optimizer": {"choices": ["adam"]}, "dropout": {"low": 0.0, "high": 0.6},
               "lr": {"adam": {"low": 1e-4, "high": 1e-2, "log": True}}},
}  # fmt: skip


def write(tmp_path, spec, name) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def alias_bomb(tmp_path) -> str:
    """A YAML file under 500 bytes whose aliases expand to 9**8 entries."""
    lines = ["name: bomb", "a: &a [x, x, x, x, x, x, x, x, x]"]
    for i, name in enumerate("bcdefgh"):
        prev = "abcdefgh"[i]
        lines.append(f"{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines + ["models: *h"]) + "\n")
    return str(path)


def raw(content: bytes):
    def make(tmp_path) -> str:
        path = tmp_path / "raw.yaml"
        path.write_bytes(content)
        return str(path)

    return make


@pytest.mark.parametrize("change, message", [
    ({"models": ["model1", "model7"]}, "models.1: Input should be 'model1', 'model2' or 'model3', got 'model7'"),
    ({"losses": ["ce", "hinge"]}, "losses.1: Input should be 'ce' or 'bce', got 'hinge'"),
    ({"optimizers": ["adamw"]}, "optimizers.0: Input should be"),
    ({"models": ["model1", "model1"]}, "models: lists an entry twice"),
    ({"models": []}, "models is empty"),
    ({"epochs": "ten"}, "epochs: Input should be a valid integer, got 'ten'"),
    ({"batch_size": True}, "batch_size: Input should be a valid integer, got True"),
    ({"lr": {"adam": "fast", "sgd": 0.05}}, "lr.adam: Input should be a valid number, got 'fast'"),
    ({"lr": {"sgd": 0.1}}, "lr has no value for optimizer 'adam'"),
    ({"lr": {"adam": -1.0, "sgd": 0.05}}, "lr must be > 0"),
    ({"colour": "blue"}, "colour: unknown key; allowed: name, models, losses"),
    ({"dropout": {"modle3": 0.3}}, "dropout.modle3: Input should be 'model1', 'model2' or 'model3'"),
    ({"lr": {"adam": 0.001, "sgd": 0.05, "adamw": 0.1}}, "lr.adamw: Input should be"),
    ({"momentum": {"sgdd": 0.9}}, "momentum.sgdd: Input should be"),
    ({"name": "it's"}, "name: may not be empty or contain quotes"),
    ({"seeds": [0, 0]}, "seeds: a seed is listed twice"),
    ({"seeds": [0, "one"]}, "each seed must be an integer"),
    ({"seeds": []}, "seeds: no seed given"),
    ({"seed": 1}, "give seed or seeds, not both"),
    ({"seed_sd": 2}, "seed_sd: Input should be less than 1, got 2"),
    ({"dropout": {"model1": 0.5}}, "model1 has no dropout layer"),
    ({**{f"extra{i}": i for i in range(50)}}, "(and 49 more problem(s))"),
    (raw(b"name: x\nmodels: [model1\n"), "broken YAML"),
    (raw(bytes(range(256)) * 4), "not a text (UTF-8) file: byte 128 is 0x80"),
    (raw(b"- a\n- b\n"), "expected a mapping of keys, got list"),
    (raw(b"x" * 1_000_001), "larger than 1000 kB"),
    (alias_bomb, "models.0: Input should be 'model1', 'model2' or 'model3', got a list of 9 item(s)"),
    ({"losses": None}, "losses: Input should be a valid list"),
])  # fmt: skip
def test_a_bad_grid_file_is_one_line_naming_the_file_and_key(tmp_path, change, message):
    path = change(tmp_path) if callable(change) else write(tmp_path, {**GRID, **change}, "grid.yaml")
    with pytest.raises(SpecError) as err:
        load_grid(path)
    assert message in str(err.value) and str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
    assert len(str(err.value)) < 400 + len(path)


def search(**change):
    return {"search": {**SPACE["search"], **change}}


@pytest.mark.parametrize("change, message", [
    (search(momentum={"low": 0, "high": 1}), "search.momentum: unknown key; allowed: model, loss, optimizer"),
    (search(dropout={"low": 0.5, "high": 0.1}), "search.dropout: low 0.5 > high 0.1"),
    (search(dropout=0.3), "search.dropout: must be {low: X, high: Y[, log: true]}, got 0.3"),
    (search(dropout={"low": 0.1, "high": 1.0}), "search.dropout: must lie in [0, 1), got 0.1..1"),
    (search(lr={"adam": {"low": 0.0, "high": 0.1}}), "search.lr.adam: must be > 0 (low is 0)"),
    (search(lr={"adam": {"low": -1e-3, "high": 0.1, "log": True}}), "on a log scale the bounds must be > 0"),
    (search(lr={"adm": {"low": 0.1, "high": 0.2}}), "search.lr.adm: Input should be 'adam', 'sgd' or 'rmsprop'"),
    (search(optimizer={"choices": ["adam", "lion"]}), "search.optimizer.choices.1: Input should be"),
    (search(optimizer={"choices": []}), "search.optimizer: give at least one choice"),
    (search(weight_decay={"low": -1.0, "high": 0.1}), "search.weight_decay: must lie in [0, inf], got -1..0.1"),
    (search(label_smoothing={"low": 0.0, "high": 1.0}), "search.label_smoothing: must lie in [0, 1)"),
    (search(schedule={"choices": ["constant", "step"]}), "search.schedule.choices.1: Input should be 'constant', "
                                                         "'cosine' or 'onecycle', got 'step'"),
    (search(augment={"choices": ["rotate"]}), "search.augment.choices.0: Input should be"),
    (search(batch_size={"choices": [64, 0]}), "search.batch_size.choices.1: Input should be greater than or equal "
                                              "to 1, got 0"),
    (search(batch_size={"choices": [64, 64]}), "search.batch_size.choices: lists an entry twice"),
    (search(batch_size=[64, 128]), "search.batch_size: must be {choices: [...]}"),
    (search(width={"choices": [1, 8]}), "search.width.choices.1: Input should be less than or equal to 4, got 8"),
    (search(width={"choices": ["wide"]}), "search.width.choices.0: Input should be a valid number, got 'wide'"),
    (search(ema={"choices": [0, 1.0]}), "search.ema.choices.1: Input should be less than 1, got 1.0"),
    (search(tta={"choices": [True, "yes"]}), "search.tta.choices.1: Input should be a valid boolean, got 'yes'"),
    (search(tta={"choices": [1]}), "search.tta.choices.0: Input should be a valid boolean, got 1"),
    (search(warmup={"low": 0.1, "high": 0.4}), "warmup applies to the onecycle schedule only, and this space's "
                                               "schedule is constant"),
    ({"metric": "train_loss"}, "metric: Input should be 'val_accuracy' or 'val_nll', got 'train_loss'"),
    ({"fixed": {**SPACE["fixed"], "model": "model1"}}, "dropout is searched but model1 has no dropout layer"),
    ({"fixed": {**SPACE["fixed"], "width": 5}}, "fixed.width: Input should be less than or equal to 4, got 5"),
    ({"fixed": {**SPACE["fixed"], "warmup": 0.3}}, "warmup applies to the onecycle schedule only"),
    ({"fixed": {**SPACE["fixed"], "loss": "bce"}, **search(label_smoothing={"low": 0.0, "high": 0.1})},
     "label_smoothing applies to the ce loss only"),
    ({"fixed": {**SPACE["fixed"], "model": "model2", "width": 2}}, "width applies to model3 only"),
    ({"fixed": {**SPACE["fixed"], "optimizer": "adam"}}, "optimizer is both fixed and searched"),
    ({"fixed": {**SPACE["fixed"], "colour": 1}}, "fixed.colour: unknown key; allowed: model, loss"),
    ({"search": {}}, "search is empty; nothing to tune"),
    ({"seed_sd": 0}, "seed_sd: Input should be greater than 0, got 0"),
    ({"start_points": [{"optimizer": "adam", "lr": 3.0, "dropout": 0.1}]},
     "start_points[0].lr 3.0 is outside 0.0001..0.01"),
    ({"start_points": [{"optimizer": "adam", "lr": 0.001, "dropout": 0.1, "width": 2}]},
     "start_points[0] sets width, not searched"),
    ({"start_points": [{"optimizer": "adam", "lr": 0.001}]}, "start_points[0] has no valid value for dropout"),
    ({"start_points": "fast"}, "start_points: Input should be a valid list"),
])  # fmt: skip
def test_a_bad_space_file_is_one_line_naming_the_file_and_key(tmp_path, change, message):
    path = write(tmp_path, {**SPACE, **change}, "space.yaml")
    with pytest.raises(SpecError) as err:
        load_space(path)
    assert message in str(err.value) and str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_the_shipped_files_are_valid_and_keep_their_digest():
    """The default grid (the report's 18 configs x 3 seeds) and space; the space's digest names the studies
    already made from it (a new digest would start a new study instead of resuming)."""
    assert len(load_grid().configs(device="cpu")) == 54
    space = load_space()
    assert space.digest() == "95a22e9f167f119a" and len(space.start_points) == 2


@pytest.mark.parametrize("command, option, spec", [("sweep", "--grid", {**GRID, "models": ["model7"]}),
                                                   ("search", "--space", {**SPACE, "metric": "loss"})])
def test_the_commands_refuse_a_bad_file_as_a_usage_error_before_any_run_or_study(store, tmp_path, command, option,
                                                                                  spec):
    path = write(tmp_path, spec, "bad.yaml")
    result = CliRunner().invoke(cli.main, [command, option, path, "--storage", f"sqlite:///{tmp_path / 'o.db'}"])
    assert result.exit_code == 2 and f"{path}: " in result.output and "Traceback" not in result.output
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
    assert not (tmp_path / "o.db").exists()
