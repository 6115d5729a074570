"""End-to-end training on a tiny generated ImageFolder, checked against an independent copy of the tutorial.

One qml.py run (one epoch, `--weights none`, `--workers 0`, `--print-freq 1`, `--save`, `--metrics-json`)
is shared by the output, metrics and faithfulness tests; a second run with `--workers 2` and the default
progress frequency covers the log format and the decoding workers. Three-epoch runs in this process check
what one epoch cannot: that the bests and the saved head are the best epoch's, not the last one's, and the
learning rate's schedule.
"""

import copy
import json
import math
import os
import re
import signal
import socket
from importlib import metadata

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from conftest import GPU_SPACES, TINY_COUNTS, kokkos_build, run_main, run_qml
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_pre_hook

from machinery import checkpoints
import qml
from machinery import records

N_TRAIN = sum(TINY_COUNTS["train"].values())  # 12
N_VAL = sum(TINY_COUNTS["val"].values())  # 9
TRAIN_BATCHES = math.ceil(N_TRAIN / 4)  # the tutorial's batch size is 4
HEAD_SHAPES = {"pre_net.weight": (4, 512), "pre_net.bias": (4,), "q_params": (24,),
               "post_net.weight": (2, 4), "post_net.bias": (2,)}
NUMBER = r"(\d+\.\d{4})"


def finished(result):
    assert result.returncode == 0, f"qml.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def one_epoch_run(tiny_data, tmp_path_factory):
    """The shared run, with no OpenMP binding in its environment: (CompletedProcess, metrics path, head path)."""
    out = tmp_path_factory.mktemp("one_epoch")
    metrics, head = out / "metrics.json", out / "head.pt"
    result = finished(run_qml("--data-dir", tiny_data, "--weights", "none", "--epochs", "1", "--workers", "0",
                              "--print-freq", "1", "--metrics-json", metrics, "--save", head))
    return result, metrics, head


@pytest.fixture(scope="module")
def one_epoch(one_epoch_run):
    """The shared run: (stdout lines, metrics JSON, path of the saved head)."""
    result, metrics, head = one_epoch_run
    return result.stdout.splitlines(), json.loads(metrics.read_text()), head


@pytest.fixture(scope="module")
def two_workers(tiny_data, tmp_path_factory):
    """Same run in this process with two decoding workers and no --print-freq, its output not a terminal:
    (raw stdout, metrics)."""
    metrics = tmp_path_factory.mktemp("two_workers") / "metrics.json"
    result = finished(run_main(qml, ["--data-dir", tiny_data, "--weights", "none", "--epochs", "1", "--workers", "2",
                                     "--metrics-json", str(metrics)]))
    return result.stdout, json.loads(metrics.read_text())


def summary_values(lines, label):
    pattern = re.compile(rf"^Phase: {label} Epoch: 1/1 Ave\. Loss: {NUMBER} Ave\. Acc: {NUMBER}\s*$")
    found = [m.groups() for m in map(pattern.match, lines) if m]
    assert len(found) == 1, f"expected one '{label}' summary line, got {len(found)}:\n" + "\n".join(lines)
    return tuple(map(float, found[0]))


# ----------------------------------------------------------------------------
# Console output


def cpu_set(ranges):
    """{0, 1, 2, 5} from '0-2,5'."""
    cpus = set()
    for part in ranges.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def test_first_line_says_where_the_ranks_device_and_circuit_run(one_epoch):
    lines, _, _ = one_epoch
    space, _ = kokkos_build()
    runs_on = "gpu" if space in GPU_SPACES else "cpu"
    first = re.fullmatch(r"Ranks: 1 \(single\) on (\S+) \| device: cpu, CPUs (\S+) \| backend: gloo \| "
                         r"head: quantum, 2086 trainable parameters \| "
                         rf"qdevice: lightning\.kokkos \(Kokkos {space}, on the {runs_on}\)", lines[0])
    assert first, lines[0]
    assert first.group(1) == socket.gethostname()
    assert cpu_set(first.group(2)) == os.sched_getaffinity(0)


def test_kokkos_prints_no_warning_without_an_openmp_binding(one_epoch_run):
    result, _, _ = one_epoch_run
    assert "OMP_PROC_BIND" not in result.stderr, result.stderr


def test_prints_a_progress_line_for_every_training_batch(one_epoch):
    lines, _, _ = one_epoch
    pattern = re.compile(r"^Phase: train Epoch: 1/1 Iter: (\d+)/(\d+) Batch time: \d+\.\d{4}$")
    found = [tuple(map(int, m.groups())) for m in map(pattern.match, lines) if m]
    assert found == [(k, TRAIN_BATCHES) for k in range(1, TRAIN_BATCHES + 1)]


def test_prints_one_train_summary_line_matching_the_metrics(one_epoch):
    lines, metrics, _ = one_epoch
    loss, acc = summary_values(lines, "train")
    record = metrics["epochs"][0]
    assert (loss, acc) == (round(record["train_loss"], 4), round(record["train_acc"], 4))


def test_prints_one_validation_summary_line_matching_the_metrics(one_epoch):
    lines, metrics, _ = one_epoch
    loss, acc = summary_values(lines, "validation  ")  # the tutorial pads "validation" to line up
    record = metrics["epochs"][0]
    assert (loss, acc) == (round(record["val_loss"], 4), round(record["val_acc"], 4))


def test_train_summary_comes_before_validation_summary(one_epoch):
    lines, _, _ = one_epoch
    train = next(i for i, line in enumerate(lines) if line.startswith("Phase: train Epoch: 1/1 Ave."))
    val = next(i for i, line in enumerate(lines) if line.startswith("Phase: validation   Epoch: 1/1 Ave."))
    assert train < val


def test_ends_with_completion_time_and_best_values(one_epoch):
    lines, metrics, _ = one_epoch
    assert re.fullmatch(r"Training completed in \d+m \d+s", lines[-2]), lines[-2]
    best = re.fullmatch(rf"Best average loss: {NUMBER} \| Best average accuracy: {NUMBER}", lines[-1])
    assert best, lines[-1]
    assert tuple(map(float, best.groups())) == (round(metrics["best_val_loss"], 4),
                                                 round(metrics["best_val_acc"], 4))


def test_log_output_has_no_carriage_returns(two_workers):
    stdout, _ = two_workers
    assert "Iter: " in stdout  # progress is still reported ...
    assert "\r" not in stdout  # ... but as whole lines, readable in a Slurm log


def test_log_output_reports_progress_every_ten_batches_and_at_the_last(two_workers):
    stdout, _ = two_workers
    iters = re.findall(r"^Phase: train Epoch: 1/1 Iter: (\d+)/(\d+) ", stdout, flags=re.M)
    assert iters == [(str(TRAIN_BATCHES), str(TRAIN_BATCHES))]  # 3 batches: only the last is printed


# ----------------------------------------------------------------------------
# Metrics JSON and saved head


def test_metrics_record_the_run_configuration(one_epoch, tiny_data):
    _, metrics, _ = one_epoch
    config = metrics["config"]
    assert config["data_dir"] == tiny_data
    assert (config["epochs"], config["weights"], config["batch_size"], config["lr"], config["seed"]) == (
        1, "none", 4, 0.0004, 42)
    assert config["classes"] == sorted(TINY_COUNTS["train"])


def test_metrics_record_a_single_process_on_the_cpu(one_epoch):
    _, metrics, _ = one_epoch
    assert (metrics["world_size"], metrics["rank_source"], metrics["device"]) == (1, "single", "cpu")


def test_metrics_record_where_each_rank_ran(one_epoch):
    _, metrics, _ = one_epoch
    (rank,) = metrics["ranks"]
    assert (rank["rank"], rank["local_rank"], rank["host"]) == (0, 0, socket.gethostname())
    assert cpu_set(rank["cpus"]) == os.sched_getaffinity(0) and "gpu" not in rank
    assert len(rank["head_sha256"]) == 64 and len(rank["buffers_sha256"]) == 64


def test_buffer_digest_tells_apart_models_whose_batchnorm_statistics_differ():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    same, other = copy.deepcopy(model), copy.deepcopy(model)
    other.layer4[1].bn2.running_var[7] += 1e-3  # one statistic of one channel
    assert records.buffers_digest(same) == records.buffers_digest(model)
    assert records.buffers_digest(other) != records.buffers_digest(model)
    other.load_state_dict(model.state_dict())
    other.bn1.num_batches_tracked += 1
    assert records.buffers_digest(other) != records.buffers_digest(model)


def test_metrics_record_the_kokkos_execution_space_that_simulated_the_circuit(one_epoch):
    _, metrics, _ = one_epoch
    qdevice = metrics["provenance"]["qdevice"]
    space, _ = kokkos_build()
    runs_on = "gpu" if space in GPU_SPACES else "cpu"
    assert (qdevice["name"], qdevice["kokkos_device"], qdevice["runs_on"]) == ("lightning.kokkos", space, runs_on)


def test_metrics_record_the_software_and_environment_of_the_run(one_epoch):
    _, metrics, _ = one_epoch
    run = metrics["provenance"]
    assert (run["torch"], run["cuda"], run["hip"]) == (torch.__version__, torch.version.cuda, torch.version.hip)
    assert run["collectives"] is None and run["master"] is None  # gloo, one process
    assert run["group_backends"] is None  # one process joins no process group
    assert run["omp"] == {var: os.environ.get(var) for var in ("OMP_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES")}
    assert run["slurm_job_id"] is None and run["hosts"] == [socket.gethostname()]


def test_metrics_record_package_versions(one_epoch):
    _, metrics, _ = one_epoch
    assert metrics["versions"]["torch"] == metadata.version("torch")
    assert metrics["versions"]["torchvision"] == metadata.version("torchvision")
    assert metrics["versions"]["pennylane"] == metadata.version("pennylane")


def test_metrics_record_the_epoch(one_epoch):
    _, metrics, _ = one_epoch
    (record,) = metrics["epochs"]
    assert record["epoch"] == 1
    assert "time_split" not in record  # only --time-split runs synchronise to measure it
    assert (record["train_count"], record["val_count"]) == (N_TRAIN, N_VAL)
    for phase, count in (("train", N_TRAIN), ("val", N_VAL)):
        assert 0 < record[f"{phase}_loss"] < 10
        assert record[f"{phase}_acc"] * count == pytest.approx(round(record[f"{phase}_acc"] * count))  # k/count
    assert 0 < record["seconds"] <= metrics["training_seconds"]


def test_metrics_best_values_agree_with_the_epoch_records(one_epoch):
    _, metrics, _ = one_epoch
    epochs = metrics["epochs"]
    assert metrics["best_val_acc"] == max(e["val_acc"] for e in epochs)
    assert metrics["best_val_loss"] == min(e["val_loss"] for e in epochs)
    assert metrics["best_train_acc"] == max(e["train_acc"] for e in epochs)
    assert metrics["best_train_loss"] == min(e["train_loss"] for e in epochs)


def test_save_writes_the_dressed_head_state_dict(one_epoch):
    _, _, head = one_epoch
    state = torch.load(head, map_location="cpu", weights_only=True)["head"]
    assert {k: tuple(v.shape) for k, v in state.items()} == HEAD_SHAPES
    ReferenceHead().load_state_dict(state)  # strict: loads into a head built independently of qml.py


def test_workers_0_and_2_give_identical_metrics(one_epoch, two_workers):
    _, zero, _ = one_epoch
    _, two = two_workers
    keys = ("train_loss", "train_acc", "train_count", "val_loss", "val_acc", "val_count")
    assert [{k: e[k] for k in keys} for e in zero["epochs"]] == [{k: e[k] for k in keys} for e in two["epochs"]]


# ----------------------------------------------------------------------------
# Faithfulness: an independent single-process rendering of the tutorial's train_model


def reference_circuit():
    """The tutorial's variational circuit on default.qubit, one image at a time."""
    import pennylane as qp

    @qp.qnode(qp.device("default.qubit", wires=4), interface="torch")
    def run(angles, weights):
        for wire in range(4):  # |+> on every wire
            qp.Hadamard(wires=wire)
        for wire in range(4):  # embed the features
            qp.RY(angles[wire], wires=wire)
        for layer in weights.reshape(6, 4):
            for wire in (0, 2, 1):  # CNOTs on (0,1), (2,3), then (1,2)
                qp.CNOT(wires=[wire, wire + 1])
            for wire in range(4):
                qp.RY(layer[wire], wires=wire)
        return [qp.expval(qp.PauliZ(wire)) for wire in range(4)]

    return run


class ReferenceHead(nn.Module):
    """512 -> 4 -> circuit -> 2, parameters created in the tutorial's order."""

    def __init__(self):
        super().__init__()
        self.pre_net = nn.Linear(512, 4)
        self.q_params = nn.Parameter(0.01 * torch.randn(24))
        self.post_net = nn.Linear(4, 2)
        self.circuit = reference_circuit()

    def forward(self, features):
        angles = torch.tanh(self.pre_net(features)) * np.pi / 2
        return self.post_net(torch.stack([torch.stack(self.circuit(a, self.q_params)).float() for a in angles]))


def tutorial_one_epoch(data_dir):
    """One epoch of the tutorial's loop: ({phase: (loss, acc, count)}, trained head state_dict)."""
    import torchvision
    from torch.utils.data import DataLoader, DistributedSampler
    from torchvision import datasets, transforms

    torch.manual_seed(42)
    np.random.seed(42)
    model = torchvision.models.resnet18(weights=None)
    for param in model.parameters():
        param.requires_grad = False
    model.fc = ReferenceHead()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.fc.parameters(), lr=0.0004)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.1)
    prep = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                               transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    results = {}
    for phase, folder in (("train", "train"), ("validation", "val")):
        images = datasets.ImageFolder(os.path.join(data_dir, folder), prep)
        loader = DataLoader(images, batch_size=4, sampler=DistributedSampler(images, num_replicas=1, rank=0))
        model.train(phase == "train")
        loss_sum, correct, count = 0.0, 0, 0
        for inputs, labels in loader:
            optimizer.zero_grad()
            with torch.set_grad_enabled(phase == "train"):
                outputs = model(inputs)
                loss = criterion(outputs, labels)
                if phase == "train":
                    loss.backward()
                    optimizer.step()
            loss_sum += loss.item() * len(inputs)
            correct += (outputs.argmax(1) == labels).sum().item()
            count += len(labels)
        results[phase] = (loss_sum / count, correct / count, count)
        if phase == "train":
            scheduler.step()
    head = {k: v.detach().clone() for k, v in model.fc.state_dict().items()}
    return results, head


@pytest.fixture(scope="module")
def tutorial_epoch(tiny_data):
    return tutorial_one_epoch(tiny_data)


@pytest.mark.parametrize("phase, key", [("train", "train"), ("validation", "val")])
def test_loss_and_accuracy_match_the_tutorial(one_epoch, tutorial_epoch, phase, key):
    _, metrics, _ = one_epoch
    record, (loss, acc, count) = metrics["epochs"][0], tutorial_epoch[0][phase]
    assert record[f"{key}_count"] == count
    assert record[f"{key}_loss"] == pytest.approx(loss, abs=5e-5)  # equal to the printed 4 decimals
    assert record[f"{key}_acc"] == pytest.approx(acc, abs=5e-5)


def test_saved_head_matches_the_tutorial_head_after_one_epoch(one_epoch, tutorial_epoch):
    _, _, head = one_epoch
    saved, expected = torch.load(head, map_location="cpu", weights_only=True)["head"], tutorial_epoch[1]
    for name, value in expected.items():
        torch.testing.assert_close(saved[name], value, atol=1e-5, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------
# Several epochs: the bests are not the last epoch's, --save keeps the best head, the learning rate's schedule

SEVERAL_EPOCHS = ["--weights", "none", "--qdevice", "torch", "--workers", "0", "--print-freq", "0", "--device", "cpu"]


def tinted_image_folder(root, counts, seed=0):
    """Random JPEGs whose class shows in their colour (the first class reddish, the second bluish), so that even
    a random backbone tells them apart: accuracy can climb to 1 and fall back."""
    rng = np.random.default_rng(seed)
    for split, classes in counts.items():
        for tint, (name, n) in enumerate(classes.items()):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 128, (40, 48, 3), dtype=np.uint8)
                pixels[..., 2 * tint] += 127
                Image.fromarray(pixels).save(os.path.join(folder, f"{i}.jpg"))
    return str(root)


def in_process_run(argv, tmp, recording):
    """qml.main(argv) in this process, with checkpoints.save_checkpoint (called after every epoch under
    --checkpoint) also calling recording(run); the signal handlers main installs are given back."""
    save_checkpoint = checkpoints.save_checkpoint
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}

    def save_and_record(path, run):
        save_checkpoint(path, run)
        recording(run)

    checkpoints.save_checkpoint = save_and_record
    try:
        assert qml.main([*argv, "--checkpoint", str(tmp / "run.pt")]) == 0
    finally:
        checkpoints.save_checkpoint = save_checkpoint
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


@pytest.fixture(scope="module")
def best_not_last(tmp_path_factory):
    """Three epochs whose learning rate grows tenfold each epoch (--step-size 1 --gamma 10): the head learns the
    tinted classes, then overshoots. Returns (metrics JSON, saved head, [the head after each epoch])."""
    tmp = tmp_path_factory.mktemp("best_not_last")
    data = tinted_image_folder(tmp / "data", TINY_COUNTS)
    heads = []
    in_process_run(["--data-dir", data, *SEVERAL_EPOCHS, "--epochs", "3", "--lr", "0.01", "--step-size", "1",
                    "--gamma", "10", "--metrics-json", str(tmp / "metrics.json"), "--save", str(tmp / "head.pt")],
                   tmp, lambda run: heads.append({k: v.detach().clone() for k, v in run.model.fc.state_dict().items()}))
    return (json.loads((tmp / "metrics.json").read_text()), torch.load(tmp / "head.pt", weights_only=True)["head"],
            heads)


@pytest.mark.parametrize("best, key, pick", [("best_val_acc", "val_acc", max), ("best_val_loss", "val_loss", min),
                                             ("best_train_acc", "train_acc", max),
                                             ("best_train_loss", "train_loss", min)],
                         ids=["val-acc", "val-loss", "train-acc", "train-loss"])
def test_best_of_several_epochs_is_the_best_epochs_value_not_the_last(best_not_last, best, key, pick):
    metrics, _, _ = best_not_last
    history = [epoch[key] for epoch in metrics["epochs"]]
    assert len(history) == 3 and pick(history) != history[-1], history  # this run can tell best from last ...
    assert metrics[best] == pick(history), (metrics[best], history)  # ... and keeps the best


def test_save_writes_the_head_of_the_first_epoch_with_the_best_validation_accuracy(best_not_last):
    metrics, saved, heads = best_not_last
    accuracies = [epoch["val_acc"] for epoch in metrics["epochs"]]
    best = accuracies.index(max(accuracies))  # the tutorial keeps the first epoch that reaches the best
    assert len(heads) == 3 and best != 2, accuracies
    assert set(saved) == set(heads[best]) == set(HEAD_SHAPES)
    assert not all(torch.equal(heads[best][k], heads[-1][k]) for k in saved)  # the last head differs ...
    for name in saved:
        assert torch.equal(saved[name], heads[best][name]), name  # ... and the best epoch's is saved


def test_learning_rate_decays_by_gamma_every_step_size_epochs(tiny_data, tmp_path):
    """3 epochs of 3 optimizer steps each, --step-size 2 --gamma 0.1: the rate drops once, after epoch 2."""
    lrs = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: lrs.append(optimizer.param_groups[0]["lr"]))
    try:
        in_process_run(["--data-dir", tiny_data, *SEVERAL_EPOCHS, "--epochs", "3", "--lr", "0.0004",
                        "--step-size", "2", "--gamma", "0.1"], tmp_path, lambda run: None)
    finally:
        hook.remove()
    assert lrs == pytest.approx([0.0004] * 2 * TRAIN_BATCHES + [0.00004] * TRAIN_BATCHES, rel=1e-12)
