#!/usr/bin/env bash
# The GPU checks as one prepared script, for a machine with a CUDA GPU (from the repository root, after
# scripts/setup.sh): first the tests that depend on the device (CUDA training, bf16 and what `auto`
# resolves to, two sweep workers sharing the GPU), then the report's grid at the new defaults (18 configs x
# 3 seeds, 10 epochs, all data, --precision auto) timed on the GPU with each of $JOBS (default "1 2 4") as
# --jobs, side by side (1 vs 2 and 4 workers per GPU on a one-GPU machine); the table also goes to $OUT/grid-jobs-cuda.md when $OUT is set. Without a GPU it
# runs the device tests (the CUDA ones skip and say so) and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
[ -x "$py" ] || py=python3

"$py" -c 'import torch; ok = torch.cuda.is_available()
print("torch", torch.__version__, "| CUDA:", torch.cuda.get_device_name(0) if ok else "none")
from fmnist_mlflow.training import hardware
print(hardware.describe("cuda" if ok else "cpu"))
if ok:  # --jobs auto: one worker per visible GPU, each pinned to its own
    print("visible GPUs:", hardware.cuda_devices(), "| --jobs auto ->", hardware.default_jobs("cuda", 18, 0),
          "| pinned:", hardware.worker_gpus("cuda", hardware.default_jobs("cuda", 18, 0)) or "one GPU, shared")'

"$py" -m pytest -q -p no:logging -rs tests/test_speed.py tests/test_train.py \
    "tests/test_cli.py::test_train_logs_everything_to_sqlite"

if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA device here: the grid timing needs one; done"
  exit 0
fi
# shellcheck disable=SC2086  # JOBS is a list of numbers
"$py" scripts/grid_jobs.py --device cuda --seeds grid --precision auto --jobs ${JOBS:-1 2 4} \
    --out "${OUT:-.}/grid-jobs-cuda.md"
