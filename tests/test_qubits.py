"""Qubits 1 to 30: no fixed cap below the tutorial's 30, and the memory a simulator needs for --n-qubits checked
against what the rank has before any data are read."""

import re
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from conftest import ROOT, cpu_env, one_stderr_line

from machinery import images
import qml
from machinery import simulators
from machinery.command_line import UsageError

GiB = 2**30


def head_net(nqubits, qdevice):
    torch.manual_seed(0)
    return qml.DressedQuantumNet(n_qubits=nqubits, qdevice=qdevice).quantum_net


def test_the_parser_takes_every_qubit_count_up_to_30():
    for count in (1, 20, 21, 30):
        assert qml.get_args_parser().parse_args(["--n-qubits", str(count)]).n_qubits == count


@pytest.mark.parametrize("qdevice", [simulators.TORCH_QDEVICE, "lightning.kokkos", "default.qubit"])
def test_a_circuit_that_does_not_fit_names_its_need_what_there_is_and_the_largest_that_fits(qdevice):
    net = head_net(20, qdevice)
    needed = simulators.memory_needed(net, qdevice, 4)[0]
    with pytest.raises(UsageError) as refused:
        simulators.check_memory(net, qdevice, 4, needed // 3, "this rank")
    message = str(refused.value)
    largest = int(re.search(r"the largest that fits is --n-qubits (\d+)", message).group(1))
    assert simulators.memory_needed(net, qdevice, 4, largest)[0] <= needed // 3
    assert simulators.memory_needed(net, qdevice, 4, largest + 1)[0] > needed // 3
    assert f"--n-qubits 20 on --qdevice {qdevice} needs about {simulators.size(needed)}" in message
    assert f"this rank has {simulators.size(needed // 3)}" in message


def test_a_circuit_that_fits_is_not_refused():
    net = head_net(20, simulators.TORCH_QDEVICE)
    simulators.check_memory(net, simulators.TORCH_QDEVICE, 4, simulators.memory_needed(net, "torch", 4)[0], "here")


def test_the_estimate_doubles_with_each_qubit_and_grows_with_the_batch():
    net = head_net(12, simulators.TORCH_QDEVICE)
    at = {n: simulators.memory_needed(net, "torch", 4, n)[0] for n in (12, 13)}
    assert 2 <= at[13] / at[12] < 2.5  # the state doubles; the blocks grow with the width
    assert simulators.memory_needed(net, "torch", 8)[0] == 2 * at[12]


# A fresh process measures how far one batch's forward and backward pass raise its resident memory above what it
# held before (Linux: writing 5 to /proc/self/clear_refs resets the peak, VmHWM, to the current VmRSS).
# Allocations of 64 KiB and more are made with mmap, so that freed states go back to the system.
PEAK_PROBE = textwrap.dedent("""\
    import sys
    sys.path.insert(0, {root!r})
    import torch, qml
    from machinery import simulators

    def status(field):
        with open("/proc/self/status") as file:
            return next(int(line.split()[1]) * 1024 for line in file if line.startswith(field))

    nqubits, qdevice = {nqubits}, {qdevice!r}
    torch.manual_seed(0)
    head = qml.DressedQuantumNet(n_qubits=nqubits, qdevice=qdevice)
    inputs = torch.rand(4, nqubits, requires_grad=True)
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")
    before = status("VmRSS:")
    torch.stack(head.quantum_net(inputs, head.q_params), -1).sum().backward()
    print(status("VmHWM:") - before, simulators.memory_needed(head.quantum_net, qdevice, 4)[0])
""")


@pytest.mark.parametrize("qdevice,nqubits", [(simulators.TORCH_QDEVICE, 17), ("lightning.kokkos", 16)])
def test_the_estimate_is_what_a_batch_really_takes(qdevice, nqubits):
    probe = subprocess.run([sys.executable, "-c", PEAK_PROBE.format(root=ROOT, nqubits=nqubits, qdevice=qdevice)],
                           capture_output=True, text=True, timeout=300,
                           env=cpu_env(MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1"))
    assert probe.returncode == 0, probe.stderr
    measured, estimate = map(int, probe.stdout.split())
    assert measured > 16 * 2**20  # mostly states, little else
    assert measured <= 1.1 * estimate and estimate <= 1.5 * measured, (measured, estimate)


@pytest.mark.parametrize("qdevice", [simulators.TORCH_QDEVICE, "lightning.kokkos"])
def test_30_qubits_are_refused_before_the_data_are_looked_at(qdevice, monkeypatch, capsys):
    monkeypatch.setattr(images, "available_host_memory", lambda: 64 * GiB)
    status = qml.main(["--n-qubits", "30", "--qdevice", qdevice, "--data-dir", "/nonexistent", "--weights", "none"])
    line = one_stderr_line(capsys.readouterr().err)
    assert status == 2
    assert f"--n-qubits 30 on --qdevice {qdevice} needs about" in line
    assert "but this rank (the host's available memory) has 64.0 GiB; the largest that fits is --n-qubits" in line
    assert "/nonexistent" not in line


def test_the_tutorials_four_qubits_fit_anywhere(monkeypatch, capsys):
    monkeypatch.setattr(images, "available_host_memory", lambda: 2**20)  # 1 MiB
    assert qml.main(["--qdevice", "torch", "--data-dir", "/nonexistent", "--weights", "none"]) == 2
    assert "/nonexistent" in one_stderr_line(capsys.readouterr().err)  # refused for the data, not the memory


def test_a_rank_gets_its_share_of_the_hosts_memory(monkeypatch):
    monkeypatch.setattr(images, "available_host_memory", lambda: 12 * GiB)
    ctx = qml.DistContext(rank=1, world_size=4)
    ctx.rank_facts = [{"host": "a"}, {"host": "a"}, {"host": "a"}, {"host": "b"}]
    assert images.rank_memory(ctx, on_gpu=False) == (4 * GiB, "this rank (the host's available memory, shared by "
                                                               "its 3 ranks)")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible to torch: the GPU's free memory is "
                    "checked on a machine with one")
def test_a_gpu_rank_gets_its_gpus_free_memory():
    ctx = qml.DistContext(device=torch.device("cuda", 0))
    assert images.rank_memory(ctx, on_gpu=True)[0] == pytest.approx(torch.cuda.mem_get_info(0)[0], rel=0.05)


def test_memory_is_checked_before_any_image_is_read(tiny_data, monkeypatch, capsys):
    read = []
    monkeypatch.setattr(images, "available_host_memory", lambda: 2**20)
    monkeypatch.setattr(images, "prepare_data", lambda *args: read.append(args))
    assert qml.main(["--n-qubits", "24", "--qdevice", "torch", "--data-dir", tiny_data, "--weights", "none"]) == 2
    assert "needs about" in one_stderr_line(capsys.readouterr().err)
    assert read == []


def test_the_benchmarks_qubit_table_times_what_fits_and_marks_what_memory_refuses(monkeypatch):
    import bench

    monkeypatch.setattr(bench, "time_circuit_alone", lambda qdevice, nqubits: 0.002)  # the check is what is tested
    monkeypatch.setattr(images, "rank_memory", lambda ctx, on_gpu: (3 * GiB, "this rank"))
    rows = bench.qubit_rows(types.SimpleNamespace(max_qubits=28, qubit_seconds=60))
    assert [row[0] for row in rows] == bench.circuit_qdevices()
    for qdevice, *cells in rows:
        net = head_net(4, qdevice)
        fits = [count for count in bench.QUBIT_COUNTS if simulators.memory_needed(net, qdevice, 4, count)[0] <= 3 * GiB]
        assert cells[:len(fits)] == ["2.0"] * len(fits), (qdevice, cells)
        assert fits and all(cell.startswith("needs ") for cell in cells[len(fits):]), (qdevice, cells)
