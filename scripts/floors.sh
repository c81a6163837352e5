#!/usr/bin/env bash
# Do the declared dependency floors hold? A fresh virtual environment with every dependency of
# pyproject.toml at exactly its floor (`>=X` installed as `==X`; what they need beyond that at pip's choice),
# then, in an empty folder, a tiny sweep on sqlite, a tiny search with its confirm on a journal file, and
# `fmnist register`. Exit 0 when all ran; the venv is left for a look.
#
#     bash scripts/floors.sh [VENV_DIR]      # default /tmp/fmnist-floors
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
venv=${1:-/tmp/fmnist-floors}
python=${PYTHON:-python3}

rm -rf "$venv"
"$python" -m venv "$venv"
mapfile -t floors < <("$python" - <<'EOF'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for dep in deps:
    name, floor = re.match(r"([A-Za-z0-9_.\[\]-]+)>=([0-9.]+)", dep).groups()
    print(f"{name}=={floor}")
EOF
)
echo "floors: ${floors[*]}"
"$venv/bin/python" -m pip install -q "${floors[@]}"
"$venv/bin/python" -m pip install -q --no-deps -e "$repo"
"$venv/bin/python" -m pip list 2>/dev/null | grep -iE '^(torch|torchvision|mlflow|optuna|click|matplotlib|pyyaml|scipy|psutil|filelock|pydantic|numpy|sqlalchemy) '

work=$(mktemp -d)
cd "$work"
cat > grid.yaml <<'EOF'
name: floors
models: [model1]
losses: [ce]
optimizers: [adam, sgd]
lr: {adam: 0.001, sgd: 0.05}
batch_size: 64
epochs: 1
seeds: [0, 1]
EOF
cat > space.yaml <<'EOF'
name: floors-space
fixed: {model: model1, loss: ce, seed: 0}
search:
  optimizer: {choices: [adam, rmsprop]}
  lr: {adam: {low: 0.001, high: 0.003}, rmsprop: {low: 0.0005, high: 0.002}}
EOF
fmnist="$venv/bin/fmnist"
"$fmnist" sweep --grid grid.yaml --subset 300 --epochs 1 --threads 1 --storage sqlite:///optuna.db
"$fmnist" search --space space.yaml --subset 300 --epochs 1 --threads 1 --trials 3 --pruner none --confirm 2 --seeds 2 \
    --storage "journal:$work/journal.log"
"$fmnist" register
echo "floors hold: ${floors[*]} (in $venv; runs in $work)"
