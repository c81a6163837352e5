"""Workers placed by Ray (`--ray ADDRESS`): a real local cluster of two nodes (`ray.cluster_utils.Cluster`, CPU
only, on 127.0.0.1) runs a tiny grid: both nodes get points, every point finishes once, and a node removed
while it runs a point is recovered (the point's trial stops beating and is retried; Ray runs the task again).
What cannot be shared across hosts is refused before any work."""

import subprocess
import sys
import time

import mlflow
import pytest
import yaml
from click.testing import CliRunner

from conftest import cli_env
from fmnist_mlflow import schema
from fmnist_mlflow.cli import main as cli
from fmnist_mlflow.studies import cluster

GRID = {"name": "ray", "models": ["model1"], "losses": ["ce"], "optimizers": ["adam", "rmsprop", "sgd"],
        "lr": {"adam": 0.003, "rmsprop": 0.003, "sgd": 0.05}, "batch_size": 64, "epochs": 2, "seeds": [0, 1]}
SUBSET = "1200"  # a point trains for seconds: long enough to be caught running
LOCAL = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}  # every process of the cluster on the loopback address
# Ray turns a loopback address into this machine's network address before it connects (a cluster's nodes
# are other machines); this switch keeps the driver and the nodes on 127.0.0.1, where the tests talk only
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def sweep_runs(experiment: str = "fmnist") -> list:
    return [r for r in mlflow.search_runs(experiment_names=[experiment], output_format="list")
            if r.data.tags.get(schema.TAG_KIND) == "sweep-child"]


def test_a_two_node_ray_cluster_shares_a_grid_and_recovers_a_node_that_dies(store, postgres_url, tmp_path, monkeypatch):
    """The README's `fmnist sweep ... --ray auto` on a PostgreSQL storage, with a tiny grid: `auto` finds the
    cluster named by RAY_ADDRESS, as it finds the one `ray start` runs on a node."""
    for key, value in LOOPBACK_ONLY.items():
        monkeypatch.setenv(key, value)
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # read when ray was imported
    grid = tmp_path / "ray.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    ray_cluster = Cluster(initialize_head=True, head_node_args={**LOCAL, "include_dashboard": False})
    try:
        second = ray_cluster.add_node(**LOCAL)
        args = [sys.executable, "-m", "fmnist_mlflow", "sweep", "--seeds", "0,1", "--storage", postgres_url, "--ray", "auto",
                "--grid", str(grid), "--subset", SUBSET, "--device", "cpu", "--no-race"]
        env = cli_env(MLFLOW_TRACKING_URI=store, FMNIST_HEARTBEAT_S="1", RAY_ADDRESS=ray_cluster.address, **LOOPBACK_ONLY)
        driver = subprocess.Popen(args, env=env, cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # the second node dies while it trains a point
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and driver.poll() is None:
            if any(r.info.status == "RUNNING" and r.data.tags.get(schema.TAG_RAY_NODE) == second.node_id
                   for r in sweep_runs()):
                break
            time.sleep(0.2)
        assert driver.poll() is None, driver.communicate()[0][-3000:]
        ray_cluster.remove_node(second, allow_graceful=False)  # as a machine lost: no SIGTERM first
        out, _ = driver.communicate(timeout=300)
    finally:
        ray_cluster.shutdown()
    assert driver.returncode == 0, out[-4000:]
    assert "Ray cluster: 2 node(s) on 1 host(s), 2 worker slot(s)" in out

    runs = sweep_runs()
    finished = sorted((r.data.params["optimizer"], r.data.params["seed"]) for r in runs if r.info.status == "FINISHED")
    assert finished == sorted((o, str(s)) for o in GRID["optimizers"] for s in GRID["seeds"])  # each point once
    on = {r.data.tags.get(schema.TAG_RAY_NODE) for r in runs}
    assert second.node_id in on and len(on) == 2, on  # both nodes trained points
    lost = [r for r in runs if r.data.tags.get(schema.TAG_RAY_NODE) == second.node_id and r.info.status != "FINISHED"]
    assert lost and {r.info.status for r in lost} == {"KILLED"}, [(r.info.status, r.data.tags) for r in lost]
    assert {r.data.tags[schema.TAG_FAILURE].split(":")[0] for r in lost} <= {"worker lost", "orphaned"}
    (parent,) = [r for r in mlflow.search_runs(experiment_names=["fmnist"], output_format="list")
                 if r.data.tags.get(schema.TAG_KIND) == "sweep"]
    assert parent.info.status == "FINISHED" and "best_model" in parent.data.tags


@pytest.mark.parametrize("storage, tracking, named", [
    ("sqlite:///optuna.db", "http://tracking-host:5000", "the Optuna storage sqlite:///optuna.db is a file on this host"),
    ("postgresql://optuna@db-host/optuna", "sqlite:///mlflow.db", "the tracking store sqlite:///mlflow.db is a file"),
    ("postgresql://optuna:secret@localhost/optuna", "http://tracking-host:5000", "this host's loopback address"),
    ("postgresql://optuna@db-host/optuna", "postgresql://mlflow@db-host/mlflow", "artifacts would land in each host"),
])
def test_files_and_loopback_addresses_are_refused_when_the_nodes_are_on_several_hosts(storage, tracking, named):
    with pytest.raises(cluster.ClusterError, match="nodes run on 2 hosts") as refused:
        cluster.check_shared(storage, tracking, ["10.0.0.1", "10.0.0.2"])
    assert named in str(refused.value) and "secret" not in str(refused.value)
    cluster.check_shared(storage, tracking, ["127.0.0.1"])  # one host: its files are every node's


def test_an_empty_ray_address_is_a_usage_error(store):
    result = CliRunner().invoke(cli.main, ["sweep", "--ray", " ", "--subset", "100"])
    assert result.exit_code == 2 and "--ray" in result.output
