#!/usr/bin/env bash
# Every GPU check in one command, on any machine with a CUDA or ROCm GPU:
#
#   bash tests/gpu_check.sh [DATA_DIR]
#
# runs the GPU tests (tests/test_gpu.py), a one-epoch smoke run on the GPU and `bench.py`, on DATA_DIR
# (default: a generated set of JPEGs with the ants/bees set's counts and image size).
#
# The interpreter: $QML_GPU_PYTHON as it is; else the first of .venv-gpu, .venv and python3 whose torch
# already sees a GPU, with the other requirements installed beside it and its torch (and torchvision) kept:
# a ROCm machine keeps its ROCm torch (PyPI's torch is a CUDA build: installed over it, the GPU is gone).
# A python3 outside a virtual environment gets one on top of it (.venv-gpu, --system-site-packages), so that
# pip leaves its packages alone. Only where no torch sees a GPU and nvidia-smi lists one is torch taken from
# PyPI (.venv-gpu); otherwise the script stops and says what to install.
#
# The GPUs are those CUDA_VISIBLE_DEVICES, HIP_VISIBLE_DEVICES or ROCR_VISIBLE_DEVICES leave visible (as
# Slurm sets them); the runs take the first visible one, whichever physical GPU that is.
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
    echo "gpu_check.sh: $*" >&2
    exit 1
}

sees_gpu() { # python
    "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}

# Install the requirements into python's environment, keeping the torch and torchvision it has.
install_beside_torch() { # python
    local pins
    pins=$(mktemp)
    "$1" - >"$pins" <<'PY'
from importlib import metadata

for name in ("torch", "torchvision"):
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
PY
    "$1" -m pip install -q -c "$pins" -r requirements.txt -r tests/requirements.txt
    rm -f "$pins"
}

py=${QML_GPU_PYTHON:-}
if [ -n "$py" ]; then
    sees_gpu "$py" || die "QML_GPU_PYTHON=$py: its torch sees no GPU (torch.cuda.is_available() is False)"
else
    base=""
    for candidate in .venv-gpu/bin/python .venv/bin/python "$(command -v python3 || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] && sees_gpu "$candidate"; then
            base=$candidate
            break
        fi
    done
    if [ -n "$base" ]; then
        py=$base
        if [ "$("$base" -c 'import sys; print(sys.prefix != sys.base_prefix)')" = False ]; then
            "$base" -m venv --system-site-packages .venv-gpu # its torch stays visible, and untouched
            py=.venv-gpu/bin/python
        fi
        echo "gpu_check.sh: using $py, whose torch sees a GPU ($("$py" -c 'import torch; print(torch.__version__)'))" >&2
        install_beside_torch "$py"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu_check.sh: no torch here sees the NVIDIA GPU; installing PyPI's (a CUDA build) into .venv-gpu" >&2
        python3 -m venv .venv-gpu
        .venv-gpu/bin/pip install -q -r requirements.txt -r tests/requirements.txt
        py=.venv-gpu/bin/python
    else
        die "no torch here sees a GPU: on a ROCm machine activate an environment whose torch is a ROCm build" \
            "(or install one: https://pytorch.org/get-started/locally/), then run again, or set QML_GPU_PYTHON"
    fi
fi
"$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check.sh: no GPU visible to torch")'
"$py" -c 'import torch; print("gpu_check.sh: torch", torch.__version__, "on", torch.cuda.get_device_name(0),
      "(HIP " + torch.version.hip + ")" if torch.version.hip else "(CUDA " + str(torch.version.cuda) + ")",
      "| GPUs visible:", torch.cuda.device_count())' >&2
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
