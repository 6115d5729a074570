"""The GPU path: one GPU per NCCL rank, Kokkos on the rank's GPU, and runs on a real GPU.

The rules are checked everywhere with faked GPUs. The runs at the end need a GPU visible to torch
(CUDA or ROCm) and skip with the reason elsewhere; on a GPU machine `python -m pytest tests/test_gpu.py`
(or `bash tests/gpu_check.sh`) runs them all: one and two NCCL ranks (two need two GPUs), two gloo ranks on
one GPU, reduced precision, the image cache and the feature cache against the CPU, and Kokkos on the GPU
where its build is a GPU one. They start their runs with this process's environment, GPUs and all (the rest
of the suite hides the GPUs from its runs, see conftest.NO_GPUS); a run meant for one GPU gets the first GPU
this process sees, whichever physical GPU that is.
"""

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from conftest import (
    GPU_SPACES,
    QML,
    ROOT,
    assert_ranks_agree,
    free_port,
    kokkos_build,
    make_image_folder,
    one_stderr_line,
    run_qml,
)

from machinery import command_line, images, process_group
import qml
from machinery import simulators

# ----------------------------------------------------------------------------
# Rules, with faked GPUs


def fake_gpus(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("visible, local_rank, index", [(1, 0, 0), (1, 5, 0), (8, 5, 5), (2, 3, 1)],
                         ids=["own-gpu", "own-gpu-bound-by-srun", "all-node-gpus", "more-ranks-than-gpus"])
def test_a_rank_takes_the_gpu_of_its_local_rank_among_those_it_sees(monkeypatch, visible, local_rank, index):
    fake_gpus(monkeypatch, visible)
    assert qml.pick_device("auto", local_rank) == torch.device("cuda", index)


@pytest.mark.parametrize("usable_cpus, workers", [({0}, 0), ({0, 1}, 1), (set(range(7)), 3)])
def test_gpu_rank_decodes_with_the_cpus_it_may_use_less_one_at_most_3(monkeypatch, usable_cpus, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: usable_cpus)
    monkeypatch.setattr(os, "cpu_count", lambda: 128)  # the node's count must not matter
    assert images.default_workers(torch.device("cuda", 0)) == workers


def test_cpu_rank_decodes_in_the_main_process():
    assert images.default_workers(torch.device("cpu")) == 0


def rank(number, host, gpu_id, visible=1, index=0):
    return dict(rank=number, host=host, gpu=dict(index=index, name="GPU", id=gpu_id, visible=visible))


def test_ranks_with_a_gpu_each_pass():
    process_group.check_one_gpu_per_rank([rank(0, "n1", "GPU-a", 2, 0), rank(1, "n1", "GPU-b", 2, 1)])


def test_ranks_of_different_hosts_may_see_the_same_gpu_id():
    # srun --gpus-per-task=1 binds GPU 0 of each node: the same visible-devices entry on two hosts
    process_group.check_one_gpu_per_rank([rank(0, "n1", "CUDA_VISIBLE_DEVICES=0"),
                                          rank(1, "n2", "CUDA_VISIBLE_DEVICES=0")])


def test_four_ranks_sharing_one_gpu_are_refused_naming_both_counts_and_the_fixes():
    # torchrun --nproc-per-node 4 on a one-GPU machine
    with pytest.raises(command_line.UsageError) as refused:
        process_group.check_one_gpu_per_rank([rank(r, "box", "GPU-a") for r in range(4)])
    message = str(refused.value)
    assert "4 ranks on box but 1 GPU(s)" in message
    assert "--backend gloo" in message and "--gpus-per-task" in message


def test_gpu_id_is_the_uuid_when_the_gpu_reports_one():
    props = types.SimpleNamespace(uuid="GPU-5b2f4c1e-0d3a-4e55-9a61-2f8d7c0e4b19")
    assert process_group.physical_gpu_id(props, 0) == "GPU-5b2f4c1e-0d3a-4e55-9a61-2f8d7c0e4b19"


@pytest.mark.parametrize("var", ["CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"])
def test_gpu_id_without_a_uuid_is_the_visible_devices_entry(monkeypatch, var):
    for name in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(var, "4,6")
    props = types.SimpleNamespace(uuid="00000000-0000-0000-0000-000000000000")
    assert process_group.physical_gpu_id(props, 1) == f"{var}=6"


def test_kokkos_is_given_the_ranks_gpu_and_no_warnings():
    settings = simulators.qdevice_options("lightning.kokkos", 3, 4)["kokkos_args"]
    assert settings.get_device_id() == 3 and settings.get_disable_warnings()


def test_kokkos_on_a_cpu_rank_is_left_its_own_device_choice():
    settings = simulators.qdevice_options("lightning.kokkos", None, 20)["kokkos_args"]
    assert not settings.has_device_id() and settings.get_disable_warnings()


def test_kokkos_on_a_cpu_rank_simulates_a_small_circuit_on_one_thread():
    settings = simulators.qdevice_options("lightning.kokkos", None, simulators.KOKKOS_ONE_THREAD_QUBITS)["kokkos_args"]
    assert settings.has_num_threads() and settings.get_num_threads() == 1


@pytest.mark.parametrize("device_id", [None, 0], ids=["cpu-rank", "gpu-rank"])
def test_kokkos_keeps_its_own_thread_count_for_large_circuits(device_id):
    nqubits = simulators.KOKKOS_ONE_THREAD_QUBITS + 1
    assert not simulators.qdevice_options("lightning.kokkos", device_id, nqubits)["kokkos_args"].has_num_threads()


def test_kokkos_on_a_gpu_rank_gets_its_gpu_and_one_thread_for_a_small_circuit():
    # An OpenMP-only build (the registry's wheel) ignores the GPU: without the thread setting it would take
    # every CPU of the task for 16 amplitudes.
    settings = simulators.qdevice_options("lightning.kokkos", 2, 4)["kokkos_args"]
    assert settings.get_device_id() == 2 and settings.has_num_threads() and settings.get_num_threads() == 1


# A fresh process, so that this circuit is the one that starts Kokkos.
KOKKOS_THREADS_PROBE = textwrap.dedent("""\
    import re, sys
    sys.path.insert(0, {root!r})
    import torch
    import qml
    from pennylane_lightning.lightning_kokkos_ops import print_configuration

    torch.set_num_threads(2)
    qml.make_quantum_net(4, 1, 4, "lightning.kokkos")
    pool = re.search(r"thread_pool_topology\\[ (.*?) \\]", print_configuration())
    print(torch.get_num_threads(), pool.group(1) if pool else "-")
""")


@pytest.fixture(scope="module")
def kokkos_threads():
    """(torch's threads, Kokkos' thread pool) once a 4-qubit lightning.kokkos circuit is built in a fresh process."""
    probe = subprocess.run([sys.executable, "-c", KOKKOS_THREADS_PROBE.format(root=ROOT)], capture_output=True,
                           text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert probe.returncode == 0, probe.stderr
    threads, pool = probe.stdout.split(maxsplit=1)
    return int(threads), pool.strip()


def test_kokkos_starts_a_small_circuit_on_one_thread(kokkos_threads):
    space, pool = kokkos_build()
    if pool == "-":
        pytest.skip(f"this lightning.kokkos build ({space}) has no OpenMP host thread pool to size")
    assert kokkos_threads[1] == "1 x 1 x 1"


def test_torch_keeps_its_threads_after_kokkos_starts_on_one(kokkos_threads):
    assert kokkos_threads[0] == 2


def test_other_qdevices_get_no_kokkos_settings():
    assert simulators.qdevice_options("default.qubit", 0, 4) == {}


# ----------------------------------------------------------------------------
# On a real GPU

GPU_MISSING = None if torch.cuda.is_available() else (
    "no GPU visible to torch (torch.cuda.is_available() is False): run on a machine with a CUDA or ROCm GPU")
needs_gpu = pytest.mark.skipif(GPU_MISSING is not None, reason=GPU_MISSING or "")
TWO_GPUS_MISSING = GPU_MISSING or (None if torch.cuda.device_count() >= 2 else
                                   f"two NCCL ranks need two GPUs; torch sees {torch.cuda.device_count()}")
needs_two_gpus = pytest.mark.skipif(TWO_GPUS_MISSING is not None, reason=TWO_GPUS_MISSING or "")
LIGHTNING_KOKKOS = "lightning.kokkos"
RUN = ["--weights", "none", "--epochs", "1", "--print-freq", "0"]


def one_gpu_env(**extra):
    """os.environ narrowed to the first GPU this process sees, with `extra`: the first entry of the visible-devices
    list that the runtime reads (CUDA: CUDA_VISIBLE_DEVICES; ROCm's HIP: HIP_VISIBLE_DEVICES, else
    CUDA_VISIBLE_DEVICES, within ROCR_VISIBLE_DEVICES), or its index 0 when none is set, not physical GPU 0."""
    env = dict(os.environ, **extra)
    names = ("HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES") if torch.version.hip else ("CUDA_VISIBLE_DEVICES",)
    var = next((name for name in names if os.environ.get(name)), names[0])
    env[var] = os.environ.get(var, "0").split(",")[0]
    return env


@pytest.fixture(scope="module")
def gpu_data(tmp_path_factory):
    """A tiny data set with batches of 4 that fill (16 train, 8 val images)."""
    return make_image_folder(tmp_path_factory.mktemp("gpu_data"),
                             {"train": {"ants": 8, "bees": 8}, "val": {"ants": 4, "bees": 4}})


def metrics_of(data, tmp_path, name, *args, env=None):
    """qml.py in a fresh process that sees this one's GPUs: (stdout lines, metrics JSON)."""
    path = tmp_path / f"{name}.json"
    result = run_qml("--data-dir", data, *RUN, "--metrics-json", path, *args, env=env, gpus=True, timeout=600)
    assert result.returncode == 0, f"{name}: {result.stdout}\n{result.stderr}"
    return result.stdout.splitlines(), json.loads(path.read_text())


def torchrun_metrics(data, tmp_path, ranks, *args, env=None):
    """`torchrun --nproc-per-node ranks qml.py --device cuda --time-split ...`: the metrics JSON."""
    path = tmp_path / "metrics.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), QML,
               "--data-dir", data, *RUN, "--device", "cuda", "--time-split", "--metrics-json", str(path), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(path.read_text())


def assert_gradients_were_all_reduced(metrics):
    """--time-split saw DDP's all-reduce (records.timed_allreduce) take time in every epoch: the group carried data."""
    for epoch in metrics["epochs"]:
        assert epoch["time_split"]["allreduce"] > 0, epoch


def assert_same_first_epoch(gpu, cpu):
    gpu_epoch, cpu_epoch = gpu["epochs"][0], cpu["epochs"][0]
    for key in ("train_loss", "val_loss"):
        assert gpu_epoch[key] == pytest.approx(cpu_epoch[key], abs=1e-3), key
    for key in ("train_acc", "val_acc"):  # one image may fall the other way
        assert abs(gpu_epoch[key] - cpu_epoch[key]) <= 1 / cpu_epoch[key.replace("acc", "count")] + 1e-9, key


@needs_gpu
def test_one_gpu_epoch_prints_the_tutorials_lines(gpu_data, tmp_path):
    lines, metrics = metrics_of(gpu_data, tmp_path, "gpu", "--device", "cuda")
    assert lines[0].startswith("Ranks: 1 (single)") and "device: cuda:0 (" in lines[0], lines[0]
    assert lines[-1].startswith("Best average loss: "), lines
    assert metrics["device"] == "cuda:0" and metrics["ranks"][0]["gpu"]["name"]


@needs_gpu
def test_torchrun_runs_one_nccl_rank_whose_group_carries_the_gradients(gpu_data, tmp_path):
    metrics = torchrun_metrics(gpu_data, tmp_path, 1, env=one_gpu_env())
    assert (metrics["world_size"], metrics["backend"], metrics["rank_source"]) == (1, "nccl", "torchrun")
    assert metrics["provenance"]["group_backends"] == {"cpu": "gloo", "cuda": "nccl"}  # what the group really runs
    assert metrics["provenance"]["collectives"].split()[0] in ("NCCL", "RCCL")
    assert_gradients_were_all_reduced(metrics)


@needs_two_gpus
def test_two_nccl_ranks_train_in_step_on_two_gpus(gpu_data, tmp_path):
    metrics = torchrun_metrics(gpu_data, tmp_path, 2)
    assert (metrics["world_size"], metrics["backend"]) == (2, "nccl")
    assert metrics["provenance"]["group_backends"] == {"cpu": "gloo", "cuda": "nccl"}
    gpus = [rank["gpu"] for rank in metrics["ranks"]]
    assert [gpu["index"] for gpu in gpus] == [0, 1] and gpus[0]["id"] != gpus[1]["id"], gpus  # a GPU each
    assert [epoch["val_count"] for epoch in metrics["epochs"]] == [8]
    assert_gradients_were_all_reduced(metrics)
    assert_ranks_agree(metrics)


@needs_gpu
def test_two_gloo_ranks_train_in_step_on_one_gpu(gpu_data, tmp_path):
    metrics = torchrun_metrics(gpu_data, tmp_path, 2, "--backend", "gloo", env=one_gpu_env())
    assert (metrics["world_size"], metrics["backend"], metrics["device"]) == (2, "gloo", "cuda:0")
    assert metrics["provenance"]["group_backends"] == {"cpu": "gloo", "cuda": "gloo"}
    gpus = [rank["gpu"] for rank in metrics["ranks"]]
    assert [gpu["index"] for gpu in gpus] == [0, 0] and gpus[0]["id"] == gpus[1]["id"], gpus  # one GPU, shared
    assert [epoch["val_count"] for epoch in metrics["epochs"]] == [8]
    assert_gradients_were_all_reduced(metrics)
    assert_ranks_agree(metrics)


@needs_gpu
@pytest.mark.parametrize("qdevice", [simulators.TORCH_QDEVICE, LIGHTNING_KOKKOS])
def test_gpu_and_cpu_give_the_same_first_epoch(gpu_data, tmp_path, qdevice):
    _, gpu = metrics_of(gpu_data, tmp_path, "gpu", "--device", "cuda", "--qdevice", qdevice)
    _, cpu = metrics_of(gpu_data, tmp_path, "cpu", "--device", "cpu", "--qdevice", qdevice)
    assert (gpu["device"], cpu["device"]) == ("cuda:0", "cpu")
    assert_same_first_epoch(gpu, cpu)


@needs_gpu
@pytest.mark.parametrize("trained_on, predicted_on", [("cuda", "cpu"), ("cpu", "cuda")],
                         ids=["gpu-to-cpu", "cpu-to-gpu"])
def test_a_model_saved_on_one_device_predicts_on_the_other(gpu_data, tmp_path, trained_on, predicted_on):
    """qml.py predict of its own validation folder with a model trained elsewhere: the loss the run recorded (to the
    float noise between devices), the accuracy within one image that may fall the other way."""
    model, table = tmp_path / "model.pt", tmp_path / "predictions.csv"
    _, metrics = metrics_of(gpu_data, tmp_path, "run", "--device", trained_on, "--save", model)
    result = run_qml("predict", model, os.path.join(gpu_data, "val"), "--device", predicted_on, "--out", table,
                     gpus=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"device: {'cuda:0' if predicted_on == 'cuda' else 'cpu'}" in result.stdout.splitlines()[0]
    with open(table) as file:
        rows = list(csv.DictReader(file))
    accuracy = sum(row["predicted"] == row["true_class"] for row in rows) / len(rows)
    loss = -sum(math.log(float(row[f"p_{row['true_class']}"])) for row in rows) / len(rows)
    assert abs(accuracy - metrics["best_val_acc"]) <= 1 / len(rows) + 1e-9
    assert loss == pytest.approx(metrics["epochs"][0]["val_loss"], abs=1e-3)


@needs_gpu
def test_cached_features_on_the_gpu_match_the_cpu(gpu_data, tmp_path):
    cached = ["--cache-features", "--bn-mode", "eval"]
    _, gpu = metrics_of(gpu_data, tmp_path, "gpu", "--device", "cuda", *cached)
    _, cpu = metrics_of(gpu_data, tmp_path, "cpu", "--device", "cpu", *cached)
    assert_same_first_epoch(gpu, cpu)


@needs_gpu
def test_image_cache_on_the_gpu_changes_no_metric_and_decodes_nothing_after_the_first_epoch(gpu_data, tmp_path):
    two_epochs = ["--device", "cuda", "--epochs", "2"]
    _, kept = metrics_of(gpu_data, tmp_path, "kept", *two_epochs)
    _, decoded = metrics_of(gpu_data, tmp_path, "decoded", *two_epochs, "--image-cache", "off")
    keys = ("train_loss", "train_acc", "val_loss", "val_acc")
    assert [{k: e[k] for k in keys} for e in kept["epochs"]] == [{k: e[k] for k in keys} for e in decoded["epochs"]]
    assert [e["images_decoded"] for e in kept["epochs"]] == [24, 0]  # 16 train + 8 val images, then none


@needs_gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_backbone_on_the_gpu_differs_from_fp32_by_less_than_a_hundredth(gpu_data, tmp_path,
                                                                                           precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    _, reduced = metrics_of(gpu_data, tmp_path, precision, "--device", "cuda", "--precision", precision)
    _, fp32 = metrics_of(gpu_data, tmp_path, "fp32", "--device", "cuda")
    assert reduced["config"]["precision"] == precision
    for key in ("train_loss", "val_loss"):
        assert reduced["epochs"][0][key] != fp32["epochs"][0][key], key  # the backbone really ran in fp16/bf16 ...
        assert reduced["epochs"][0][key] == pytest.approx(fp32["epochs"][0][key], abs=0.01), key  # ... close to fp32


def test_kokkos_gpu_build_runs_the_circuit_on_the_gpu(gpu_data, tmp_path):
    space, _ = kokkos_build(env=dict(os.environ))  # this process's GPUs, not hidden
    if space not in GPU_SPACES:
        pytest.skip(f"this lightning.kokkos is a {space} build: its circuit runs on the CPU whatever the device")
    _, metrics = metrics_of(gpu_data, tmp_path, "kokkos", "--device", "cuda", "--qdevice", LIGHTNING_KOKKOS)
    qdevice = metrics["provenance"]["qdevice"]
    assert (qdevice["name"], qdevice["kokkos_device"], qdevice["runs_on"]) == (LIGHTNING_KOKKOS, space, "gpu")


@needs_gpu
def test_two_nccl_ranks_on_one_gpu_are_refused_in_one_line(gpu_data):
    # as torchrun --nproc-per-node 2 would start them on a one-GPU machine
    env = one_gpu_env(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([sys.executable, QML, "--data-dir", gpu_data, *RUN, "--device", "cuda"],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 2, stderr
        line = one_stderr_line(stderr)
        assert "2 ranks on" in line and "1 GPU(s)" in line, line


@needs_gpu
@pytest.mark.parametrize("qdevice", [simulators.TORCH_QDEVICE, LIGHTNING_KOKKOS])
def test_cuda_tensors_pass_through_the_circuit_and_back(qdevice):
    torch.manual_seed(0)
    features = torch.randn(4, 512)
    results = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(1)
        head = qml.DressedQuantumNet(qdevice=qdevice, device_id=0 if device == "cuda" else None).to(device)
        logits = head(features.to(device))
        logits.sum().backward()
        assert logits.device.type == device
        results[device] = (logits.detach().cpu(), head.q_params.grad.cpu(), head.pre_net.weight.grad.cpu())
    for cpu, gpu in zip(results["cpu"], results["cuda"], strict=True):
        torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-5)
