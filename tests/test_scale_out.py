"""The README's scale-out recipe, run as written: its bash block, read from the README, on this machine.

"Machines" are folders with their own HOME and nothing in common: the server's (PostgreSQL databases made with
the block's `createdb` lines, `mlflow server ... --app-name basic-auth` with the block's login settings),
two workers' (each runs the block's worker lines at the same time: a shared sweep, a shared search, a shared
confirm) and a third (register, predict). What is changed, and only that: the server binds 127.0.0.1 on a
free port; the other machines keep the README's `http://tracking-host:5000` and reach the server through
`HTTP_PROXY` (a forwarding proxy on 127.0.0.1 that sends each request on unchanged), so that every request
arrives with the README's `Host: tracking-host:5000` (the name `--allowed-hosts` lets in); the databases are the test's PostgreSQL server, the artifact folder is a temp
folder, and the `fmnist` lines get tiny sizes appended, with `--jobs 1` (on the test's two cores, two worker
processes per command on each of two machines only add their start-up, 140 s against 96 alone; a
command's own workers on a shared server and PostgreSQL are tested in tests/test_workers.py).
"""

import http.client
import http.server
import os
import re
import shlex
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import mlflow
import requests
import yaml

from conftest import cli_env, free_port, stop, wait_http
from fmnist_mlflow import schema

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- the scale-out recipe: tests/test_scale_out.py runs this block -->"


def recipe() -> dict:
    """The block's lines (continuations joined) by the machine their comment names: server, admin, worker, any."""
    text = README.read_text()
    block = text[text.index(MARKER):].split("```bash\n", 1)[1].split("\n```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    sections, current = {}, None
    for line in lines:
        if line.startswith("#"):
            current = next(k for k in ("server", "admin", "worker", "any") if k in line.split(":")[0])
            sections[current] = []
        elif line.strip():
            sections[current].append(re.sub(r"\s+", " ", line.strip()))
    return sections


def adapt(line: str, port: int, pg_port: int, artifacts: Path) -> str:
    pg = f"postgresql://postgres@127.0.0.1:{pg_port}/"
    for old, new in (("--host 0.0.0.0", "--host 127.0.0.1"), ("--port 5000", f"--port {port}"),
                     ("postgresql://mlflow@localhost/", pg), ("postgresql://optuna:PASSWORD@tracking-host/", pg),
                     ("/srv/mlartifacts", str(artifacts))):
        line = line.replace(old, new)
    return line


def tiny(line: str, grid: Path, space: Path) -> str:
    """The README's `fmnist` line at a test's size."""
    if line.startswith("fmnist sweep"):
        return f"{line} --grid {grid} --subset 300 --epochs 1 --threads 1 --jobs 1"
    if line.startswith("fmnist search"):
        return f"{line.replace('--trials 20', '--trials 2')} --space {space} --subset 300 --epochs 1 --threads 1 --pruner none --jobs 1"
    return line


class _Forward(http.server.BaseHTTPRequestHandler):
    """An HTTP proxy for one server: the request as the client sent it (method, headers with its Host, body),
    to `server`'s port on 127.0.0.1; the answer back."""

    server_port = 0

    def _forward(self) -> None:
        target = urllib.parse.urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "connection")}
        conn = http.client.HTTPConnection("127.0.0.1", self.server_port, timeout=300)
        conn.request(self.command, target.path + (f"?{target.query}" if target.query else ""), body=body or None,
                     headers=headers)
        answer = conn.getresponse()
        data = answer.read()
        self.send_response(answer.status, answer.reason)
        for key, value in answer.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

    def log_message(self, *args) -> None:
        pass


def forwarding_proxy(server_port: int) -> http.server.ThreadingHTTPServer:
    handler = type("Forward", (_Forward,), {"server_port": server_port})
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    return proxy


def script(lines: list) -> str:
    return "set -euo pipefail\n" + "\n".join(lines) + "\n"


def test_the_readme_scale_out_recipe_runs_as_written(postgres_server, tmp_path):
    sections = recipe()
    assert [k for k in sections] == ["server", "admin", "worker", "any"], sections
    extras = {e for line in sections["server"] + sections["worker"] if line.startswith("pip install")
              for e in re.findall(r"\[([a-z,]+)\]", line)[0].split(",")}
    pyproject = (README.parent / "pyproject.toml").read_text()
    assert extras == {"auth", "postgres"} and all(f"\n{e} = [" in pyproject for e in extras)  # what the recipe installs exists

    createdb_dir = Path(sorted(Path("/usr/lib/postgresql").glob("*/bin/createdb"))[-1]).parent
    port, (_, pg_port) = free_port(), postgres_server
    env = cli_env(PGHOST="127.0.0.1", PGPORT=str(pg_port), PGUSER="postgres", FMNIST_HEARTBEAT_S="2",
                  PATH=f"{createdb_dir}:{cli_env()['PATH']}")
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "NO_PROXY", "no_proxy",
                "HTTPS_PROXY", "https_proxy", "http_proxy"):
        env.pop(key, None)
    uri = f"http://127.0.0.1:{port}"
    proxy = forwarding_proxy(port)
    proxy_uri = f"http://127.0.0.1:{proxy.server_address[1]}"
    client_env = {**env, "HTTP_PROXY": proxy_uri}  # every machine but the server: tracking-host:5000 is the server
    machines = {name: tmp_path / name for name in ("server", "machine1", "machine2", "machine3")}
    for home in machines.values():
        home.mkdir()
    server_lines = [adapt(x, port, pg_port, machines["server"] / "mlartifacts") for x in sections["server"]
                    if not x.startswith("pip install")]
    exports = [x for x in server_lines if x.startswith("export ")]
    server_lines = [f"exec {x}" if x.startswith("mlflow server") else x for x in server_lines]
    log = open(machines["server"] / "server.log", "w")
    server = subprocess.Popen(["bash", "-c", script(server_lines)], cwd=machines["server"], env={**env, "HOME": str(machines["server"])},
                              stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    server.log_path = machines["server"] / "server.log"
    try:
        wait_http(f"{uri}/health", server, timeout=120)
        # the host name the README's workers use is allowed; another is refused (DNS rebinding protection)
        api = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert requests.get(api, headers={"Host": "tracking-host:5000"}, timeout=10).status_code == 401  # login needed
        assert requests.get(api, headers={"Host": "elsewhere.example:5000"}, timeout=10).status_code == 403
        admin = subprocess.run(["bash", "-c", script(exports + sections["admin"])], cwd=machines["server"], env=client_env,
                               capture_output=True, text=True, timeout=120)
        assert admin.returncode == 0, admin.stdout + admin.stderr

        grid, space = tmp_path / "grid.yaml", tmp_path / "space.yaml"
        grid.write_text(yaml.safe_dump({"name": "team", "models": ["model1"], "losses": ["ce"], "optimizers": ["adam", "sgd"],
                                        "lr": {"adam": 0.001, "sgd": 0.05}, "batch_size": 64, "epochs": 1, "seeds": [0]}))
        space.write_text(yaml.safe_dump({"name": "team-space", "seed_sd": 0.02, "fixed": {"model": "model1", "loss": "ce", "seed": 0},
                                         "search": {"optimizer": {"choices": ["adam", "rmsprop"]},
                                                    "lr": {"adam": {"low": 1e-3, "high": 3e-3}, "rmsprop": {"low": 5e-4, "high": 2e-3}}}}))
        worker_lines = [tiny(adapt(x, port, pg_port, Path()), grid, space) for x in sections["worker"] if not x.startswith("pip install")]
        workers = []
        for name in ("machine1", "machine2"):
            out = open(machines[name] / "worker.log", "w")
            workers.append(subprocess.Popen(["bash", "-c", script(worker_lines)], cwd=machines[name],
                                            env={**client_env, "HOME": str(machines[name])}, stdout=out,
                                            stderr=subprocess.STDOUT, text=True))
        for w in workers:
            w.wait(timeout=600)
        outputs = [(machines[n] / "worker.log").read_text() for n in ("machine1", "machine2")]
        assert [w.returncode for w in workers] == [0, 0], "\n=====\n".join(o[-4000:] for o in outputs)
        assert not any((machines[n] / "mlruns").exists() for n in ("machine1", "machine2"))  # artifacts through the server

        # what both machines did, read as the admin, through the same host name
        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD="admin-password-of-12+",
                          HTTP_PROXY=proxy_uri)
        mlflow.set_tracking_uri("http://tracking-host:5000")
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
        by_kind = {}
        for r in runs:
            by_kind.setdefault(r.data.tags.get(schema.TAG_KIND), []).append(r)
        points = [(r.data.tags[schema.TAG_CONFIG_HASH]) for r in by_kind[schema.KIND_SWEEP_CHILD] if r.info.status == "FINISHED"]
        assert len(points) == len(set(points)) >= 4  # 2 configs x seeds 0,1,2 (raced), each once
        assert len(by_kind[schema.KIND_TRIAL]) == 4  # --trials 2 on each machine
        # the confirm: the 2 best trials (and the grid's best, the search's warm start, when it is another
        # config) on seeds 1, 2, 3 (raced), each point once although both machines ran it
        confirmed = [(r.data.tags[schema.TAG_CONFIG_GROUP], r.data.params["seed"]) for r in by_kind[schema.KIND_CONFIRM]]
        assert len(confirmed) == len(set(confirmed)) and {s for _, s in confirmed} == {"1", "2", "3"}, confirmed
        assert {r.info.status for r in by_kind[schema.KIND_CONFIRM]} == {"FINISHED"}
        (search,) = by_kind[schema.KIND_SEARCH]
        champions = {line for o in outputs for line in o.splitlines() if line.startswith("champion: ")}
        assert len(champions) == 1 and search.data.tags[schema.TAG_CHAMPION_GROUP]

        # a third machine: register the confirmed champion and classify with it, as the team's login
        worker_env = {**client_env, "HOME": str(machines["machine3"])}
        worker_env.update(dict(kv.split("=", 1) for kv in shlex.split(worker_lines[0])[1:]))  # the worker's export
        from PIL import Image

        Image.new("L", (28, 28), 200).save(machines["machine3"] / "shirt.png")
        done = subprocess.run(["bash", "-c", script(sections["any"])], cwd=machines["machine3"], env=worker_env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        version = mlflow.MlflowClient().get_model_version_by_alias("fmnist-cnn", "champion")
        assert version.tags[schema.TAG_CONFIG_GROUP] == search.data.tags[schema.TAG_CHAMPION_GROUP]
        assert re.search(r"shirt\.png: \S+ \d\.\d{3}", done.stdout), done.stdout

        # a wrong password: one line naming the cause, non-zero, in seconds
        started = time.monotonic()
        wrong = subprocess.run(["fmnist", "train", "--subset", "300", "--epochs", "1"], cwd=machines["machine3"],
                               env={**worker_env, "MLFLOW_TRACKING_PASSWORD": "not-the-password"}, capture_output=True,
                               text=True, timeout=120)
        said = (wrong.stdout + wrong.stderr).strip().splitlines()
        assert wrong.returncode == 1 and len(said) == 1, said
        assert "HTTP 401" in said[0] and "refused the credentials given" in said[0] and time.monotonic() - started < 60
    finally:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "HTTP_PROXY"):
            os.environ.pop(key, None)
        mlflow.set_tracking_uri(None)
        proxy.shutdown()
        stop(server)
