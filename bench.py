"""The speed benchmark of qml.py: epochs, the cached run and the circuit, timed in fresh processes.

    python bench.py [--data-dir DIR] [--weights none] [--epochs 3] [--cached-epochs 30] [--rounds 1]
                    [--max-qubits 28] [--qubit-seconds 30] [--only all|qubits|qpu]

prints a table of times and ratios (the first row of each group is 1.00x), a table of where an epoch's
time goes (qml.py --time-split: data loading, backbone, dressed head, all-reduce, optimizer), and the circuit's
time by qubit count on every installed simulator, on whatever device qml.py picks (a GPU when one is visible).
Compare ratios measured in one run, not times across runs.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import qml
from machinery import command_line, images, records, report, simulators

QML = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qml.py")
QUBIT_COUNTS = (4, 8, 12, 16, 20, 24, 28)


def time_circuit(qdevice, per_sample, batch=4, nqubits=qml.n_qubits, budget=1.0, shots=None, noise=None):
    """Median seconds of forward+backward of the dressed head's circuit for one batch, on the device qml.py picks
    (a GPU when visible): a warm-up call, then as many as fit in `budget` seconds (at least one, at most 20)."""
    device = qml.pick_device("auto", 0)
    torch.manual_seed(0)
    head = qml.DressedQuantumNet(n_qubits=nqubits, qdevice=qdevice, per_sample=per_sample, device_id=device.index,
                                 shots=shots, noise=noise, seed=0).to(device)
    features = torch.randn(batch, 512, device=device)
    times = []
    while len(times) < 2 or (len(times) < 21 and sum(times[1:]) < budget):
        start = time.perf_counter()
        head(features).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def time_run(extra, args, tmp, launcher=()):
    """Run qml.py in a fresh process (under `launcher`, if given); returns (wall seconds, its metrics JSON)."""
    metrics = os.path.join(tmp, "metrics.json")
    command = [sys.executable, *launcher, QML, "--data-dir", args.data_dir,
               "--weights", args.weights, "--print-freq", "0", "--metrics-json", metrics, *extra]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        last = result.stderr.strip().splitlines()[-1:]
        raise command_line.UsageError(f"benchmark run {' '.join(extra)} failed: {last}")
    with open(metrics) as file:
        return wall, json.load(file)


def bench_setups(device):
    """(label, options) of the epoch table: the tutorial's equivalent (its 1.00x row), the default, then each
    speed option alone and the fastest combination; fp16 only on a GPU, bf16 where the device computes it (qml.py
    refuses it on a CPU without bfloat16 instructions)."""
    has_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else images.cpu_computes_bf16() is not False
    precisions = ["bf16"] if has_bf16 else []
    precisions += ["fp16"] if device.type == "cuda" else []
    torch_qdevice = ["--qdevice", simulators.TORCH_QDEVICE]
    setups = [("tutorial-equivalent: --per-sample --image-cache off", ["--per-sample", "--image-cache", "off"]),
              ("default", []), ("--image-cache off", ["--image-cache", "off"]),
              ("--qdevice torch", torch_qdevice)]
    for precision in precisions:
        setups += [(f"--precision {precision}", ["--precision", precision]),
                   (f"--precision {precision} --qdevice torch", ["--precision", precision, *torch_qdevice])]
    return setups + [("--cache-features --bn-mode eval", ["--cache-features", "--bn-mode", "eval"])]


def epoch_rows(args, tmp):
    """Per setup, run as one DDP rank (so that the all-reduce is real) with --time-split, --rounds times with the
    setups taking turns (a burst of other processes' load then hits them alike): its fastest first epoch, its
    fastest later one relative to the tutorial-equivalent's, where that epoch's seconds went, and the first
    epoch's metrics (train loss/acc, val loss/acc; the same in every round)."""
    one_rank = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1")
    setups = bench_setups(qml.pick_device("auto", 0))
    runs = {label: [] for label, _ in setups}
    for _ in range(args.rounds):
        for label, extra in setups:
            command = ["--epochs", str(args.epochs), "--time-split", *extra]
            runs[label].append(time_run(command, args, tmp, launcher=one_rank)[1])
    rows, base = [], None
    for label, metrics in runs.items():
        first = min((run["epochs"][0] for run in metrics), key=lambda record: record["seconds"])
        epoch = min((record for run in metrics for record in run["epochs"][1:]), key=lambda record: record["seconds"])
        base = base or epoch["seconds"]
        split = [f"{seconds:.2f}" for seconds in epoch["time_split"].values()]
        first_metrics = "/".join(f"{first[key]:.4f}" for key in ("train_loss", "train_acc", "val_loss", "val_acc"))
        rows.append((f"{label} ({metrics[0]['device']}, {metrics[0]['backend']})", f"{first['seconds']:.2f}",
                     f"{epoch['seconds']:.2f}", f"{epoch['seconds'] / base:.2f}x", *split, first_metrics))
    return rows


def cached_rows(args, tmp):
    rows, base = [], None
    for qdevice in (simulators.KOKKOS_QDEVICE, simulators.TORCH_QDEVICE):
        wall = min(time_run(["--epochs", str(args.cached_epochs), "--cache-features", "--bn-mode", "eval",
                             "--qdevice", qdevice], args, tmp)[0] for _ in range(args.rounds))
        base = base or wall
        rows.append((f"{args.cached_epochs} epochs --cache-features, {qdevice} (process start to exit)",
                     f"{wall:.2f} s", f"{wall / base:.2f}x"))
    return rows


def circuit_qdevices():
    return [d for d in (simulators.TORCH_QDEVICE, simulators.KOKKOS_QDEVICE, "lightning.qubit", "lightning.gpu",
                        "default.qubit") if d in simulators.available_qdevices()]


def circuit_rows():
    rows = []
    for qdevice in circuit_qdevices():
        loop, batched = time_circuit(qdevice, True), time_circuit(qdevice, False)
        rows.append((f"circuit fwd+bwd, batch of 4, {qdevice}: per-sample", f"{loop * 1000:.1f} ms", "1.00x"))
        rows.append((f"circuit fwd+bwd, batch of 4, {qdevice}: broadcast", f"{batched * 1000:.1f} ms",
                     f"{batched / loop:.2f}x"))
    return rows


QPU_SHOTS = 1000  # the shots of the QPU table's rows
QPU_NOISE = "depolarizing=0.01+readout=0.02"  # its noise model


def qpu_rows():
    """The circuit's forward+backward for a batch of 4 on every path, exact (today's), with QPU_SHOTS shots (the
    parameter-shift rule) and with QPU_NOISE, measured side by side; each path's exact row is its 1.00x. default.mixed
    with both shots and noise is left out: it ran each of the batch's 228 circuits for about 0.25 s here."""
    rows = []
    for qdevice in circuit_qdevices() + ["default.mixed"]:
        setups = [("exact", {}), (f"{QPU_SHOTS} shots", dict(shots=QPU_SHOTS))] if qdevice != "default.mixed" else \
            [("exact", {}), (f"--noise {QPU_NOISE}", dict(noise=QPU_NOISE))]
        base = None
        for label, options in setups:
            seconds = time_circuit(qdevice, False, **options)
            base = base or seconds
            rows.append((f"circuit fwd+bwd, batch of 4, {qdevice}: {label}", f"{seconds * 1000:.1f} ms",
                         f"{seconds / base:.2f}x"))
    return rows + shifted_batch_rows()


def shifted_batch_rows(batch=4):
    """--qdevice torch with QPU_SHOTS shots: a training step (forward and parameter-shift backward of a batch of 4)
    against the exact forward of the same circuits as one broadcast batch: 4 x 57 images, and the 228 circuits at
    the shifted values (each its own weights), both without autograd."""
    device = qml.pick_device("auto", 0)
    sampled = qml.make_quantum_net(qml.n_qubits, qml.q_depth, qml.n_qubits * qml.q_depth, simulators.TORCH_QDEVICE,
                                   shots=QPU_SHOTS, seed=0)
    exact = qml.make_quantum_net(qml.n_qubits, qml.q_depth, qml.n_qubits * qml.q_depth, simulators.TORCH_QDEVICE)
    inputs = torch.rand(batch, qml.n_qubits, dtype=torch.float64, device=device, requires_grad=True)
    weights = torch.rand(qml.n_qubits * qml.q_depth, dtype=torch.float64, device=device, requires_grad=True)
    circuits = batch * (1 + len(sampled.shifts))
    many = torch.rand(circuits, qml.n_qubits, dtype=torch.float64, device=device)
    sampled(inputs, weights)  # on the device
    shifted = sampled.parameters(inputs, weights).detach().repeat(1 + len(sampled.shifts), 1)

    def step():
        torch.autograd.grad(torch.stack(sampled(inputs, weights)).sum(), (inputs, weights))

    with torch.no_grad():
        images = median_time(lambda: exact(many, weights))
        at_shifts = median_time(lambda: sampled.probabilities(shifted))
    seconds = median_time(step)
    return [(f"torch: exact forward of {circuits} images as one batch", f"{images * 1000:.2f} ms", "1.00x"),
            (f"torch: exact forward of a step's {circuits} shifted circuits (each its own weights) as one batch",
             f"{at_shifts * 1000:.2f} ms", f"{at_shifts / images:.2f}x"),
            (f"torch, {QPU_SHOTS} shots: a training step of a batch of {batch} ({circuits} circuits, sampled)",
             f"{seconds * 1000:.2f} ms", f"{seconds / images:.2f}x")]


def median_time(call, repeats=50):
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def qubit_rows(args):
    """Per installed path, the broadcast circuit's forward+backward for a batch of 4 at each of QUBIT_COUNTS, up to
    --max-qubits: '-' where the memory check refuses the count (it says what it needs), or past a count that took
    more than --qubit-seconds."""
    rows = []
    for qdevice in circuit_qdevices():
        cells, stop = [], None
        for nqubits in QUBIT_COUNTS:
            if stop or nqubits > args.max_qubits:
                cells.append(stop or "-")
                continue
            try:
                qml.check_circuit_memory(qubit_args(qdevice, nqubits), one_process())
            except command_line.UsageError as refused:
                stop = f"needs {re.search(r'needs about (.*?) [(]', str(refused)).group(1)}"
                cells.append(stop)
                continue
            seconds = time_circuit_alone(qdevice, nqubits)
            cells.append(f"{seconds * 1000:.1f}" if seconds < 10 else f"{seconds:.1f} s")
            stop = f"> {args.qubit_seconds:g} s" if seconds > args.qubit_seconds else None
        rows.append((qdevice, *cells))
    return rows


def qubit_args(qdevice, nqubits):
    """qml.py's options for a batch of 4 through this circuit, the others at their defaults."""
    return qml.get_args_parser().parse_args(["--qdevice", qdevice, "--n-qubits", str(nqubits), "--batch-size", "4"])


def time_circuit_alone(qdevice, nqubits):
    """time_circuit in a fresh process: lightning.kokkos keeps the threads it started with, which depend on the
    qubit count (simulators.KOKKOS_ONE_THREAD_QUBITS)."""
    code = f"import bench; print(bench.time_circuit({qdevice!r}, False, nqubits={nqubits}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=os.path.dirname(QML))
    if result.returncode != 0:
        last = result.stderr.strip().splitlines()[-1:]
        raise command_line.UsageError(f"timing {qdevice} at {nqubits} qubits failed: {last}")
    return float(result.stdout.split()[-1])


def one_process():
    """The DistContext of a benchmark process: one rank on this host, on the device qml.py picks."""
    ctx = qml.DistContext(device=qml.pick_device("auto", 0))
    ctx.rank_facts = [{"host": "here"}]
    return ctx


def cpu_description():
    """The CPU's model and whether it computes bfloat16, which decides what --precision bf16 does on it."""
    bf16 = {True: "bfloat16 in hardware", False: "no bfloat16 (bf16 rows left out)",
            None: "bfloat16 unknown"}[images.cpu_computes_bf16()]
    return f"{platform.machine()} {images.cpu_name()} ({bf16})"


def machine_description():
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu_description()}, {os.cpu_count()} CPUs, {gpu}, "
            f"torch {torch.__version__}, pennylane {records.package_versions()['pennylane']}")


def get_args_parser():
    parser = command_line.ArgumentParser(prog="bench.py", description="Time qml.py's epoch, cached run and circuit.")
    parser.add_argument("--data-dir", default=os.environ.get("QML_DATA_DIR", images.DEFAULT_DATA_DIR),
                        help="ImageFolder root with train/ and val/, not downloaded here (default: $QML_DATA_DIR, "
                        "else data/hymenoptera_data beside qml.py, which python qml.py downloads when missing)")
    parser.add_argument("--weights", default="none", help="backbone weights for the timed runs, as qml.py's "
                        "--weights (default: %(default)s: a random backbone, the same compute as ImageNet's)")
    parser.add_argument("--epochs", type=at_least_2, default=3, help="epochs of each timed setup; the fastest "
                        "after the first is compared (default: %(default)s)")
    parser.add_argument("--cached-epochs", type=command_line.positive(int), default=30, help="epochs of each "
                        "--cache-features run, timed from process start to exit (default: %(default)s)")
    parser.add_argument("--rounds", type=command_line.positive(int), default=1, help="time every setup this many times "
                        "and "
                        "keep its fastest (on a machine shared with other work) (default: %(default)s)")
    parser.add_argument("--max-qubits", type=command_line.qubit_count, default=28, help="largest qubit count of the "
                        "qubit-scaling table (default: %(default)s; counts the memory check refuses are left out)")
    parser.add_argument("--qubit-seconds", type=command_line.positive(float), default=30.0, help="in the qubit-scaling "
                        "table, a path that took longer than this for one batch runs no larger count (default: "
                        "%(default)s)")
    parser.add_argument("--only", choices=("all", "qubits", "qpu"), default="all", help="qubits: only the "
                        "qubit-scaling table; qpu: only the table of shots and noise; neither needs a data set "
                        "(default: %(default)s)")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    print(f"Machine: {machine_description()}")
    if args.only == "all":
        images.check_layout(args.data_dir)
        with tempfile.TemporaryDirectory() as tmp:
            epochs = epoch_rows(args, tmp)
            rows = cached_rows(args, tmp) + circuit_rows()
        print("\nWhere an epoch's time goes (seconds; ratio: the later epoch's to the tutorial-equivalent's):")
        print(report.markdown_table(("run", "epoch 1", "later epoch", "ratio", *records.TimeSplit.PARTS,
                                  "epoch 1 train loss/acc, val loss/acc"), epochs))
        print()
        print(report.markdown_table(("what", "time", "ratio"), rows))
    if args.only in ("all", "qpu"):
        print("\nShots and noise (docs/qpu.md), side by side with the exact circuit:")
        print(report.markdown_table(("what", "time", "ratio"), qpu_rows()))
    if args.only == "qpu":
        return 0
    print(f"\nThe circuit's forward+backward for a batch of 4, ms, by qubit count (depth {qml.q_depth}):")
    print(report.markdown_table(("qdevice", *map(str, QUBIT_COUNTS)), qubit_rows(args)))
    return 0


def at_least_2(text):
    value = command_line.positive(int)(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be 2 or more (an epoch after the first is timed), got {text}")
    return value


if __name__ == "__main__":
    try:
        sys.exit(main())
    except command_line.UsageError as err:
        print("bench.py: error:", " ".join(str(err).split()), file=sys.stderr)
        sys.exit(2)
