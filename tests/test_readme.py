"""The README's commands as written: every `mlflow run` line of its bash blocks runs, in README order, in a
fresh copy of the project (the stores land in it, as they do for a user), made tiny by `-P subset=...
-P epochs=1` (and `-P jobs=1` where an entry point starts workers: on a test's two cores, two worker
processes per command only add their start-up; a command's own workers are tested in tests/test_workers.py
and tests/test_search.py) and nothing else. A README command can no longer break without a red test."""

import itertools
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import mlflow
import optuna

from conftest import VENV_BIN, cli_env
from fmnist_mlflow import schema

ROOT = Path(__file__).resolve().parents[1]
TINY = {"subset": "300", "epochs": "1"}  # what makes a README command a test; nothing else is changed...
ENTRY_POINTS_WITH_DATA = ("main", "sweep", "train", "search")  # register reads runs, it trains nothing
ENTRY_POINTS_WITH_WORKERS = ("main", "sweep", "search")  # ... but -P jobs=1 for these


def readme_commands() -> list:
    """Every `mlflow run ...` in the README's ```bash blocks, in order, as written (without a leading
    `bash scripts/setup.sh && ... &&`, which is the set-up the test environment has already done)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if "mlflow run " in line:
                commands.append(line[line.index("mlflow run "):])
    return commands


def tiny(command: str) -> list:
    args = shlex.split(command)
    entry = args[args.index("-e") + 1] if "-e" in args else "main"
    if entry in ENTRY_POINTS_WITH_DATA:
        tiny = {**TINY, **({"jobs": "1"} if entry in ENTRY_POINTS_WITH_WORKERS else {})}
        args = [a for i, a in enumerate(args)
                if not (a.split("=")[0] in tiny and args[i - 1] == "-P") and not (a == "-P" and args[i + 1].split("=")[0] in tiny)]
        for key, value in tiny.items():
            args += ["-P", f"{key}={value}"]
    return [f"{VENV_BIN}/mlflow", *args[1:]]


def fresh_copy(tmp_path) -> Path:
    """The project as a fresh clone has it: no stores, no venv, no build output."""
    return Path(shutil.copytree(ROOT, tmp_path / "fmnist-mlflow", ignore=shutil.ignore_patterns(
        ".git", ".venv", ".venv-clean", "mlruns", "mlartifacts", "*.db", "build", "*.egg-info", "__pycache__", ".pytest_cache")))


def test_readme_lists_the_main_job_and_every_entry_point():
    commands = readme_commands()
    assert commands[0] == "mlflow run . --env-manager local --experiment-name fmnist"  # the quick start
    entry_points = {shlex.split(c)[shlex.split(c).index("-e") + 1] if " -e " in c else "main" for c in commands}
    assert entry_points == {"main", "train", "search", "register"}


def test_every_readme_mlflow_run_command_runs_as_written_in_a_fresh_copy(tmp_path):
    project = fresh_copy(tmp_path)
    env = cli_env()
    env.pop("MLFLOW_TRACKING_URI", None)  # MLflow's default: ./mlflow.db in the project folder, as for a user
    for command in readme_commands():
        proc = subprocess.run(tiny(command), cwd=project, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{command}\n{(proc.stdout + proc.stderr)[-4000:]}"
        assert "Traceback" not in proc.stdout + proc.stderr, command
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    try:
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
        assert not [r for r in runs if r.info.status != "FINISHED"]  # no FAILED start, nothing RUNNING
        assert {mlflow.get_experiment(r.info.experiment_id).name for r in runs} == {"fmnist"}
        grids = [r for r in runs if r.data.tags.get(schema.TAG_KIND) == "sweep"]
        (main,) = [g for g in grids if g.data.params["seeds"] == "grid"]
        # `mlflow run` logged seeds=grid on the run that became the parent; the seeds used stand beside it
        assert main.data.params["seeds_resolved"] == "0,1,2" and main.data.tags[schema.TAG_RACE] == "on"
        assert "Best by mean val_accuracy" in main.data.tags["mlflow.note.content"]
        (one_seed,) = [g for g in grids if g is not main]
        assert one_seed.data.params["seeds"] == "0" and one_seed.data.tags[schema.TAG_RACE] == "off"
        # the report's grid whole: every model x loss x optimizer once, each run FINISHED under its parent
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == one_seed.info.run_id]
        combos = {(c.data.params["model"], c.data.params["loss"], c.data.params["optimizer"]) for c in children}
        assert combos == set(itertools.product(["model1", "model2", "model3"], ["ce", "bce"], ["adam", "sgd", "rmsprop"]))
        assert len(children) == 18 and one_seed.data.params["configs"] == "18"
        # the main job's second run resumed the first: its run is a launcher pointing at the parent
        launchers = [r for r in runs if r.data.tags.get(schema.TAG_KIND) == schema.KIND_LAUNCHER]
        assert [r.data.tags[schema.TAG_PARENT] for r in launchers if r.data.tags[schema.TAG_PARENT] in
                {g.info.run_id for g in grids}] == [main.info.run_id]
        assert [r for r in runs if r.data.tags.get(schema.TAG_KIND) == "search"]
        version = mlflow.MlflowClient().get_model_version_by_alias("fmnist-cnn", "champion")
        assert version.tags[schema.VERSION_SOURCE_RUN] in {r.info.run_id for r in runs}
        # `mlflow run -e register` made a run; it points at the registered run instead of standing empty
        assert version.tags[schema.VERSION_SOURCE_RUN] in {r.data.tags[schema.TAG_PARENT] for r in launchers}
    finally:
        mlflow.set_tracking_uri(None)
    studies = optuna.get_all_study_summaries(f"sqlite:///{project / 'optuna.db'}")
    assert all(s.user_attrs.get(schema.ATTR_PARENT) for s in studies)  # no half-made study left behind


def test_search_and_register_entry_points_without_experiment_name_land_in_fmnist(tmp_path):
    """Without --experiment-name `mlflow run` makes its run in Default: each entry point leaves it there as
    a launcher pointing at the work, which lands in experiment fmnist (main and train: tests/test_sweep.py,
    tests/test_cli.py)."""
    project = fresh_copy(tmp_path)
    env = cli_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    # a model1 space: what is tested is where the runs land, and the registered model is evaluated on the
    # 10,000 test images (model3 at 1.5x width with its mirrored pass takes 20 s of one core there)
    import yaml

    (project / "tiny-space.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "metric": "val_accuracy", "fixed": {"model": "model1", "loss": "ce", "seed": 0},
        "search": {"optimizer": {"choices": ["adam"]}, "lr": {"adam": {"low": 1e-3, "high": 3e-3, "log": True}}}}))
    for command in ("mlflow run . -e search --env-manager local -P trials=2 -P pruner=none -P space=tiny-space.yaml",
                    "mlflow run . -e register --env-manager local"):
        proc = subprocess.run(tiny(command), cwd=project, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{command}\n{(proc.stdout + proc.stderr)[-4000:]}"
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    try:
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
        assert not [r for r in runs if r.info.status != "FINISHED"]
        launchers = [r for r in runs if r.data.tags.get(schema.TAG_KIND) == schema.KIND_LAUNCHER]
        assert len(launchers) == 2 and {r.info.experiment_id for r in launchers} == {"0"}
        work = [r for r in runs if r not in launchers]
        assert work and {mlflow.get_experiment(r.info.experiment_id).name for r in work} == {"fmnist"}
        (search,) = [r for r in work if r.data.tags.get(schema.TAG_KIND) == "search"]
        version = mlflow.MlflowClient().get_model_version_by_alias("fmnist-cnn", "champion")
        assert sorted(r.data.tags[schema.TAG_PARENT] for r in launchers) == \
            sorted([search.info.run_id, version.tags[schema.VERSION_SOURCE_RUN]])
    finally:
        mlflow.set_tracking_uri(None)
