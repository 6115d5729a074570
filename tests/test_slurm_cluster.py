"""tests/slurm_cluster.sh itself, without Slurm: `start` refuses ports that another program listens on, before it
starts any daemon (the Slurm tests then fail naming the port, not on a daemon that could not bind it).

The Slurm commands are fakes on PATH that record any call: none may run.
"""

import os
import socket
import subprocess

import pytest
from conftest import ROOT

CLUSTER = os.path.join(ROOT, "tests", "slurm_cluster.sh")
SLURM_COMMANDS = ("slurmctld", "slurmd", "munged", "munge", "unmunge", "mungekey", "sbatch", "srun", "sinfo",
                  "scontrol", "squeue", "scancel")


@pytest.mark.parametrize("daemon, offset", [("slurmctld", 0), ("slurmd", 1)])
def test_start_refuses_a_port_in_use_and_starts_no_daemon(tmp_path, daemon, offset):
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for name in SLURM_COMMANDS:
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\nexit 1\n')
        (bin_dir / name).chmod(0o755)
    with socket.create_server(("127.0.0.1", 0)) as busy:  # another program, listening
        port = busy.getsockname()[1]
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", QML_SLURM_DIR=str(tmp_path / "state"),
                   QML_SLURM_PORT=str(port - offset), QML_SLURM_NODES="1")
        result = subprocess.run(["bash", CLUSTER, "start"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert f"port {port} " in result.stderr and "QML_SLURM_PORT" in result.stderr, result.stderr
    assert not calls.exists(), calls.read_text()  # no daemon was started
