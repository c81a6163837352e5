"""`--jobs`, `--precision`, `--device` and the benchmark's plumbing (no test here asserts a time)."""

import json
import sys

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fmnist_mlflow import schema
from fmnist_mlflow import bench
from fmnist_mlflow.cli import main as cli
from fmnist_mlflow.studies import grid
from fmnist_mlflow.training import hardware
from fmnist_mlflow.tracking import logged_models
from fmnist_mlflow.training.config import ConfigError, RunConfig


def children_by_name():
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    parents = [r for r in runs if r.data.tags.get(schema.TAG_KIND) == "sweep"]
    return parents, {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}


def test_jobs_2_runs_the_same_configs_with_the_same_metrics(store, tmp_path, monkeypatch):
    import yaml

    grid = tmp_path / "grid.yaml"  # one config of each model: three points
    grid.write_text(yaml.safe_dump({"name": "three", "models": ["model1", "model2", "model3"], "losses": ["ce"],
                                    "optimizers": ["adam"], "lr": {"adam": 0.001}, "dropout": {"model2": 0.5},
                                    "batch_size": 64, "epochs": 1, "seeds": [0]}))
    args = ["sweep", "--grid", str(grid), "--subset", "400", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"]
    assert CliRunner().invoke(cli.main, [*args, "--experiment", "one"], catch_exceptions=False).exit_code == 0
    result = CliRunner().invoke(cli.main, [*args, "--experiment", "two", "--jobs", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "2 workers" in result.output
    one = mlflow.search_runs(experiment_names=["one"], output_format="list")
    two = mlflow.search_runs(experiment_names=["two"], output_format="list")
    parents_two = [r for r in two if r.data.tags.get(schema.TAG_KIND) == "sweep"]
    children_one = {r.info.run_name: r for r in one if "mlflow.parentRunId" in r.data.tags}
    children_two = {r.info.run_name: r for r in two if "mlflow.parentRunId" in r.data.tags}
    assert len(parents_two) == 1 and len(children_two) == 3 and set(children_two) == set(children_one)
    assert {r.data.tags["mlflow.parentRunId"] for r in children_two.values()} == {parents_two[0].info.run_id}
    for name, run in children_two.items():
        assert run.info.status == "FINISHED"
        for key in ("train_loss", "val_nll", "val_accuracy"):
            # one CPU thread per worker instead of two: float sums in another order, nothing more
            assert run.data.metrics[key] == pytest.approx(children_one[name].data.metrics[key], rel=2e-3, abs=2e-3), (name, key)


def fake_cpu(monkeypatch, *flags):
    """Pretend this CPU has exactly `flags` (the tests must not depend on the machine running them)."""
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))


def test_precision_is_validated_and_bf16_trains(store, monkeypatch):
    fake_cpu(monkeypatch, "avx2", "avx512_bf16")
    result = CliRunner().invoke(cli.main, ["train", "--precision", "bf16", "--epochs", "1", "--subset", "300"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.params["precision"] == "bf16" and run.info.status == "FINISHED"


@pytest.mark.parametrize("flags, expected", [(("avx2", "amx_bf16", "avx512_bf16"), "bf16"),
                                             (("avx2", "avx512f", "avx512_bf16"), "bf16"),
                                             (("avx2", "avx512f"), "fp32"), ((), "fp32")])
def test_auto_precision_resolves_per_cpu(monkeypatch, flags, expected):
    fake_cpu(monkeypatch, *flags)
    assert RunConfig(device="cpu").precision == expected
    assert RunConfig(device="cpu", precision="fp32").precision == "fp32"


def test_auto_precision_on_a_cpu_whose_flags_cannot_be_read_is_fp32_and_bf16_stays_allowed(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: None)
    assert RunConfig(device="cpu").precision == "fp32"
    assert RunConfig(device="cpu", precision="bf16").precision == "bf16"


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_resolves_per_gpu(monkeypatch, supported, expected):
    fake_cpu(monkeypatch)  # a CPU without bf16: the GPU's answer is what counts
    monkeypatch.setattr(hardware, "cuda_available", lambda: True)
    monkeypatch.setattr(hardware, "cuda_bf16", lambda: supported)
    assert RunConfig(device="cuda").precision == expected
    if not supported:
        with pytest.raises(ConfigError, match="no native bf16"):
            RunConfig(device="cuda", precision="bf16")


def test_explicit_bf16_without_bf16_units_is_a_usage_error_before_any_run(store, monkeypatch):
    fake_cpu(monkeypatch, "avx2")
    for command in (["train"], ["sweep"], ["search"]):
        result = CliRunner().invoke(cli.main, [*command, "--device", "cpu", "--precision", "bf16", "--subset", "300"])
        assert result.exit_code == 2 and "neither AMX-BF16 nor AVX512-BF16" in result.output, (command, result.output)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


@pytest.mark.parametrize("flags, expected", [(("amx_bf16",), "bf16"), (("avx2",), "fp32")])
def test_the_logged_precision_is_the_resolved_one_never_auto(store, monkeypatch, flags, expected):
    fake_cpu(monkeypatch, *flags)
    result = CliRunner().invoke(cli.main, ["train", "--epochs", "1", "--subset", "300", "--device", "cpu"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.params["precision"] == expected


def test_a_bf16_run_logs_an_fp32_model_that_loads_and_predicts_in_fp32(store, monkeypatch):
    fake_cpu(monkeypatch, "amx_bf16")
    result = CliRunner().invoke(cli.main, ["train", "--model", "model3", "--epochs", "1", "--subset", "300",
                                           "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.params["precision"] == "bf16"
    uri = logged_models.model_uri(run.info.run_id)
    weights = logged_models.network(uri).state_dict()
    assert weights and {t.dtype for t in weights.values()} == {torch.float32}
    logits = logged_models.logits(mlflow.pyfunc.load_model(uri), np.random.rand(3, 1, 28, 28).astype(np.float32))
    assert logits.shape == (3, 10) and logits.dtype == np.float32 and np.isfinite(logits).all()


def test_jobs_auto_is_a_worker_per_core_on_full_data_and_one_elsewhere(monkeypatch):
    monkeypatch.setattr(hardware, "usable_cpus", lambda: 2)
    assert hardware.default_jobs("cpu", points=54, subset=0) == 2
    assert hardware.default_jobs("cpu", points=1, subset=0) == 1
    assert hardware.default_jobs("cpu", points=54, subset=2000) == 1  # smoke runs: start-up would dominate
    assert hardware.default_jobs("cuda", points=54, subset=0) == 1


def test_cpus_are_counted_as_this_process_may_use_them(tmp_path, monkeypatch):
    """`taskset -c 0`: one CPU, so one worker and at most one thread; a cgroup quota (a container's --cpus)
    caps the count too."""
    import subprocess

    probe = ["taskset", "-c", "0", sys.executable, "-m", "fmnist_mlflow"]
    shown = subprocess.run([*probe, "data"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "--jobs auto -> 1 worker(s)" in shown.stdout, shown.stdout + shown.stderr
    refused = subprocess.run([*probe, "train", "--threads", "2"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "'--threads': 2 is not in the range 0<=x<=1" in refused.stderr
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(hardware, "CGROUP_CPU_MAX", cpu_max)
    affinity = len(__import__("os").sched_getaffinity(0))
    for content, expected in (("50000 100000", 1), ("150000 100000", min(2, affinity)), ("max 100000", affinity)):
        cpu_max.write_text(content + "\n")
        assert hardware.usable_cpus() == expected, content


def test_the_report_grid_runs_three_seeds_by_default():
    g = grid.load_grid(grid.DEFAULT_GRID)
    assert g.seeds == (0, 1, 2)
    configs = g.configs(device="cpu")
    assert len(configs) == 54 and {c.seed for c in configs} == {0, 1, 2}


def test_data_says_what_auto_resolves_to(monkeypatch):
    fake_cpu(monkeypatch, "avx512_bf16")
    result = CliRunner().invoke(cli.main, ["data"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "precision auto -> bf16 (CPU with AVX512-BF16)" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when no GPU is present")
def test_cuda_without_a_gpu_is_a_usage_error(store):
    for command in (["train"], ["sweep"], ["search"], ["bench"]):
        result = CliRunner().invoke(cli.main, [*command, "--device", "cuda"])
        assert result.exit_code == 2 and "no CUDA device" in result.output, command
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_precision_on_this_gpu_follows_its_bf16_support():
    expected = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    assert RunConfig(device="cuda").precision == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_run(store):
    result = CliRunner().invoke(cli.main, ["train", "--device", "cuda", "--precision", "bf16", "--epochs", "1",
                                           "--subset", "2000"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.params["device"] == "cuda" and run.data.metrics["val_accuracy"] > 0.5


def test_bench_quick_through_the_cli_measures_every_comparison_side_by_side(store, monkeypatch):
    """`fmnist bench --quick`, with its plan made tiny (what is checked is that every comparison runs and
    reports consistent figures, not how fast anything is)."""
    fake_cpu(monkeypatch, "avx512_bf16")
    monkeypatch.setattr(bench, "QUICK", bench.BenchPlan(
        rounds=1, images={"model1": 256, "model3": 128}, tracked_epochs=1, grid_subset=100, jobs=2, tracked_subset=300,
        monitor_seconds=0.5, grid_points=2, serve_images=64))
    result = CliRunner().invoke(cli.main, ["bench", "--quick", "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    out = json.loads(lines[-1])  # last: one JSON object
    assert out["plan"] == "quick" and out["device"] == "cpu" and out["default_precision"] == "bf16"
    for model in ("model1", "model3"):
        speed = out["throughput"][model]
        assert speed["classic_img_s"] > 0 and speed["ours_img_s"] > 0
        assert speed["speedup"] == pytest.approx(speed["ours_img_s"] / speed["classic_img_s"])  # one round
        entry = out["precision"][model]
        assert entry["ours_vs_floor"] == pytest.approx(entry["ours_default_img_s"] / entry["floor_bf16_img_s"])
    assert out["speedup"] == out["throughput"]["model1"]["speedup"]
    tracking = out["tracking"]
    assert out["tracking_overhead"] == pytest.approx((tracking["tracked_s"] - tracking["untracked_s"]) / tracking["untracked_s"])
    grid = out["grid"]
    assert out["jobs_speedup"] == pytest.approx(grid["jobs_1_s"] / grid["jobs_2_s"]) and grid["jobs"] == 2
    assert 0 <= out["system_metrics"]["cpu_seconds_on"] and out["system_metrics"]["seconds"] == 0.5
    serve = out["serving"]
    assert serve["images"] == 64 and out["serving_channels_last_speedup"] == pytest.approx(
        serve["nchw_ms_per_image"] / serve["channels_last_ms_per_image"])  # one round
    assert any(line.startswith("model1 (fp32 both): classic") for line in lines)
    assert any(line.startswith("grid (2 configs, 1 epoch, 100 images): --jobs 1") for line in lines)
    assert mlflow.get_tracking_uri() == store  # the bench's temp stores did not leak
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []  # nor its runs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sweep_with_two_workers_sharing_the_gpu(store):
    result = CliRunner().invoke(cli.main, ["sweep", "--device", "cuda", "--jobs", "2", "--epochs", "1", "--subset",
                                           "2000", "--seeds", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    parents, children = children_by_name()
    assert len(children) == 18 and {c.info.status for c in children.values()} == {"FINISHED"}
    assert {c.data.params["device"] for c in children.values()} == {"cuda"}
    assert len({c.data.tags["fmnist.worker"] for c in children.values()}) == 2
