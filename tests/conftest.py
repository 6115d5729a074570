"""Shared fixtures: tiny generated ImageFolder data sets, a quiet environment whose qml.py runs stay on the CPU
(GPUs hidden from them) even on a GPU machine, ports reserved for the session, and skips that fail under CI=true."""

import contextlib
import glob
import io
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QML = os.path.join(ROOT, "qml.py")
# qml.py, bench.py and the modules of machinery/ (README, "Layout"): what a copy of the program needs.
PROGRAM_FILES = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "machinery", "*.py")))


def copy_program(folder):
    """Copy the program (PROGRAM_FILES, machinery/ as a folder) into `folder`, as a user copies it to a cluster."""
    os.makedirs(os.path.join(folder, "machinery"), exist_ok=True)
    for path in PROGRAM_FILES:
        shutil.copy(path, os.path.join(folder, os.path.relpath(path, ROOT)))
sys.path.insert(0, ROOT)

# No launcher variables may leak into the tests' single-process runs, nor an OpenMP binding: qml.py
# itself must keep lightning.kokkos quiet without one.
for _var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
             "SLURM_STEP_NUM_TASKS", "SLURM_JOB_ID", "QML_DATA_DIR", "OMP_PROC_BIND", "OMP_PLACES"):
    os.environ.pop(_var, None)

IN_CI = os.environ.get("CI", "").lower() == "true"

# Hides every GPU, CUDA's and ROCm's, from a process. The processes of tests that expect a CPU run get it, so the
# suite stays a CPU suite on a machine with GPUs. This process keeps its GPUs: test_gpu.py runs in it, and its GPU
# runs are started with the environment as it is.
NO_GPUS = {"CUDA_VISIBLE_DEVICES": "", "HIP_VISIBLE_DEVICES": ""}


def cpu_env(**extra):
    """os.environ with the GPUs hidden (NO_GPUS), and `extra`."""
    return dict(os.environ, **NO_GPUS, **extra)


GPU_SPACES = ("Cuda", "HIP", "SYCL")  # Kokkos' execution spaces on a GPU
KOKKOS_SPACE_PROBE = ("import re, pennylane\n"
                      "from pennylane_lightning.lightning_kokkos_ops import print_configuration\n"
                      "pennylane.device('lightning.kokkos', wires=1).execute(pennylane.tape.QuantumScript(\n"
                      "    [pennylane.Hadamard(0)], [pennylane.expval(pennylane.PauliZ(0))]))  # starts Kokkos\n"
                      "config = print_configuration()\n"
                      "pool = re.search(r'thread_pool_topology\\[ (.*?) \\]', config)\n"
                      "space = re.search(r'Default Device: (\\S+)', config).group(1)\n"
                      "print(space, pool.group(1) if pool else '-', sep='\\t')\n")


def kokkos_build(env=None):
    """(default execution space, host thread pool or "-") of the installed lightning.kokkos, started by PennyLane
    alone in a fresh process with `env` (default: cpu_env()): OpenMP for PyPI's wheel, HIP on Frontier's build.
    Tests read it instead of assuming the wheel."""
    result = subprocess.run([sys.executable, "-c", KOKKOS_SPACE_PROBE], capture_output=True, text=True, timeout=300,
                            env=env or cpu_env())
    assert result.returncode == 0, result.stderr
    space, pool = result.stdout.splitlines()[-1].split("\t")
    return space, pool


def unavailable(reason):
    """Skip for `reason`, or fail under CI=true, where what is missing is there by design (.ci/run)."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: this test must run, not skip)", pytrace=False)
    pytest.skip(reason)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(missing): skip when `missing` (a reason) is set, but fail under "
                                       "CI=true, where every such test must run")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs"):
        if mark.args and mark.args[0]:
            unavailable(mark.args[0])


# README's test command runs the files in two pytest-xdist workers, a file to each at a time: the longest start
# first, so that the workers end together instead of one running the real Slurm jobs alone at the end.
LONGEST_FIRST = ("test_slurm.py", "test_faults.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST
               else len(LONGEST_FIRST))


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


def run_qml(*args, env=None, timeout=300, cwd=None, gpus=False):
    """Run qml.py in a fresh process, its GPUs hidden unless `gpus`; returns CompletedProcess with text output."""
    full_env = dict(os.environ, **({} if gpus else NO_GPUS), **(env or {}))
    return subprocess.run([sys.executable, QML, *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)


def start_ranks(world, argv):
    """qml.py as the `world` ranks of one gloo run on this host, started as a launcher would (RANK, LOCAL_RANK,
    WORLD_SIZE, MASTER_*), its GPUs hidden and one thread each: their Popens, with text output on pipes."""
    port = str(free_port())
    return [subprocess.Popen([sys.executable, QML, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=cpu_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                                                    MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1"))
            for rank in range(world)]


@pytest.fixture(autouse=True)
def restore_sigterm():
    """qml.main installs SIGTERM and SIGUSR1 handlers; give pytest its own back."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def run_main(program, argv):
    """program.main(argv) (qml or a copy) in this process, as one rank, as a CompletedProcess: for runs whose outcome
    needs no process of their own. A module fixture's run comes before restore_sigterm, so it restores them itself."""
    out, err = io.StringIO(), io.StringIO()
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = program.main(argv)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue())


_RESERVED_PORTS = []  # sockets that hold free_port()'s ports until the session ends


def free_port():
    """A TCP port of 127.0.0.1 kept for the caller until the session ends, for MASTER_PORT or a closed port.

    It stays bound here (SO_REUSEADDR, never listening), so no other bind() gets it, and a connection to it is
    refused until the process that uses it listens there: rank 0's rendezvous binds it itself (with SO_REUSEADDR
    too). A port picked free and released could be taken by another process before rank 0 binds it.
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    _RESERVED_PORTS.append(sock)
    return sock.getsockname()[1]


def ports_in_use():
    """Local TCP ports of every socket of this machine's network namespace (IPv4 and IPv6), as /proc lists them."""
    used = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as file:
                rows = file.read().splitlines()[1:]
        except OSError:
            continue
        used.update(int(row.split()[1].rsplit(":", 1)[1], 16) for row in rows)
    return used


def free_port_block(count, low, high):
    """The first port of `count` consecutive ports in low..high-1 that no socket uses now, searched from a place
    of this process's own (parallel sessions start apart): for daemons that bind fixed ports (test Slurm)."""
    used, span = ports_in_use(), high - low - count + 1
    for step in range(span):
        first = low + (os.getpid() * count + step) % span
        if not used.intersection(range(first, first + count)):
            return first
    raise RuntimeError(f"no {count} free consecutive ports in {low}..{high - 1}")


def assert_ranks_agree(metrics):
    """Every rank of a run (its metrics JSON) ended with the same dressed head and the same buffers."""
    ranks = metrics["ranks"]
    assert [rank["rank"] for rank in ranks] == list(range(metrics["world_size"])), ranks
    for digest in ("head_sha256", "buffers_sha256"):
        assert len({rank[digest] for rank in ranks}) == 1 and len(ranks[0][digest]) == 64, (digest, ranks)


def one_stderr_line(stderr):
    """The single non-empty stderr line, after checking there is exactly one and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]
