"""Several machines, simulated: worker processes that share only a real PostgreSQL (the Optuna storage) and a
real `mlflow server` that serves the artifacts, each in its own working directory; one is SIGKILLed in the
middle of its config, and the others notice, end its run and redo its work."""

import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
import yaml

from conftest import cli_env
from fmnist_mlflow import schema
from fmnist_mlflow.tracking import queries
from fmnist_mlflow.studies import storage

HEARTBEAT_S = 1  # the workers beat every second and a trial is lost after 3 silent seconds


def start_workers(tmp_path, mlflow_server, args: list, n: int = 3) -> list:
    env = cli_env(MLFLOW_TRACKING_URI=mlflow_server, FMNIST_HEARTBEAT_S=str(HEARTBEAT_S))
    workers = []
    for i in range(n):
        home = tmp_path / f"machine{i}"  # no folder in common: the artifacts go through the server
        home.mkdir()
        log = open(home / "worker.log", "w")  # a file, not a pipe: nobody reads a pipe while they run
        worker = subprocess.Popen([sys.executable, "-m", "fmnist_mlflow", *args], env=env, cwd=home, stdout=log,
                                  stderr=subprocess.STDOUT, text=True)
        worker.log_path = home / "worker.log"
        workers.append(worker)
    return workers


def kill_one_mid_config(workers: list, kind: str) -> str:
    """SIGKILL the worker whose run of `kind` has logged its first epoch and not its last; its run id."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for run in mlflow.search_runs(search_all_experiments=True, output_format="list"):
            pid = int(run.data.tags.get(schema.TAG_WORKER, ":0").rsplit(":", 1)[1])
            if (run.data.tags.get(schema.TAG_KIND) == kind and run.info.status == "RUNNING"
                    and "val_accuracy" in run.data.metrics and pid in {w.pid for w in workers}):
                os.kill(pid, signal.SIGKILL)  # no chance to clean up: the run stays RUNNING
                next(w for w in workers if w.pid == pid).wait()
                return run.info.run_id
        time.sleep(0.3)
    pytest.fail("no worker got into a config")


def wait_all(workers: list) -> list:
    for w in workers:
        w.wait(timeout=600)
    return [w.log_path.read_text() for w in workers]


def assert_recovered(lost_run_id: str, outputs: list, workers: list, tmp_path) -> list:
    survivors = [(w, o) for w, o in zip(workers, outputs) if w.returncode != -signal.SIGKILL]
    assert len(survivors) == 2 and all(w.returncode == 0 for w, _ in survivors), "\n=====\n".join(o[-3000:] for o in outputs)
    lost = mlflow.get_run(lost_run_id)
    assert lost.info.status == "KILLED" and lost.data.tags[schema.TAG_FAILURE].startswith("worker lost")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    assert not any((tmp_path / f"machine{i}" / "mlruns").exists() for i in range(3))
    return runs


def test_three_sweep_workers_share_one_grid_and_redo_a_sigkilled_workers_config(mlflow_server, postgres_url, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "shared", "models": ["model1"], "losses": ["ce", "bce"], "optimizers": ["adam", "sgd", "rmsprop"],
        "lr": {"adam": 0.001, "sgd": 0.05, "rmsprop": 0.001}, "batch_size": 64, "epochs": 4, "seeds": [0]}))
    args = ["sweep", "--grid", str(grid), "--storage", postgres_url, "--subset", "3000", "--device", "cpu",
            "--threads", "1"]
    workers = start_workers(tmp_path, mlflow_server, args)
    lost_run_id = kill_one_mid_config(workers, schema.KIND_SWEEP_CHILD)
    runs = assert_recovered(lost_run_id, wait_all(workers), workers, tmp_path)

    (parent,) = [r for r in runs if r.data.tags.get(schema.TAG_KIND) == schema.KIND_SWEEP]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    finished = [c.data.tags[schema.TAG_CONFIG_HASH] for c in children if c.info.status == "FINISHED"]
    assert len(finished) == 6 and len(set(finished)) == 6  # every config FINISHED, none twice
    lost = mlflow.get_run(lost_run_id)
    assert lost.data.tags[schema.TAG_CONFIG_HASH] in finished  # the killed config was redone
    assert len({c.data.tags[schema.TAG_WORKER] for c in children}) == 3  # all three machines took configs
    assert parent.info.status == "FINISHED" and parent.data.tags[schema.TAG_RETRIED] == "1"
    summary = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/summary.csv").splitlines()
    assert len(summary) == 7 and all(",FINISHED," in line for line in summary[1:])

    (name,) = optuna.get_all_study_names(postgres_url)
    trials = optuna.load_study(study_name=name, storage=postgres_url).trials
    retries = [t for t in trials if storage.retried(t) is not None]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    assert retries[0].user_attrs[schema.ATTR_RUN] != lost_run_id


def test_three_search_workers_redo_a_sigkilled_workers_trial_then_share_the_confirm(mlflow_server, postgres_url, tmp_path):
    """The search's trials, one worker SIGKILLed mid-trial; then the two left share the confirm's points (a
    study of its own): every (contender, seed) runs once, and both name the same champion."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "name": "shared", "fixed": {"model": "model1", "loss": "ce", "seed": 0},
        "search": {"optimizer": {"choices": ["adam", "rmsprop"]}, "lr": {"adam": {"low": 1e-3, "high": 3e-3},
                                                                              "rmsprop": {"low": 5e-4, "high": 2e-3}}}}))
    args = ["search", "--space", str(space), "--storage", postgres_url, "--trials", "2", "--epochs", "4",
            "--subset", "3000", "--device", "cpu", "--threads", "1", "--pruner", "none", "--confirm", "2", "--seeds", "2"]
    workers = start_workers(tmp_path, mlflow_server, args)
    lost_run_id = kill_one_mid_config(workers, schema.KIND_TRIAL)
    outputs = wait_all(workers)
    runs = assert_recovered(lost_run_id, outputs, workers, tmp_path)

    study = optuna.load_study(study_name="shared", storage=postgres_url)
    (lost_trial,) = [t for t in study.trials if t.state.name == "FAIL"]
    (retry,) = [t for t in study.trials if storage.retried(t) is not None]
    assert storage.retried(retry) == lost_trial.number and retry.params == lost_trial.params
    assert retry.state.name == "COMPLETE" and retry.user_attrs[schema.ATTR_RUN] != lost_run_id
    (parent,) = [r for r in runs if r.data.tags.get(schema.TAG_KIND) == schema.KIND_SEARCH]
    trial_runs = [r for r in runs if r.data.tags.get(schema.TAG_KIND) == schema.KIND_TRIAL]
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {parent.info.run_id}
    assert sorted(r.info.status for r in trial_runs).count("FINISHED") == len(study.trials) - 1
    assert parent.info.status == "FINISHED" and parent.data.tags[schema.TAG_RETRIED] == "1"
    assert study.user_attrs[schema.ATTR_PARENT] == parent.info.run_id
    assert queries.find_run(lost_run_id).data.tags[schema.TAG_STATE] == "FAIL"

    # the confirm: 2 contenders x seeds 1, 2, each point run once, by both survivors
    confirm_runs = [r for r in runs if r.data.tags.get(schema.TAG_KIND) == schema.KIND_CONFIRM]
    points = [(r.data.tags[schema.TAG_CONFIG_GROUP], r.data.params["seed"]) for r in confirm_runs]
    assert len(points) == len(set(points)) == 4 and {r.info.status for r in confirm_runs} == {"FINISHED"}, points
    assert len({r.data.tags[schema.TAG_WORKER] for r in confirm_runs}) == 2  # shared, not done twice
    champion = parent.data.tags[schema.TAG_CHAMPION_GROUP]
    said = {line for o, w in zip(outputs, workers) if w.returncode == 0 for line in o.splitlines()
            if line.startswith("champion: ")}
    assert len(said) == 1 and study.user_attrs["champion"]["config_group"] == champion, said
    (confirm_study,) = [n for n in optuna.get_all_study_names(postgres_url) if n.startswith("shared-confirm-")]
    assert optuna.load_study(study_name=confirm_study, storage=postgres_url).user_attrs[schema.ATTR_PARENT] == parent.info.run_id


def _claim_until_spent(budget, claimed, pause_s: float) -> None:
    n = 0
    while budget.claim():
        n += 1
        time.sleep(pause_s)  # a slow worker (whole trials) beside a fast one (pruned trials)
    claimed.put(n)


def test_one_command_s_workers_share_its_trial_budget():
    """`--trials N --jobs 2`: a worker whose trials end early goes on claiming trials while the other is still
    busy (a fixed half each left the fast one idle), and together they start exactly N."""
    import multiprocessing

    from fmnist_mlflow.studies import workers

    budget, ctx = workers.Budget(9), multiprocessing.get_context("spawn")
    claimed = ctx.Queue()
    procs = [ctx.Process(target=_claim_until_spent, args=(budget, claimed, pause)) for pause in (0.01, 5.0)]
    for proc in procs:
        proc.start()
    counts = sorted(claimed.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    assert sum(counts) == 9 and budget.left == 0 and not budget.claim()
    assert counts[1] > 5, counts  # the fast worker took more than a fixed half


def test_a_jobs_2_sweep_whose_worker_is_sigkilled_still_ends_well(store, tmp_path):
    """One `fmnist sweep --jobs 2`: one of its own worker processes is SIGKILLed mid-point. The other fails
    the lost point once its heartbeats stop, redoes it and the rest; the command then writes the answer, ends
    the parent FINISHED with `fmnist.retried`, says a worker was lost, and exits 0."""
    import psutil

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "lossy", "models": ["model1"], "losses": ["ce"], "optimizers": ["adam", "sgd"],
        "lr": {"adam": 0.001, "sgd": 0.05}, "batch_size": 64, "epochs": 4, "seeds": [0, 1]}))
    command = subprocess.Popen(
        [sys.executable, "-m", "fmnist_mlflow", "sweep", "--grid", str(grid), "--subset", "3000", "--device", "cpu",
         "--jobs", "2", "--threads", "1", "--no-race", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"],
        env=cli_env(MLFLOW_TRACKING_URI=store, FMNIST_HEARTBEAT_S=str(HEARTBEAT_S)), cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    lost_run_id = None
    while lost_run_id is None and time.monotonic() < deadline:
        workers = {p.pid for p in psutil.Process(command.pid).children()}  # the command's worker processes
        for run in mlflow.search_runs(search_all_experiments=True, output_format="list"):
            pid = int(run.data.tags.get(schema.TAG_WORKER, ":0").rsplit(":", 1)[1])
            if (run.data.tags.get(schema.TAG_KIND) == schema.KIND_SWEEP_CHILD and run.info.status == "RUNNING"
                    and "val_accuracy" in run.data.metrics and pid in workers):
                os.kill(pid, signal.SIGKILL)
                lost_run_id = run.info.run_id
                break
        time.sleep(0.3)
    output, _ = command.communicate(timeout=600)
    assert lost_run_id and command.returncode == 0, output[-3000:]
    assert "1 worker(s) were lost" in output and "Best by mean val_accuracy" in output
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    (parent,) = [r for r in runs if r.data.tags.get(schema.TAG_KIND) == schema.KIND_SWEEP]
    assert parent.info.status == "FINISHED" and parent.data.tags[schema.TAG_RETRIED] == "1"
    assert parent.data.tags["mlflow.note.content"].startswith("**Best by mean val_accuracy")
    assert mlflow.get_run(lost_run_id).data.tags[schema.TAG_FAILURE].startswith("worker lost")
    finished = [r.data.tags[schema.TAG_CONFIG_HASH] for r in runs
                if r.data.tags.get(schema.TAG_KIND) == schema.KIND_SWEEP_CHILD and r.info.status == "FINISHED"]
    assert len(finished) == len(set(finished)) == 4  # every point once, the lost one redone


def _report_gpu(path, started_with) -> None:
    import torch

    path.write_text(f"{started_with},{os.environ.get('FMNIST_GPU')},{torch.cuda.device_count()}")


def test_workers_are_pinned_each_to_its_gpu_from_their_start(tmp_path):
    """On a host with several GPUs, `--jobs` workers get one each (`hardware.worker_gpus`, round robin): a
    worker starts with CUDA_VISIBLE_DEVICES naming its GPU alone (it is in its environment when its arguments
    are unpickled, before anything imports torch)."""
    from fmnist_mlflow.studies import workers
    from fmnist_mlflow.training import hardware

    paths = [tmp_path / "a", tmp_path / "b"]
    codes = workers.run_workers(_report_gpu, [(p, _Visible()) for p in paths], "sqlite:///unused.db", threads=1,
                                gpus=["3", "5"])
    assert codes == [0, 0]
    seen = [p.read_text().split(",") for p in paths]
    assert [s[:2] for s in seen] == [["3", "3"], ["5", "5"]]
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # the command's own environment is as it was
    gpus = hardware.cuda_devices()
    if len(gpus) > 1:  # a multi-GPU host: one worker per GPU, each alone on its own
        assert hardware.worker_gpus("cuda", len(gpus)) == gpus and hardware.default_jobs("cuda", 18, 0) == len(gpus)
    else:  # here: nothing to pin
        assert hardware.worker_gpus("cuda", 2) == [] and hardware.worker_gpus("cpu", 2) == []


class _Visible:
    """Unpickled in the worker before its target runs: records CUDA_VISIBLE_DEVICES at that moment."""

    def __reduce__(self):
        return (_visible_now, ())


def _visible_now() -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "")
