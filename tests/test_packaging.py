"""A wheel built from the repository works from another folder: the default grid and search space ship
inside the package."""

import subprocess
import sys

from conftest import cli_env


def test_a_non_editable_install_finds_its_grid_and_space_from_another_folder(tmp_path):
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(root),
                    "-w", str(wheels)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("fmnist_mlflow-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    env = cli_env(PYTHONPATH=str(site), MLFLOW_TRACKING_URI=f"sqlite:///{elsewhere / 'mlflow.db'}")
    check = ("import fmnist_mlflow, sys; from fmnist_mlflow.studies.grid import load_grid; from fmnist_mlflow.studies.space import "
             "load_space; assert fmnist_mlflow.__file__.startswith(sys.argv[1]), fmnist_mlflow.__file__; "
             "print(len(load_grid().configs(device='cpu')), load_space().name)")
    out = subprocess.run([sys.executable, "-c", check, str(site)], env=env, cwd=elsewhere, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["54", "model3-levers"]  # 18 configs x the grid file's 3 seeds
    # the search with its default space, run from that folder
    search = subprocess.run([sys.executable, "-m", "fmnist_mlflow", "search", "--trials", "1", "--subset", "300",
                             "--epochs", "1", "--device", "cpu"], env=env, cwd=elsewhere, capture_output=True,
                            text=True, timeout=600)
    assert search.returncode == 0, search.stdout[-2000:] + search.stderr[-2000:]
    assert "study model3-levers" in search.stdout
