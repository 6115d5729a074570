"""The speed benchmark of qml.py: epochs, the cached run and the circuit, timed in fresh processes.

    python bench.py [--data-dir DIR] [--weights none] [--cached-epochs 30]

prints a table of times and ratios (the first row of each group is 1.00x) and a table of where an epoch's
time goes (qml.py --time-split: data loading, backbone, dressed head, all-reduce, optimizer), on whatever
device qml.py picks (a GPU when one is visible). Compare ratios measured in one run, not times across runs.
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import qml

QML = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qml.py")


def time_circuit(qdevice, per_sample, batch=4, repeats=20):
    """Median seconds of forward+backward of the dressed head's circuit for one batch."""
    torch.manual_seed(0)
    head = qml.DressedQuantumNet(qdevice=qdevice, per_sample=per_sample)
    features = torch.randn(batch, 512)
    times = []
    for _ in range(repeats + 2):  # two warm-up calls
        start = time.perf_counter()
        head(features).sum().backward()
        times.append(time.perf_counter() - start)
    return float(np.median(times[2:]))


def time_run(extra, args, tmp, launcher=()):
    """Run qml.py in a fresh process (under `launcher`, if given); returns (wall seconds, its metrics JSON)."""
    metrics = os.path.join(tmp, "metrics.json")
    command = [sys.executable, *launcher, QML, "--data-dir", args.data_dir,
               "--weights", args.weights, "--print-freq", "0", "--metrics-json", metrics, *extra]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise qml.UsageError(f"benchmark run {' '.join(extra)} failed: {result.stderr.strip().splitlines()[-1:]}")
    with open(metrics) as file:
        return wall, json.load(file)


def epoch_rows(args, tmp):
    """Seconds of one epoch (the faster of two, to damp noise) in three setups, relative to the first."""
    setups = (
        ("--per-sample (the tutorial's loop)", ["--per-sample"]),
        ("default (one broadcast circuit call per batch)", []),
        ("default with --workers 1", ["--workers", "1"]),
    )
    rows, base = [], None
    for label, extra in setups:
        _, metrics = time_run(["--epochs", "2", *extra], args, tmp)
        seconds = min(record["seconds"] for record in metrics["epochs"])
        base = base or seconds
        rows.append((f"one epoch on {metrics['device']}, {label}", f"{seconds:.2f} s", f"{seconds / base:.2f}x"))
    return rows


def split_rows(args, tmp):
    """Where the second of two epochs spends its time, run as one DDP rank so that the all-reduce is real."""
    one_rank = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1")
    rows = []
    for label, extra in (("default", []), ("--cache-features", ["--cache-features", "--bn-mode", "eval"])):
        _, metrics = time_run(["--epochs", "2", "--time-split", *extra], args, tmp, launcher=one_rank)
        epoch = metrics["epochs"][-1]
        shares = [f"{seconds / epoch['seconds']:.0%}" for seconds in epoch["time_split"].values()]
        rows.append((f"{label} on {metrics['device']} ({metrics['backend']})", f"{epoch['seconds']:.2f} s", *shares))
    return rows


def cached_rows(args, tmp):
    rows, base = [], None
    for qdevice in (qml.KOKKOS_QDEVICE, qml.TORCH_QDEVICE):
        wall, _ = time_run(["--epochs", str(args.cached_epochs), "--cache-features", "--bn-mode", "eval",
                            "--qdevice", qdevice], args, tmp)
        base = base or wall
        rows.append((f"{args.cached_epochs} epochs --cache-features, {qdevice} (process start to exit)",
                     f"{wall:.2f} s", f"{wall / base:.2f}x"))
    return rows


def circuit_rows():
    rows = []
    for qdevice in [d for d in (qml.KOKKOS_QDEVICE, "lightning.qubit", "default.qubit", qml.TORCH_QDEVICE)
                    if d in qml.available_qdevices()]:
        loop, batched = time_circuit(qdevice, True), time_circuit(qdevice, False)
        rows.append((f"circuit fwd+bwd, batch of 4, {qdevice}: per-sample", f"{loop * 1000:.1f} ms", "1.00x"))
        rows.append((f"circuit fwd+bwd, batch of 4, {qdevice}: broadcast", f"{batched * 1000:.1f} ms",
                     f"{batched / loop:.2f}x"))
    return rows


def machine_description():
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} CPUs, {gpu}, "
            f"torch {torch.__version__}, pennylane {qml.package_versions()['pennylane']}")


def main(argv=None):
    parser = qml.ArgumentParser(prog="bench.py", description="Time qml.py's epoch, cached run and circuit.")
    parser.add_argument("--data-dir", default=os.environ.get("QML_DATA_DIR", qml.DEFAULT_DATA_DIR))
    parser.add_argument("--weights", default="none", help="backbone weights for the timed runs (default: none)")
    parser.add_argument("--cached-epochs", type=qml.positive(int), default=30)
    args = parser.parse_args(argv)
    qml.check_layout(args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        rows = epoch_rows(args, tmp) + cached_rows(args, tmp) + circuit_rows()
        splits = split_rows(args, tmp)
    print(f"Machine: {machine_description()}")
    print(qml.markdown_table(("what", "time", "ratio"), rows))
    print("\nWhere an epoch's time goes (--time-split, one DDP rank, second epoch):")
    print(qml.markdown_table(("run", "epoch", *qml.TimeSplit.PARTS), splits))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except qml.UsageError as err:
        print("bench.py: error:", " ".join(str(err).split()), file=sys.stderr)
        sys.exit(2)
