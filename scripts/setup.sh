#!/usr/bin/env bash
# Set up everything fmnist-mlflow needs on a fresh Debian-like machine (Python 3.11, root or sudo):
# the Fashion-MNIST files from Debian's dataset-fashion-mnist (when apt is available), PostgreSQL for the
# multi-worker tests, a virtual environment in .venv with the package and its dev extras, and .venv-clean
# with only torch and mlflow (a user's machine that loads the registered model).
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=()
[ -d /usr/share/datasets/fashion-mnist ] || apt_packages+=(dataset-fashion-mnist)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_packages+=(postgresql)
if [ ${#apt_packages[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'

# A second environment with nothing but torch and mlflow (the versions of .venv; a second torch, several GB
# where pip has no cached wheel): where a user loads the registered champion without this package
# (tests/test_registry.py runs MLflow's evaluate in it). Made again when .venv's versions change.
versions=$(.venv/bin/python -c "from importlib.metadata import version as v; print(f'torch=={v(\"torch\")} mlflow=={v(\"mlflow\")}')")
if [ "$(cat .venv-clean/versions 2>/dev/null)" != "$versions" ]; then
  rm -rf .venv-clean
  .venv/bin/python -m venv .venv-clean
  .venv-clean/bin/python -m pip install -q $versions
  echo "$versions" > .venv-clean/versions
fi
echo "setup done: activate with '. .venv/bin/activate'"
