"""`--jobs`, `--precision`, `--device` and the benchmark's plumbing (no test here asserts a time)."""

import json

import mlflow
import pytest
import torch
from click.testing import CliRunner

from fmnist_mlflow import bench, cli, tracking


def children_by_name():
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    parents = [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "sweep"]
    return parents, {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}


def test_jobs_2_runs_the_same_configs_with_the_same_metrics(store, tmp_path, monkeypatch):
    args = ["sweep", "--epochs", "1", "--subset", "400"]
    assert CliRunner().invoke(cli.main, [*args, "--experiment", "one"], catch_exceptions=False).exit_code == 0
    result = CliRunner().invoke(cli.main, [*args, "--experiment", "two", "--jobs", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "2 workers" in result.output
    one = mlflow.search_runs(experiment_names=["one"], output_format="list")
    two = mlflow.search_runs(experiment_names=["two"], output_format="list")
    parents_two = [r for r in two if r.data.tags.get(tracking.TAG_KIND) == "sweep"]
    children_one = {r.info.run_name: r for r in one if "mlflow.parentRunId" in r.data.tags}
    children_two = {r.info.run_name: r for r in two if "mlflow.parentRunId" in r.data.tags}
    assert len(parents_two) == 1 and len(children_two) == 18 and set(children_two) == set(children_one)
    assert {r.data.tags["mlflow.parentRunId"] for r in children_two.values()} == {parents_two[0].info.run_id}
    for name, run in children_two.items():
        assert run.info.status == "FINISHED"
        for key in ("train_loss", "val_nll", "val_accuracy"):
            # one CPU thread per worker instead of two: float sums in another order, nothing more
            assert run.data.metrics[key] == pytest.approx(children_one[name].data.metrics[key], rel=2e-3, abs=2e-3), (name, key)


def test_precision_is_validated_and_bf16_trains(store):
    bad = CliRunner().invoke(cli.main, ["train", "--precision", "fp8"])
    assert bad.exit_code == 2 and "fp8" in bad.output
    result = CliRunner().invoke(cli.main, ["train", "--precision", "bf16", "--epochs", "1", "--subset", "300"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.params["precision"] == "bf16" and run.info.status == "FINISHED"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when no GPU is present")
def test_cuda_without_a_gpu_is_a_usage_error(store):
    for command in (["train"], ["sweep"], ["search"], ["bench"]):
        result = CliRunner().invoke(cli.main, [*command, "--device", "cuda"])
        assert result.exit_code == 2 and "no CUDA device" in result.output, command
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_run(store):
    result = CliRunner().invoke(cli.main, ["train", "--device", "cuda", "--precision", "bf16", "--epochs", "1",
                                           "--subset", "2000"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.params["device"] == "cuda" and run.data.metrics["val_accuracy"] > 0.5


def test_bench_runs_every_comparison_on_a_tiny_plan(store):
    plan = bench.BenchPlan(rounds=1, images={"model1": 256, "model3": 128}, tracked_epochs=1, grid_subset=100,
                           jobs=2, tracked_subset=300)
    lines = []
    result = bench.run(plan, "cpu", report=lines.append)
    for key in ("speedup", "speedup_model3", "tracking_overhead", "jobs_speedup", "machine"):
        assert key in result
    assert result["speedup"] > 0 and result["throughput"]["model3"]["classic_img_s"] > 0
    assert json.loads(json.dumps(result)) == result
    assert any(line.startswith("model1: classic") for line in lines)
    assert mlflow.get_tracking_uri() == store  # the bench's temp stores did not leak


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sweep_with_two_workers_sharing_the_gpu(store):
    result = CliRunner().invoke(cli.main, ["sweep", "--device", "cuda", "--jobs", "2", "--epochs", "1", "--subset",
                                           "2000"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    parents, children = children_by_name()
    assert len(children) == 18 and {c.info.status for c in children.values()} == {"FINISHED"}
    assert {c.data.params["device"] for c in children.values()} == {"cuda"}
    assert len({c.data.tags["fmnist.worker"] for c in children.values()}) == 2
