"""What a new user and a fault injection tripped on: NaN champions, alias comparisons across --select,
incomparable runs, repeated search suggestions, bad input caught late, and data dirs that fall back silently."""

import mlflow
import optuna
import pytest
from click.testing import CliRunner

from fmnist_mlflow import schema
from fmnist_mlflow.cli import main as cli
from fmnist_mlflow.training import data
from fmnist_mlflow.studies import search
from fmnist_mlflow.tracking import experiment as experiments

TRAIN = ["train", "--device", "cpu", "--epochs", "1"]


def invoke(*args):
    return CliRunner().invoke(cli.main, list(args), catch_exceptions=False)


def all_runs():
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def champion():
    return mlflow.MlflowClient().get_model_version_by_alias("fmnist-cnn", "champion")


def test_a_run_that_ends_nan_fails_and_is_never_selected(store):
    good = invoke(*TRAIN, "--subset", "2000")
    assert good.exit_code == 0, good.output
    # the reproduction from the report: a blow-up on the last step used to end FINISHED with NaN val_nll
    blown = CliRunner().invoke(cli.main, [*TRAIN, "--optimizer", "sgd", "--lr", "1e30", "--batch-size", "50000",
                                          "--subset", "2000", "--seed", "1"])
    assert blown.exit_code == 1 and "weights are not finite" in blown.output, blown.output
    statuses = sorted(r.info.status for r in all_runs())
    assert statuses == ["FAILED", "FINISHED"]
    failed = next(r for r in all_runs() if r.info.status == "FAILED")
    assert "DivergedError" in failed.data.tags[schema.TAG_FAILURE]
    result = invoke("register", "--select", "val_nll")
    assert result.exit_code == 0, result.output
    finished = next(r for r in all_runs() if r.info.status == "FINISHED" and r.data.tags[schema.TAG_KIND] == "train")
    assert champion().tags["source_run_id"] == finished.info.run_id


def test_changing_select_compares_on_the_metric_both_runs_have(store):
    assert invoke(*TRAIN, "--subset", "600", "--epochs", "2").exit_code == 0
    assert invoke("register").exit_code == 0  # registered by val_accuracy: its version has no val_nll tag
    first = champion()
    assert invoke(*TRAIN, "--subset", "600", "--epochs", "2", "--optimizer", "sgd", "--lr", "1e-6").exit_code == 0
    worse = next(r for r in all_runs() if r.data.params.get("optimizer") == "sgd")
    result = invoke("register", "--run-id", worse.info.run_id, "--select", "val_nll")
    assert result.exit_code == 0, result.output
    held = mlflow.get_run(first.tags["source_run_id"]).data.metrics["val_nll"]
    # the refusal names the holder's real val_nll (read from its run), not NaN
    assert "not moved" in result.output and f"{held:.4f}" in result.output and "nan" not in result.output
    assert champion().version == first.version


def test_register_chooses_among_comparable_runs_only(store):
    # a 1-epoch run on a tiny subset can score higher on its tiny validation slice by luck; it is not comparable
    assert invoke(*TRAIN, "--subset", "100").exit_code == 0
    assert invoke(*TRAIN, "--subset", "600").exit_code == 0
    result = invoke("register")
    assert result.exit_code == 0, result.output
    assert "1 run(s) trained on fewer images or epochs were left out" in result.output
    source = mlflow.get_run(champion().tags["source_run_id"])
    assert source.data.params["subset"] == "600"


def test_workers_and_resumed_studies_do_not_replay_suggestions():
    seeds = {search.sampler_seed(0, 0, 0), search.sampler_seed(0, 0, 1), search.sampler_seed(0, 5, 0)}
    assert len(seeds) == 3 and search.sampler_seed(None, 0, 0) is None
    assert search.sampler_seed(0, 0, 0) == search.sampler_seed(0, 0, 0)  # one process with --seed: reproducible

    def first_params(seed):
        study = optuna.create_study(sampler=search.make_sampler("tpe", seed))
        return study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}).params

    # two workers of one study (worker 0 and 1), and the same study resumed after 5 trials
    firsts = [first_params(search.sampler_seed(0, before, worker)) for before, worker in ((0, 0), (0, 1), (5, 0))]
    assert len({p["x"] for p in firsts}) == 3


def test_a_named_data_dir_never_falls_back_silently(tmp_path, monkeypatch):
    monkeypatch.setenv("FMNIST_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(data.DataError, match=r"nowhere \(\$FMNIST_DATA_DIR\) does not exist"):
        data.locate()
    with pytest.raises(data.DataError, match=r"elsewhere \(--data-dir\) does not exist"):
        data.locate(tmp_path / "elsewhere")


def test_store_problems_are_one_line_each(store, tmp_path):
    assert invoke(*TRAIN, "--subset", "300").exit_code == 0
    for args, message in ((["register", "--run-id", "0123456789abcdef0123456789abcdef"], "0123456789abcdef"),
                          (["register", "--parent-run-id", "feedfacefeedfacefeedfacefeedface"], "feedface")):
        result = CliRunner().invoke(cli.main, args)
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    mlflow.MlflowClient().delete_experiment(experiments.find_experiment("fmnist"))
    result = CliRunner().invoke(cli.main, [*TRAIN, "--subset", "300"])
    assert result.exit_code == 1 and "deleted" in result.output.lower() and len(result.output.strip().splitlines()) == 1
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "mlflow.db").write_bytes(b"this is not a database" * 100)
    mlflow.set_tracking_uri(f"sqlite:///{corrupt / 'mlflow.db'}")
    result = CliRunner().invoke(cli.main, [*TRAIN, "--subset", "300"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error: tracking store sqlite:///") and len(result.output.strip().splitlines()) == 1


def test_experiment_name_from_the_environment_and_a_quiet_console(tmp_path):
    import subprocess
    import sys

    from conftest import cli_env

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = cli_env(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME="from-env")
    proc = subprocess.run([sys.executable, "-m", "fmnist_mlflow", "train", "--device", "cpu", "--subset", "300",
                           "--epochs", "1"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert "INFO" not in output and "View run" not in output  # MLflow's chatter is off by default
    assert "view it: mlflow ui --backend-store-uri" in proc.stdout  # our own link to the run
    mlflow.set_tracking_uri(uri)
    try:
        (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
        assert mlflow.get_experiment(run.info.experiment_id).name == "from-env"
    finally:
        mlflow.set_tracking_uri(None)
    version = subprocess.run([sys.executable, "-m", "fmnist_mlflow", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("fmnist, version ")
