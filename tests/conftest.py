"""Shared fixtures: tiny generated ImageFolder data sets and a quiet, CPU-only environment."""

import glob
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QML = os.path.join(ROOT, "qml.py")
# qml.py and the modules beside it (README, "Layout"): what a copy of the program needs.
PROGRAM_FILES = sorted(glob.glob(os.path.join(ROOT, "*.py")))
sys.path.insert(0, ROOT)

# No launcher variables may leak into the tests' single-process runs, nor an OpenMP binding: qml.py
# itself must keep lightning.kokkos quiet without one.
for _var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
             "SLURM_STEP_NUM_TASKS", "SLURM_JOB_ID", "QML_DATA_DIR", "OMP_PROC_BIND", "OMP_PLACES"):
    os.environ.pop(_var, None)


def make_image_folder(root, counts, size=(40, 48), seed=0):
    """Write random RGB JPEGs: counts = {split: {class: n}}. Returns root."""
    rng = np.random.default_rng(seed)
    for split, classes in counts.items():
        for name, n in classes.items():
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i}.jpg"))
    return str(root)


TINY_COUNTS = {"train": {"ants": 6, "bees": 6}, "val": {"ants": 5, "bees": 4}}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """12 training and 9 validation images of two classes."""
    return make_image_folder(tmp_path_factory.mktemp("tiny"), TINY_COUNTS)


def run_qml(*args, env=None, timeout=300, cwd=None):
    """Run qml.py in a fresh process; returns CompletedProcess with text output."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, QML, *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)


@pytest.fixture(autouse=True)
def restore_sigterm():
    """qml.main installs SIGTERM and SIGUSR1 handlers; give pytest its own back."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_stderr_line(stderr):
    """The single non-empty stderr line, after checking there is exactly one and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]
