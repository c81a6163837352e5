"""Shared fixtures: a real sqlite tracking store per test, a tiny data subset, a real `mlflow server`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

# Tests send traffic to 127.0.0.0/8 only: MLflow's usage telemetry (a request to MLflow's servers from each
# process that uses it) is off here and in every process a test starts (they inherit this environment).
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
# Two test processes (pytest-xdist's -n 2, the default here) on a 2-core machine: one CPU thread each for torch
# in them and in every process they start, or the two contend for the cores (measured 5.9x slower epochs).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from fmnist_mlflow.training import data  # noqa: E402

VENV_BIN = str(Path(sys.executable).parent)
TINY = 600  # training images in the tiny subset (120 validation)


# The longest tests, measured (seconds on this 2-core machine, `pytest --durations`): run first, so that the two
# xdist workers start on them together instead of one finishing the suite alone with them at its end.
LONGEST_FIRST = {"test_readme.py::test_every": 260, "test_scale_out.py": 205, "test_faults.py::test_a_tracking_server_dying": 64,
                 "test_faults.py::test_a_sweep_on_a_full": 52, "test_speed.py::test_bench_quick": 52,
                 "test_workers.py::test_three": 43, "test_race.py::test_two_workers": 41, "test_first_meet.py::test_a_full": 32,
                 "test_speed.py::test_jobs_2": 32, "test_faults.py::test_a_search_worker": 29, "test_readme.py::test_search": 28,
                 "test_fresh_store.py::test_workers": 27, "test_ray.py::test_a_two": 26}  # seconds in the suite, 2026-12-05


def pytest_collection_modifyitems(items) -> None:
    def expected(item) -> float:
        name = item.nodeid.split("/")[-1]
        return max((s for key, s in LONGEST_FIRST.items() if name.startswith(key)), default=0)

    items.sort(key=expected, reverse=True)  # stable: the others keep their order


@pytest.fixture(scope="session")
def tiny_data():
    return data.load(subset=TINY)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An empty sqlite tracking store with MLflow's tables made (1.6 s of migrations), made once: each test's
    `store` is a copy of it. Tests of what happens while a store's tables are made use their own files."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    client = MlflowClient(f"sqlite:///{path}")
    client.search_experiments(max_results=1)
    client.search_registered_models(max_results=1)
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, empty_store):
    """A fresh sqlite tracking store in a temp working dir (artifacts land in its ./mlruns)."""
    import shutil

    import mlflow

    monkeypatch.chdir(tmp_path)
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    reset_mlflow()


def reset_mlflow() -> None:
    """Undo the process-wide state MLflow's fluent API keeps (active runs, experiment id env var)."""
    import mlflow
    from mlflow.tracking import fluent

    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = getattr(proc, "log_path", None)
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-3000:] if log else ''}")
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def start_mlflow_server(root: Path, port: int, *extra: str) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port with a sqlite backend and served artifacts under `root`. Its log goes
    to root/server.log: a pipe nobody reads fills up and stalls the server once it has logged ~64 KB."""
    log = open(root / "server.log", "a")
    proc = subprocess.Popen(
        [f"{VENV_BIN}/mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'backend.db'}", "--artifacts-destination", str(root / "artifacts"),
         *extra],
        stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=root,
    )
    proc.log_path = root / "server.log"
    return proc


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """A real `mlflow server` on 127.0.0.1 (free port, temp sqlite backend and artifact dir)."""
    import mlflow

    port = free_port()
    root = tmp_path / "server"
    root.mkdir()
    proc = start_mlflow_server(root, port)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", proc)
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(uri)
        yield uri
    finally:
        reset_mlflow()
        stop(proc)


def cli_env(**extra) -> dict:
    """The environment for a subprocess: this venv first on PATH (`mlflow run` calls `python`)."""
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", **extra}
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server (Debian's) in a temp dir on a free 127.0.0.1 port, run as `postgres`, for the
    session; each test gets a database of its own (`postgres_url`)."""
    import glob
    import pwd
    import shutil
    import tempfile

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL is not installed: run scripts/setup.sh (apt-get install postgresql)")
    bin_dir = Path(found[-1]).parent
    user = pwd.getpwnam("postgres")
    root = Path(tempfile.mkdtemp(prefix="fmnist-pg-", dir="/tmp"))
    os.chown(root, user.pw_uid, user.pw_gid)
    port = free_port()

    def as_postgres(*cmd):
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *map(str, cmd)], check=True, capture_output=True, timeout=120)

    as_postgres(bin_dir / "initdb", "-D", root / "data", "-U", "postgres", "--auth=trust", "-E", "UTF8")
    as_postgres(bin_dir / "pg_ctl", "-D", root / "data", "-l", root / "log", "-w", "-o",
                f"-p {port} -h 127.0.0.1 -k {root}", "start")
    try:
        yield lambda name: as_postgres(bin_dir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", name), port
    finally:
        as_postgres(bin_dir / "pg_ctl", "-D", root / "data", "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server, request):
    """A new, empty database on the session's PostgreSQL server: nothing of another test in it."""
    import re

    createdb, port = postgres_server
    name = "t_" + re.sub(r"[^a-z0-9]", "_", request.node.name.lower())[:50]
    createdb(name)
    return f"postgresql://postgres@127.0.0.1:{port}/{name}"


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MB tmpfs: a real full disk. Mounting needs root (CI runs as root); elsewhere the test is skipped
    with the reason, and the full-disk behaviour is then unverified on that machine."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("a full-disk test mounts a 4 MB tmpfs, which needs root (CI runs as root); run as root to cover it")
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"a full-disk test mounts a 4 MB tmpfs, and this machine refused it (a container without "
                    f"CAP_SYS_ADMIN?): {proc.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
