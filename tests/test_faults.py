"""Faults: a dying or killed rank, an unreachable rendezvous, SIGTERM/SIGKILL and resume (one rank and two),
full disks, images that go bad mid-run, and safe downloads.

Faults are injected by a wrapper script (WRAPPER) that imports qml, wraps DressedQuantumNet.forward to
count its calls, and at a chosen call (FAULT_AT_CALL: one number, or one per rank) of the chosen rank
(FAULT_RANK: a rank, or "all") raises, deletes or truncates an image, or waits for the test to send a signal;
so the fault always lands at the same point of training (e.g. mid-epoch 2, after epoch 1's checkpoint).
The wrapper also prints "WROTE <path>" after each checkpoints.atomic_write, to show which rank writes files,
and after main how many DDP wrappers are still alive. The runs that are resumed use a StepLR schedule that
decays within the run (SCHEDULE), so a resume that lost the scheduler's place would end elsewhere.
"""

import builtins
import contextlib
import errno
import functools
import http.server
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile

import pytest
import torch
from conftest import QML, ROOT, TINY_COUNTS, assert_ranks_agree, cpu_env, free_port, one_stderr_line, run_main, run_qml
from PIL import Image

from machinery import checkpoints, command_line, images
import qml

BASE = ["--weights", "none", "--qdevice", "torch", "--workers", "0", "--print-freq", "0", "--device", "cpu"]
# The learning rate decays after epoch 2 of 3: a resume from epoch 1's checkpoint must restore the scheduler's
# place (an unrestored StepLR would count epochs from the resume and not decay within the run).
SCHEDULE = ["--step-size", "2", "--gamma", "0.1"]
HANG_GUARD = 300  # seconds: a run that takes longer is stuck, not slow, even on a loaded 2-core machine
# The tiny data set: 12 training and 9 validation images, batch 4 -> 3 + 3 head calls per epoch.
FIRST_CALL_OF_EPOCH_2 = 7


def first_call_of_epoch_2(rank, world):
    """The head call that starts epoch 2 on `rank` of `world` ranks, batch 4: after epoch 1's training batches
    (its share of the padded shuffle) and validation batches (images rank, rank + world, ...)."""
    n_train, n_val = sum(TINY_COUNTS["train"].values()), sum(TINY_COUNTS["val"].values())
    return math.ceil(math.ceil(n_train / world) / 4) + math.ceil(len(range(rank, n_val, world)) / 4) + 1

WRAPPER = f"""
import gc, os, signal, sys, time
sys.path.insert(0, {ROOT!r})
from machinery import checkpoints
import qml
from torch.nn.parallel import DistributedDataParallel

forward, calls = qml.DressedQuantumNet.forward, [0]


def fault_injecting_forward(self, inputs):
    calls[0] += 1
    rank = int(os.environ.get("RANK", "0"))
    here = os.environ.get("FAULT_RANK", "0") in ("all", str(rank))
    at = os.environ.get("FAULT_AT_CALL", "0").split(",")  # one call for every rank, or one per rank
    if here and calls[0] == int(at[min(rank, len(at) - 1)]):
        fault = os.environ["FAULT"]
        if fault == "raise":
            raise RuntimeError("injected fault")
        if fault == "delete":
            os.remove(os.environ["FAULT_FILE"])
        elif fault == "truncate":
            os.truncate(os.environ["FAULT_FILE"], os.path.getsize(os.environ["FAULT_FILE"]) // 2)
        elif fault == "usr1":  # Slurm's wall-time warning, mid-batch; training goes on to the batch's end
            os.kill(os.getpid(), signal.SIGUSR1)
        else:
            print("FAULT: waiting for a signal", flush=True)
            time.sleep(600)
    return forward(self, inputs)


atomic_write = checkpoints.atomic_write


def logging_atomic_write(path, write):
    atomic_write(path, write)
    print(f"WROTE {{path}}", flush=True)


qml.DressedQuantumNet.forward = fault_injecting_forward
checkpoints.atomic_write = logging_atomic_write
try:
    sys.exit(qml.main(sys.argv[1:]))
finally:
    alive = sum(type(obj) is DistributedDataParallel for obj in gc.get_objects())
    print(f"DDP wrappers alive after main: {{alive}}", flush=True)
"""


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory):
    path = tmp_path_factory.mktemp("wrapper") / "fault_wrapper.py"
    path.write_text(WRAPPER)
    return str(path)


def start(command, env, out_dir, name):
    """Popen with stdout/stderr in files (a killed process must not block on a full pipe)."""
    out, err = open(out_dir / f"{name}.out", "w"), open(out_dir / f"{name}.err", "w")
    with out, err:
        return subprocess.Popen(command, env=cpu_env(**env), stdout=out, stderr=err)


def finish(proc, out_dir, name, timeout=HANG_GUARD):
    """Wait (bounded) for a process from start(); returns (status, stdout, stderr)."""
    try:
        status = proc.wait(timeout=timeout)
    finally:
        proc.kill()
    return status, (out_dir / f"{name}.out").read_text(), (out_dir / f"{name}.err").read_text()


# ----------------------------------------------------------------------------
# Ranks


def start_two_ranks(wrapper, data, out_dir, *extra, **fault):
    """Both ranks of a gloo run of the wrapper (1 epoch unless extra says), --checkpoint run.pt, one thread each."""
    env = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", **fault)
    argv = [sys.executable, wrapper, "--data-dir", data, *BASE, "--epochs", "1", "--dist-timeout", "30",
            "--checkpoint", str(out_dir / "run.pt"), *extra]
    return [start(argv, dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), out_dir, f"rank{rank}") for rank in range(2)]


@pytest.fixture(scope="module")
def rank_1_raises(tiny_data, wrapper, tmp_path_factory):
    """Rank 1 raises in its second forward; returns [(status, stdout, stderr)] of ranks 0 and 1, and the folder."""
    tmp = tmp_path_factory.mktemp("raises")
    procs = start_two_ranks(wrapper, tiny_data, tmp, FAULT="raise", FAULT_RANK="1", FAULT_AT_CALL="2")
    return [finish(proc, tmp, f"rank{rank}") for rank, proc in enumerate(procs)], tmp


def test_rank_that_raises_exits_1_with_its_own_error(rank_1_raises):
    (_, (status, _, stderr)), _ = rank_1_raises
    assert status == 1, stderr  # not SIGABRT from a DDP wrapper outliving the process group
    assert "RuntimeError: injected fault" in stderr and "is gone" not in stderr


def test_rank_whose_peer_raised_exits_1_with_one_line_naming_it(rank_1_raises):
    ((status, _, stderr), _), tmp = rank_1_raises
    assert status == 1, stderr
    line = one_stderr_line(stderr)
    assert "rank 0: rank 1 is gone" in line and "its own output" in line
    assert f"--resume {tmp / 'run.pt'}" in line


def test_wall_time_warning_to_one_rank_stops_both_between_the_same_batches(tiny_data, wrapper, tmp_path):
    # srun passes the warning to every task, but not at the same instant: the ranks agree before stopping.
    # Rank 1 of two: 6 training images (2 batches) and 4 validation images (1 batch) an epoch; call 4 is epoch 2's.
    procs = start_two_ranks(wrapper, tiny_data, tmp_path, "--epochs", "3", FAULT="usr1", FAULT_RANK="1",
                            FAULT_AT_CALL="4")
    for rank, proc in enumerate(procs):
        status, _, stderr = finish(proc, tmp_path, f"rank{rank}")
        assert status == 75, (rank, stderr)  # none left waiting in a collective
        assert "request in epoch 2, between batches" in one_stderr_line(stderr), rank
    saved = torch.load(tmp_path / "run.pt", map_location="cpu", weights_only=True)
    assert saved["state"]["epoch"] == 1


def test_ranks_stopped_by_an_error_free_ddp_before_python_exits(rank_1_raises):
    results, _ = rank_1_raises
    for rank, (_, stdout, _) in enumerate(results):
        assert "DDP wrappers alive after main: 0" in stdout, rank


def wait_for_fault(proc, out_dir, name):
    """Wait (bounded) until the wrapper in `proc` says it waits for a signal."""
    deadline = time.monotonic() + HANG_GUARD
    while "FAULT: waiting" not in (out_dir / f"{name}.out").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, (out_dir / f"{name}.err").read_text()
        time.sleep(0.1)


def test_rank_whose_peer_was_killed_exits_1_with_one_line_naming_it(tiny_data, wrapper, tmp_path):
    rank0, rank1 = start_two_ranks(wrapper, tiny_data, tmp_path, FAULT="wait", FAULT_RANK="0", FAULT_AT_CALL="2")
    wait_for_fault(rank0, tmp_path, "rank0")
    rank0.kill()
    status, _, stderr = finish(rank1, tmp_path, "rank1")
    finish(rank0, tmp_path, "rank0")
    assert status == 1, stderr
    line = one_stderr_line(stderr)
    assert "rank 1: rank 0 is gone" in line and f"--resume {tmp_path / 'run.pt'}" in line


@pytest.fixture(scope="module")
def two_rank_run(tiny_data, wrapper, tmp_path_factory):
    """A 3-epoch run of 2 ranks with --checkpoint and SCHEDULE, uninterrupted: ([(status, stdout, stderr)] of
    ranks 0 and 1, checkpoint, metrics JSON path)."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    procs = start_two_ranks(wrapper, tiny_data, tmp, "--epochs", "3", *SCHEDULE, "--metrics-json",
                            str(tmp / "metrics.json"))
    return [finish(proc, tmp, f"rank{rank}") for rank, proc in enumerate(procs)], tmp / "run.pt", tmp / "metrics.json"


def test_only_rank_0_writes_the_checkpoint_after_every_epoch(two_rank_run):
    results, checkpoint, metrics = two_rank_run
    assert [status for status, _, _ in results] == [0, 0], results
    writes = [[line for line in stdout.splitlines() if line.startswith("WROTE")] for _, stdout, _ in results]
    assert writes == [[f"WROTE {checkpoint}"] * 3 + [f"WROTE {metrics}"], []]
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["state"]["epoch"] == 3


def test_checkpoint_records_the_number_of_ranks_of_every_epoch(two_rank_run):
    _, checkpoint, _ = two_rank_run
    history = torch.load(checkpoint, map_location="cpu", weights_only=True)["state"]["history"]
    assert [record["world_size"] for record in history] == [2, 2, 2]


def test_resume_on_another_number_of_ranks_exits_2_with_one_line(capfd, tiny_data, two_rank_run):
    _, checkpoint, _ = two_rank_run
    status = qml.main(["--data-dir", tiny_data, *BASE, *SCHEDULE, "--epochs", "4", "--resume", str(checkpoint)])
    out, err = capfd.readouterr()
    assert status == 2, err
    assert "Training started" not in out
    line = one_stderr_line(err)
    assert f"--resume {checkpoint}" in line and "had 2 rank(s), this one has 1" in line
    assert "--resume-any-world-size" in line


def test_resume_any_world_size_goes_on_and_the_metrics_record_each_epochs_ranks(tiny_data, two_rank_run, tmp_path):
    _, checkpoint, _ = two_rank_run
    metrics = tmp_path / "metrics.json"
    assert qml.main(["--data-dir", tiny_data, *BASE, *SCHEDULE, "--epochs", "4", "--resume", str(checkpoint),
                     "--resume-any-world-size", "--metrics-json", str(metrics)]) == 0
    report = json.loads(metrics.read_text())
    assert [(record["epoch"], record["world_size"]) for record in report["epochs"]] == [(1, 2), (2, 2), (3, 2),
                                                                                        (4, 1)]
    assert report["config"]["resume_any_world_size"] is True


def test_resume_of_a_finished_run_says_so_and_exits_0_without_training(capfd, tiny_data, two_rank_run, tmp_path):
    """A run stopped after its last checkpoint, before its metrics JSON, resumed: it trains nothing and writes the
    JSON the run would have written, from the checkpoint (--resume-any-world-size: the run had 2 ranks, this 1)."""
    _, checkpoint, metrics = two_rank_run
    before = checkpoint.read_bytes()
    status = qml.main(["--data-dir", tiny_data, *BASE, *SCHEDULE, "--epochs", "3", "--resume", str(checkpoint),
                       "--resume-any-world-size", "--checkpoint", str(checkpoint), "--metrics-json",
                       str(tmp_path / "metrics.json")])
    out, err = capfd.readouterr()
    assert status == 0, err
    assert f"--resume {checkpoint}: this run is finished (3 epochs trained, --epochs 3)" in out
    assert "Training started" not in out and "Training completed" not in out
    assert checkpoint.read_bytes() == before
    written, whole = json.loads((tmp_path / "metrics.json").read_text()), json.loads(metrics.read_text())
    assert written["complete"] is True and written["resumed"] == whole["resumed"] == 0
    for key in ("epochs", "best_val_acc", "best_val_loss", "best_train_acc", "best_train_loss", "batch_size"):
        assert written[key] == whole[key], key
    assert 0 <= whole["training_seconds"] - written["training_seconds"] < 1  # the checkpoint's, at its last epoch
    for digest in ("head_sha256", "buffers_sha256"):
        assert written["ranks"][0][digest] == whole["ranks"][0][digest] == whole["ranks"][1][digest], digest


def test_resume_of_a_finished_run_on_another_number_of_ranks_writes_no_metrics_json(capfd, tiny_data, two_rank_run,
                                                                                    tmp_path):
    # Its JSON records this run's ranks: as many as the checkpoint's, unless --resume-any-world-size.
    _, checkpoint, _ = two_rank_run
    status = qml.main(["--data-dir", tiny_data, *BASE, *SCHEDULE, "--epochs", "3", "--resume", str(checkpoint),
                       "--metrics-json", str(tmp_path / "metrics.json")])
    _, err = capfd.readouterr()
    assert status == 2 and "had 2 rank(s), this one has 1" in one_stderr_line(err)
    assert not (tmp_path / "metrics.json").exists()


# Seconds within which a lonely rank with --dist-timeout 3 must be done: far less than the default timeout
# (300 s), far more than the 3 s with imports and torch's rounding up on a loaded 2-core machine.
LONELY_RANK_GUARD = 150


@pytest.fixture(scope="module")
def rendezvous_failures(tiny_data, tmp_path_factory):
    """Three lonely ranks at once, --dist-timeout 3: rank 0 of 2 with no peer, rank 1 of 2 whose MASTER_PORT is
    closed (held by free_port, listened to by nobody), rank 0 of 2 whose MASTER_ADDR names no host.

    Each must be done within LONELY_RANK_GUARD seconds.
    """
    tmp = tmp_path_factory.mktemp("rendezvous")
    cases = {"rank0-alone": ("0", "127.0.0.1"), "rank1-no-master": ("1", "127.0.0.1"),
             "rank0-unknown-host": ("0", "no-such-host.invalid")}
    procs = {name: start([sys.executable, QML, "--data-dir", tiny_data, *BASE, "--epochs", "1",
                          "--dist-timeout", "3"],
                         dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE="2", MASTER_ADDR=addr,
                              MASTER_PORT=str(free_port())), tmp, name)
             for name, (rank, addr) in cases.items()}
    return {name: finish(proc, tmp, name, timeout=LONELY_RANK_GUARD) for name, proc in procs.items()}


def test_rank_0_without_its_peers_exits_2_with_one_line_after_dist_timeout(rendezvous_failures):
    status, _, stderr = rendezvous_failures["rank0-alone"]
    assert status == 2, stderr
    line = one_stderr_line(stderr)
    assert "rank 0: cannot join the process group" in line and "within 3s" in line
    assert "MASTER_ADDR/MASTER_PORT" in line and "all 2 ranks started" in line


def test_master_addr_that_names_no_host_exits_2_with_one_line(rendezvous_failures):
    status, _, stderr = rendezvous_failures["rank0-unknown-host"]
    assert status == 2, stderr
    line = one_stderr_line(stderr)
    assert "MASTER_ADDR=no-such-host.invalid" in line and "rank 0's host name" in line


def test_rank_1_with_unreachable_master_exits_2_with_one_line_after_dist_timeout(rendezvous_failures):
    status, _, stderr = rendezvous_failures["rank1-no-master"]
    assert status == 2, stderr
    line = one_stderr_line(stderr)
    assert "rank 1: nothing answers at 127.0.0.1:" in line and "within 3s" in line
    assert "MASTER_ADDR/MASTER_PORT" in line


# ----------------------------------------------------------------------------
# Checkpoints, signals and resume


def metrics_run(data, metrics, *extra):
    """Train 3 epochs with SCHEDULE in this process, as the interrupted run does in its own; returns the
    --metrics-json report."""
    result = run_main(qml, ["--data-dir", data, *BASE, *SCHEDULE, "--epochs", "3", "--metrics-json", str(metrics),
                            *extra])
    assert result.returncode == 0, result.stderr
    with open(metrics) as file:
        return json.load(file)


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    return metrics_run(tiny_data, tmp_path_factory.mktemp("whole") / "metrics.json")


def interrupted_run(tiny_data, wrapper, tmp, signum):
    """Run 3 epochs with SCHEDULE and --checkpoint, send `signum` once training waits in epoch 2; returns (status,
    stderr, ckpt)."""
    checkpoint = tmp / "run.pt"
    argv = [sys.executable, wrapper, "--data-dir", tiny_data, *BASE, *SCHEDULE, "--epochs", "3", "--checkpoint",
            str(checkpoint)]
    proc = start(argv, dict(FAULT="wait", FAULT_AT_CALL=str(FIRST_CALL_OF_EPOCH_2)), tmp, "run")
    wait_for_fault(proc, tmp, "run")
    assert "validation   Epoch: 1/3" in (tmp / "run.out").read_text()
    proc.send_signal(signum)
    status, _, stderr = finish(proc, tmp, "run")
    return status, stderr, checkpoint


@pytest.fixture(scope="module")
def sigterm_run(tiny_data, wrapper, tmp_path_factory):
    return interrupted_run(tiny_data, wrapper, tmp_path_factory.mktemp("sigterm"), signal.SIGTERM)


@pytest.fixture(scope="module")
def sigint_run(tiny_data, wrapper, tmp_path_factory):
    return interrupted_run(tiny_data, wrapper, tmp_path_factory.mktemp("sigint"), signal.SIGINT)


@pytest.fixture(scope="module")
def sigkill_run(tiny_data, wrapper, tmp_path_factory):
    return interrupted_run(tiny_data, wrapper, tmp_path_factory.mktemp("sigkill"), signal.SIGKILL)


@pytest.fixture(scope="module")
def warned_run(tiny_data, wrapper, tmp_path_factory):
    """3 epochs with SCHEDULE and --checkpoint; SIGUSR1 (Slurm's wall-time warning) arrives in epoch 2's first
    batch."""
    tmp = tmp_path_factory.mktemp("usr1")
    checkpoint = tmp / "run.pt"
    argv = [sys.executable, wrapper, "--data-dir", tiny_data, *BASE, *SCHEDULE, "--epochs", "3", "--checkpoint",
            str(checkpoint)]
    proc = start(argv, dict(FAULT="usr1", FAULT_AT_CALL=str(FIRST_CALL_OF_EPOCH_2)), tmp, "run")
    status, stdout, stderr = finish(proc, tmp, "run")
    return status, stdout, stderr, checkpoint


def test_wall_time_warning_stops_between_batches_with_status_75_and_one_line(warned_run):
    status, stdout, stderr, checkpoint = warned_run
    assert status == 75, stderr  # "interrupted, resumable": the launcher requeues the job
    line = one_stderr_line(stderr)
    assert "stopped by SIGUSR1's request in epoch 2, between batches" in line and f"--resume {checkpoint}" in line
    assert "Epoch: 2/3 Ave." not in stdout  # epoch 2 was not finished


def test_wall_time_warning_keeps_the_checkpoint_of_the_last_complete_epoch(warned_run):
    *_, checkpoint = warned_run
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["state"]["epoch"] == 1 and [record["epoch"] for record in saved["state"]["history"]] == [1]
    assert sorted(os.listdir(checkpoint.parent)) == ["run.err", "run.out", "run.pt"]  # no temporary file left


def test_sigterm_stops_with_one_line_pointing_to_resume(sigterm_run):
    status, stderr, checkpoint = sigterm_run
    assert status == 130, stderr
    line = one_stderr_line(stderr)
    assert "stopped by SIGTERM" in line and f"--resume {checkpoint}" in line


def test_ctrl_c_stops_with_one_line_naming_the_checkpoint_and_the_command_that_resumes(sigint_run, tiny_data):
    status, stderr, checkpoint = sigint_run
    assert status == 130, stderr
    line = one_stderr_line(stderr)
    assert line.startswith(f"qml.py: stopped by Ctrl-C; {checkpoint} holds the last complete epoch"), line
    command = " ".join(["qml.py", "--data-dir", tiny_data, *BASE, *SCHEDULE, "--epochs", "3", "--checkpoint",
                        str(checkpoint), "--resume", str(checkpoint)])
    assert line.endswith(f"continue with {command} (under the same launcher)"), line


def test_sigterm_leaves_the_checkpoint_of_the_last_complete_epoch(sigterm_run):
    _, _, checkpoint = sigterm_run
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["state"]["epoch"] == 1
    assert [record["epoch"] for record in saved["state"]["history"]] == [1]
    assert sorted(os.listdir(checkpoint.parent)) == ["run.err", "run.out", "run.pt"]  # no temporary file left


def comparable(report):
    """Per-epoch metrics without timings and decoding counts (a resumed process decodes its images again),
    and the best values."""
    not_metrics = ("seconds", "images_decoded", "images_kept")
    epochs = [{k: v for k, v in record.items() if k not in not_metrics} for record in report["epochs"]]
    best = {k: report[k] for k in ("best_val_acc", "best_val_loss", "best_train_acc", "best_train_loss")}
    return epochs, best


@pytest.mark.parametrize("killed", ["sigterm_run", "sigkill_run", "warned_run"])
def test_resume_after_kill_ends_with_the_uninterrupted_metrics(request, killed, tiny_data, uninterrupted, tmp_path):
    status, *_, checkpoint = request.getfixturevalue(killed)
    assert status in (130, -signal.SIGKILL, 75)  # stopped by the signal, in epoch 2
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["state"]["epoch"] == 1
    resumed = metrics_run(tiny_data, tmp_path / "metrics.json", "--resume", str(checkpoint),
                          "--checkpoint", str(tmp_path / "again.pt"))
    epochs, best = comparable(resumed)
    expected_epochs, expected_best = comparable(uninterrupted)
    assert [record["epoch"] for record in epochs] == [1, 2, 3]
    assert len(epochs) == len(expected_epochs)
    for got, want in zip(epochs, expected_epochs, strict=True):
        assert got == pytest.approx(want, rel=0, abs=1e-9)
    assert best == pytest.approx(expected_best, rel=0, abs=1e-9)
    assert (resumed["complete"], resumed["resumed"], uninterrupted["resumed"]) == (True, 1, 0)


@pytest.fixture(scope="module")
def two_ranks_sigterm(tiny_data, wrapper, tmp_path_factory):
    """two_rank_run's options, both ranks sent SIGTERM (as Slurm's time limit sends it to every task) once they
    wait at the start of epoch 2: ([(status, stdout, stderr)] of ranks 0 and 1, the checkpoint left)."""
    tmp = tmp_path_factory.mktemp("two_ranks_sigterm")
    calls = ",".join(str(first_call_of_epoch_2(rank, 2)) for rank in range(2))
    procs = start_two_ranks(wrapper, tiny_data, tmp, "--epochs", "3", *SCHEDULE, FAULT="wait", FAULT_RANK="all",
                            FAULT_AT_CALL=calls)
    for rank, proc in enumerate(procs):
        wait_for_fault(proc, tmp, f"rank{rank}")
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    return [finish(proc, tmp, f"rank{rank}") for rank, proc in enumerate(procs)], tmp / "run.pt"


def test_sigterm_stops_both_ranks_with_one_line_each_pointing_to_resume(two_ranks_sigterm):
    results, checkpoint = two_ranks_sigterm
    for rank, (status, _, stderr) in enumerate(results):
        assert status == 130, (rank, stderr)
        line = one_stderr_line(stderr)
        assert "stopped by SIGTERM" in line and "--resume" in line, rank
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["state"]["epoch"] == 1


def test_two_ranks_resumed_after_sigterm_end_with_the_uninterrupted_metrics(tiny_data, wrapper, two_rank_run,
                                                                            two_ranks_sigterm, tmp_path):
    _, checkpoint = two_ranks_sigterm
    metrics = tmp_path / "metrics.json"
    procs = start_two_ranks(wrapper, tiny_data, tmp_path, "--epochs", "3", *SCHEDULE, "--resume", str(checkpoint),
                            "--metrics-json", str(metrics))
    results = [finish(proc, tmp_path, f"rank{rank}") for rank, proc in enumerate(procs)]
    assert [status for status, _, _ in results] == [0, 0], results
    resumed, uninterrupted = json.loads(metrics.read_text()), json.loads(two_rank_run[2].read_text())
    assert_ranks_agree(resumed)
    epochs, best = comparable(resumed)
    expected_epochs, expected_best = comparable(uninterrupted)
    assert [(record["epoch"], record["world_size"]) for record in epochs] == [(1, 2), (2, 2), (3, 2)]
    for got, want in zip(epochs, expected_epochs, strict=True):
        assert got == pytest.approx(want, rel=0, abs=1e-9)
    assert best == pytest.approx(expected_best, rel=0, abs=1e-9)


@pytest.mark.parametrize("damage, workers", [("delete", "0"), ("truncate", "1")],
                         ids=["deleted-no-workers", "truncated-in-a-worker"])
def test_image_damaged_mid_run_exits_1_with_one_line_naming_it_and_the_checkpoint(tiny_data, wrapper, tmp_path,
                                                                                  damage, workers):
    data = shutil.copytree(tiny_data, tmp_path / "data")
    image, checkpoint = data / "val" / "ants" / "0.jpg", tmp_path / "run.pt"  # read by epoch 2's validation
    # Without the image cache: a damaged image already kept decoded would never be read again.
    argv = [sys.executable, wrapper, "--data-dir", data, *BASE, "--workers", workers, "--epochs", "2",
            "--image-cache", "off", "--checkpoint", checkpoint]
    env = dict(FAULT=damage, FAULT_FILE=str(image), FAULT_AT_CALL=str(FIRST_CALL_OF_EPOCH_2))
    status, _, stderr = finish(start(list(map(str, argv)), env, tmp_path, "run"), tmp_path, "run")
    assert status == 1, stderr
    line = one_stderr_line(stderr)
    assert f"{image} can no longer be read" in line and f"--resume {checkpoint}" in line
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["state"]["epoch"] == 1


def test_sigterm_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "run.pt"
    previous = {"state": {"epoch": 1}, "head": torch.arange(4.0)}
    torch.save(previous, path)
    signal.signal(signal.SIGTERM, command_line.raise_interrupt)  # as main() installs it

    def interrupted(file):
        file.write(b"half of epoch 2")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(HANG_GUARD)  # the handler raises in here

    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        checkpoints.atomic_write(str(path), interrupted)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert saved["state"] == previous["state"] and torch.equal(saved["head"], previous["head"])
    assert os.listdir(tmp_path) == ["run.pt"]  # no temporary file left


def refuse_to_open(*args, **kwargs):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))


def test_write_whose_open_fails_reports_that_error_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    path.write_bytes(b"epoch 1")
    monkeypatch.setattr(command_line, "open", refuse_to_open, raising=False)  # shadows the builtin there
    with pytest.raises(command_line.RunFailed, match=rf"cannot write {path} \(Permission denied\)") as failure:
        checkpoints.atomic_write(str(path), lambda file: file.write(b"epoch 2"))
    assert isinstance(failure.value.__cause__, PermissionError)
    assert path.read_bytes() == b"epoch 1"
    assert os.listdir(tmp_path) == ["run.pt"]


def test_write_that_fails_midway_reports_that_error_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "run.pt"
    path.write_bytes(b"epoch 1")

    def disk_full(file):
        file.write(b"half of epoch 2")
        file.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(command_line.RunFailed, match=rf"cannot write {path} \(No space left on device\)") as failure:
        checkpoints.atomic_write(str(path), disk_full)
    assert failure.value.__cause__.errno == errno.ENOSPC
    assert path.read_bytes() == b"epoch 1"
    assert os.listdir(tmp_path) == ["run.pt"]


class FullDiskFile(io.FileIO):
    """A file on a disk that fills up: each write stores half of its bytes, then fails with ENOSPC."""

    def write(self, data):
        super().write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fill_the_disk(monkeypatch):
    """From now on every file qml opens for writing is on a full disk (reading still works)."""
    def full_disk_open(path, mode="r"):
        return FullDiskFile(path, mode.replace("b", "")) if "w" in mode else builtins.open(path, mode)

    monkeypatch.setattr(command_line, "open", full_disk_open, raising=False)  # atomic_write's


def full_disk_run(capfd, argv):
    """qml.main(argv) in this process; asserts status 1 and returns its one stderr line."""
    status = qml.main(argv)
    stderr = capfd.readouterr().err
    assert status == 1, stderr
    return one_stderr_line(stderr)


def test_checkpoint_write_on_a_full_disk_keeps_the_previous_checkpoint_and_exits_1_with_one_line(
        capfd, tiny_data, tmp_path, monkeypatch):
    checkpoint = tmp_path / "run.pt"
    assert qml.main(["--data-dir", tiny_data, *BASE, "--epochs", "1", "--checkpoint", str(checkpoint)]) == 0
    epoch_1 = checkpoint.read_bytes()
    fill_the_disk(monkeypatch)
    line = full_disk_run(capfd, ["--data-dir", tiny_data, *BASE, "--epochs", "2", "--resume", str(checkpoint),
                                 "--checkpoint", str(checkpoint)])
    assert f"cannot write {checkpoint} (No space left on device)" in line and "unchanged" in line
    assert checkpoint.read_bytes() == epoch_1
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["state"]["epoch"] == 1
    assert os.listdir(tmp_path) == ["run.pt"]


def test_metrics_write_on_a_full_disk_keeps_the_previous_file_and_exits_1_with_one_line(
        capfd, tiny_data, tmp_path, monkeypatch):
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"previous": "run"}\n')
    fill_the_disk(monkeypatch)
    line = full_disk_run(capfd, ["--data-dir", tiny_data, *BASE, "--epochs", "1", "--metrics-json", str(metrics)])
    assert f"cannot write {metrics} (No space left on device)" in line and "unchanged" in line
    assert metrics.read_text() == '{"previous": "run"}\n'
    assert os.listdir(tmp_path) == ["metrics.json"]


# ----------------------------------------------------------------------------
# Downloads


def tiny_jpeg():
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 120, 40)).save(buffer, "JPEG")
    return buffer.getvalue()


def hymenoptera_zip(path, counts=images.HYMENOPTERA_COUNTS, extra=()):
    """The published archive's layout (hymenoptera_data/{train,val}/{ants,bees}) with tiny JPEGs."""
    jpeg = tiny_jpeg()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for split, classes in counts.items():
            for name, n in classes.items():
                for i in range(n):
                    archive.writestr(f"hymenoptera_data/{split}/{name}/{i:03d}.jpg", jpeg)
        for name in extra:
            archive.writestr(name, b"written outside the target")
    return path


@pytest.fixture
def target(tmp_path):
    """Where the data set should land: <tmp>/parent/hymenoptera_data (parent exists and is empty)."""
    (tmp_path / "parent").mkdir()
    return tmp_path / "parent" / "hymenoptera_data"


@contextlib.contextmanager
def http_server(directory):
    """Serve `directory` on 127.0.0.1 from a thread; yields the base URL."""

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=directory))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def assert_downloaded(target):
    layout = images.check_layout(str(target), images.HYMENOPTERA_COUNTS)
    images.check_images_decode(layout)
    assert {split: {name: len(paths) for name, paths in classes.items()} for split, classes in layout.items()} == \
        images.HYMENOPTERA_COUNTS
    assert os.listdir(target.parent) == ["hymenoptera_data"]  # no temporary folder beside it


def test_download_from_file_url_extracts_the_data_set_into_place(tmp_path, target):
    url = hymenoptera_zip(tmp_path / "good.zip").as_uri()
    images.download_dataset(str(target), url)
    assert_downloaded(target)


def test_download_over_http_extracts_the_data_set_into_place(tmp_path, target, monkeypatch):
    monkeypatch.setattr(images, "DOWNLOAD_TIMEOUT", 10)
    (tmp_path / "site").mkdir()
    hymenoptera_zip(tmp_path / "site" / "hymenoptera_data.zip")
    with http_server(str(tmp_path / "site")) as base:
        images.download_dataset(str(target), f"{base}/hymenoptera_data.zip")
    assert_downloaded(target)


def assert_nothing_left(target):
    assert not os.path.exists(target)
    assert os.listdir(target.parent) == []  # no data set and no temporary folder


@pytest.mark.parametrize("entry", ["../evil", "hymenoptera_data/../../evil", "hymenoptera_data/train/../../../evil"])
def test_download_refuses_an_archive_with_an_entry_outside_its_folder(tmp_path, target, entry):
    url = hymenoptera_zip(tmp_path / "evil.zip", extra=[entry]).as_uri()
    with pytest.raises(command_line.UsageError, match="outside its folder"):
        images.download_dataset(str(target), url)
    assert_nothing_left(target)
    assert not [path for path in tmp_path.rglob("evil")], "an entry was written outside the target"


def broken_download(kind, tmp_path):
    good = hymenoptera_zip(tmp_path / "good.zip").read_bytes()
    if kind == "truncated":
        data = good[: len(good) // 2]
    elif kind == "html-page":
        data = b"<html><body>Sign in to continue</body></html>"
    elif kind == "empty":
        data = b""
    else:  # damaged-member: flip bytes inside the first entry's compressed data
        data = bytearray(good)
        start = 30 + len("hymenoptera_data/train/ants/000.jpg") + 20
        data[start:start + 40] = bytes(b ^ 0xFF for b in data[start:start + 40])
    path = tmp_path / f"{kind}.zip"
    path.write_bytes(bytes(data))
    return path.as_uri()


@pytest.mark.parametrize("kind", ["truncated", "html-page", "empty", "damaged-member"])
def test_download_of_a_broken_archive_leaves_nothing(tmp_path, target, kind):
    with pytest.raises(command_line.UsageError, match="not a complete zip archive.*--data-url"):
        images.download_dataset(str(target), broken_download(kind, tmp_path))
    assert_nothing_left(target)


@pytest.mark.parametrize("counts", [
    {"train": {"ants": 124, "bees": 121}, "val": {"ants": 70}},
    {"train": {"ants": 123, "bees": 121}, "val": {"ants": 70, "bees": 83}},
    {"train": {"ants": 124, "bees": 121, "wasps": 5}, "val": {"ants": 70, "bees": 83, "wasps": 5}},
], ids=["missing-class", "wrong-count", "extra-class"])
def test_download_with_the_wrong_layout_leaves_nothing(tmp_path, target, counts):
    url = hymenoptera_zip(tmp_path / "other.zip", counts=counts).as_uri()
    with pytest.raises(command_line.UsageError, match="not the ants/bees data set"):
        images.download_dataset(str(target), url)
    assert_nothing_left(target)


def test_download_from_a_missing_file_url_names_data_dir(tmp_path, target):
    with pytest.raises(command_line.UsageError, match="cannot download .*--data-dir DIR"):
        images.download_dataset(str(target), (tmp_path / "nowhere.zip").as_uri())
    assert_nothing_left(target)


def test_download_from_a_closed_port_names_data_dir(target):
    with pytest.raises(command_line.UsageError, match="cannot download .*--data-dir DIR"):
        images.download_dataset(str(target), f"http://127.0.0.1:{free_port()}/hymenoptera_data.zip")
    assert_nothing_left(target)


def test_download_of_a_missing_page_names_data_dir(tmp_path, target, monkeypatch):
    monkeypatch.setattr(images, "DOWNLOAD_TIMEOUT", 10)
    with http_server(str(tmp_path)) as base:
        with pytest.raises(command_line.UsageError, match="cannot download .*404.*--data-dir DIR"):
            images.download_dataset(str(target), f"{base}/hymenoptera_data.zip")
    assert_nothing_left(target)


def test_download_from_a_server_that_never_answers_times_out(target, monkeypatch):
    monkeypatch.setattr(images, "DOWNLOAD_TIMEOUT", 1)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, never accepts nor answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/hymenoptera_data.zip"
        with pytest.raises(command_line.UsageError, match="cannot download .*timed out.*--data-dir DIR"):
            images.download_dataset(str(target), url)
    assert_nothing_left(target)


def test_cli_download_from_a_bad_url_exits_2_with_one_line(tmp_path):
    data_dir = tmp_path / "parent" / "hymenoptera_data"
    result = run_qml("--data-dir", data_dir, "--download", "--data-url", (tmp_path / "nowhere.zip").as_uri(),
                     *BASE, "--epochs", "1", timeout=HANG_GUARD)
    assert result.returncode == 2, result.stderr
    line = one_stderr_line(result.stderr)
    assert "cannot download" in line and "nowhere.zip" in line and "--data-dir DIR" in line
    assert not data_dir.exists()
