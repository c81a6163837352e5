"""Bad values on the command line: every one a usage error (exit 2) in one short line naming what is wrong,
before any run, study or evaluation is made and before the data is loaded. One table for every command;
bad experiment files have theirs in test_specs.py, hardware the machine lacks in test_speed.py."""

import mlflow
import pytest
from click.testing import CliRunner

from fmnist_mlflow.cli import main as cli

TINY = ["--subset", "300", "--epochs", "1", "--device", "cpu"]


@pytest.mark.parametrize("args, message", [
    # train: one RunConfig
    (["train", "--model", "model9"], "'model9' is not one of 'model1', 'model2', 'model3'"),
    (["train", "--loss", "mse"], "--loss"),
    (["train", "--optimizer", "lbfgs"], "--optimizer"),
    (["train", "--lr", "0"], "--lr"),
    (["train", "--lr", "-1"], "--lr"),
    (["train", "--lr", "inf"], "lr must be a finite number"),
    (["train", "--dropout", "1"], "--dropout"),
    (["train", "--dropout", "-0.1"], "--dropout"),
    (["train", "--model", "model1", "--dropout", "0.3"], "model1 has no dropout layer"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--epochs", str(10**20)], "--epochs"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--batch-size", str(10**12)], "--batch-size"),
    (["train", "--device", "tpu"], "--device"),
    (["train", "--precision", "fp8"], "--precision"),
    (["train", "--threads", "1000"], "--threads"),
    (["train", "--subset", "100000"], "subset must be 0 (all) or 5..50,000"),
    (["train", "--seed", str(2**63)], "seed must be in [0, 2**63)"),
    (["train", "--experiment", ""], "experiment name"),
    # sweep
    (["sweep", "--seeds", ""], "no seed given"),
    (["sweep", "--seeds", "0,,1"], "an empty seed in '0,,1'"),
    (["sweep", "--seeds", "0,0"], "a seed is listed twice"),
    (["sweep", "--select", "train_loss"], "'train_loss' is not one of 'val_accuracy', 'val_nll'"),
    (["sweep", "--epochs", str(10**20)], "--epochs"),
    (["sweep", "--jobs", "0"], "--jobs"),
    (["sweep", "--experiment", "a'b"], "experiment name"),
    (["sweep", "--storage", "not-a-url"], "is not a storage URL"),
    (["sweep", "--storage", "sqlite:///"], "names no database file: give sqlite:///FILE"),
    (["sweep", "--race", ""], "'--race': give true or false"),
    (["sweep", "--race", "maybe"], "'--race': 'maybe' is not a valid boolean"),
    # search
    (["search", "--trials", "0"], "--trials 0 runs nothing"),
    (["search", "--subset", "3", "--trials", "1"], "subset must be 0 (all) or 5..50,000"),
    (["search", "--study", "it's", "--trials", "1"], "a study name may not"),
    (["search", "--timeout", "nan", "--trials", "1"], "finite"),
    (["search", "--pruner", "best"], "--pruner"),
    (["search", "--confirm", "2", "--seeds", "1,x"], "--seeds"),
    (["search", "--storage", "journal:"], "names no file: give journal:FILE"),
    (["search", "--storage", "journal:/nonexistent/dir/log"], "journal folder /nonexistent/dir does not exist"),
    (["search", "--storage", "mysql://me:secret@127.0.0.1/optuna"], "the database driver 'MySQLdb' is not installed"),
    (["search", "--storage", "postgresql+nodriver://me@127.0.0.1/optuna"], "postgresql.nodriver"),
    (["search", "--storage", "postgresql://user:secret@host:notaport/db"], "user:***@host"),
    # register and predict
    (["register", "--name", "a/b"], "registered model name"),
    (["register", "--alias", "has space"], "an alias is"),
    (["register", "--alias", "v3"], "an alias is"),
    (["register", "--select", "train_loss"], "--select"),
    (["predict", "--top-k", "11", "x.npy"], "--top-k"),
    (["predict"], "Missing argument 'INPUTS...'"),
])  # fmt: skip
def test_a_bad_value_is_a_usage_error_before_any_work(store, tmp_path, args, message):
    storage = [] if "--storage" in args or args[0] not in ("sweep", "search") else \
        ["--storage", f"sqlite:///{tmp_path / 'o.db'}"]
    tiny = TINY if args[0] in ("train", "sweep", "search") and "--subset" not in args else []
    result = CliRunner().invoke(cli.main, [args[0], *tiny, *args[1:], *storage])  # the last of an option counts
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and "secret" not in result.output and len(result.output) < 1500
    assert "selected" not in result.output  # register chose nothing
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
    assert not (tmp_path / "o.db").exists()
