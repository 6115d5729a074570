#!/usr/bin/env bash
# Every GPU check in one command, on any machine with a CUDA or ROCm GPU:
#
#   bash tests/gpu_check.sh [DATA_DIR]
#
# installs the requirements into .venv (or uses the interpreter in $QML_GPU_PYTHON as it is), then runs
# the GPU tests (tests/test_gpu.py), a one-epoch smoke run on the GPU and `bench.py`, on DATA_DIR
# (default: a generated set of JPEGs with the ants/bees set's counts and image size).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${QML_GPU_PYTHON:-}
if [ -z "$py" ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q -r requirements.txt -r tests/requirements.txt
    py=.venv/bin/python
fi
"$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check.sh: no GPU visible to torch")'
data=${1:-}
if [ -z "$data" ]; then
    data=$(mktemp -d)/generated
    "$py" - "$data" <<'PY'
import sys

sys.path.insert(0, "tests")
from conftest import make_image_folder

counts = {"train": {"ants": 124, "bees": 121}, "val": {"ants": 70, "bees": 83}}
make_image_folder(sys.argv[1], counts, size=(375, 500))
PY
fi
set -x
"$py" -m pytest -ra tests/test_gpu.py
"$py" qml.py --data-dir "$data" --weights none --epochs 1 --device cuda --print-freq 0
"$py" bench.py --data-dir "$data"
