"""Hybrid quantum-classical transfer learning on HPC (OLCF "Python_QML_Basics").

A frozen ImageNet ResNet18 turns each image into 512 features; its `fc` layer is
replaced by `DressedQuantumNet`: Linear(512 -> n_qubits), a PennyLane variational
circuit simulated on `lightning.kokkos`, and Linear(n_qubits -> classes). Only the
dressed head trains, with DistributedDataParallel across Slurm/torchrun/MPI ranks.

    python qml.py                        # the tutorial's experiment
    python qml.py --help                 # every option
    python qml.py report runs/<jobid>    # scaling table of a submit_qml.sbatch sweep
    python bench.py                      # speed benchmark table (bench.py, beside this file)

Reading this file beside the tutorial; its sections come in this order:

    tutorial                                 here
    n_qubits, q_depth, q_delta               the same globals, below the imports
    H_layer, RY_layer, entangling_layer      "The quantum circuit": the same functions
    dev = qml.device(...), @qml.qnode        make_quantum_net(qdevice=...) wraps quantum_net in a QNode
      quantum_net                            (--per-sample), or on Lightning runs a batch of it through the
                                             device API (AdjointCircuit)
    DressedQuantumNet, resnet18 + fc         "The model": DressedQuantumNet, build_model
    setup: init_process_group; __main__:     "Distributed setup": init_distributed_mode (torchrun, srun,
      mpi4py ranks, MASTER_ADDR                mpiexec or one process; the device; the process group)
    data_transforms, ImageFolder, samplers   "Data": data_transforms, load_datasets, make_loaders
    train_model                              "Training": train_model (the epoch loop), prepare_training
                                             (model, optimizer, data, DDP), run_phase (one train or
                                             validation pass), record_best (the tutorial's bests)
    step, num_epochs, batch_size,            "Command line": --lr, --epochs, --batch-size, --gamma,
      gamma_lr_scheduler, manual_seed(42)      --seed (get_args_parser); setup: join, train, report, leave

Beyond the tutorial: qdevice "torch" (TorchCircuit, an exact simulator in torch, not a PennyLane device),
checkpoints (--checkpoint/--resume), run provenance (--metrics-json), and `report` for submit_qml.sbatch sweeps.
"""

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import glob
import hashlib
import importlib.util
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
import zipfile
import zlib
from importlib import metadata

# Launchers of MPI programs set these; mpiexec started us when one is present.
MPI_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALRANKID")
if any(var in os.environ for var in MPI_LAUNCHER_VARS):
    # Under Cray MPICH, mpi4py must load MPI before torch loads its libraries (OLCF's "PyTorch on
    # Frontier", MPICH mpi4py errors). Loading is not MPI_Init: that waits until mpi_ranks() needs it,
    # so that decoding workers are not forked after MPI_Init when the launcher's variables suffice.
    try:
        import mpi4py

        mpi4py.rc.initialize = False
        mpi4py.rc.finalize = True  # finalize at exit if mpi_ranks() initialised MPI
        from mpi4py import MPI  # noqa: F401
    except (ImportError, RuntimeError, OSError):  # no mpi4py, or no MPI library: discover_ranks copes
        pass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from PIL import Image
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS


def lazy_import(name):
    """The module `name`, loaded on the first use of one of its attributes (importlib's LazyLoader)."""
    spec = importlib.util.find_spec(name)
    if spec is None:  # as `import name` would say
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The tutorial's `import pennylane as qml`, loaded when a circuit is first built: importing PennyLane takes
# about 2 s, which a --qdevice torch run, `report` and a refused option do not need.
qml = lazy_import("pennylane")

# The tutorial's hyperparameters of the quantum layer.
n_qubits = 4  # Number of qubits
q_depth = 6  # Depth of the quantum circuit (number of variational layers)
q_delta = 0.01  # Initial spread of random quantum weights

DATA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
DOWNLOAD_TIMEOUT = 60  # seconds a stalled download may wait for the server
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hymenoptera_data")
# Image counts of the published ants/bees set, checked after a download.
HYMENOPTERA_COUNTS = {"train": {"ants": 124, "bees": 121}, "val": {"ants": 70, "bees": 83}}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
IMAGE_CACHE_SHARE = 0.25  # --image-cache auto keeps decoded images in up to this share of the available memory
KOKKOS_QDEVICE = "lightning.kokkos"  # PennyLane's Kokkos simulator: OpenMP on CPUs, HIP or CUDA on GPUs
DEFAULT_QDEVICE = KOKKOS_QDEVICE  # the tutorial's
TORCH_QDEVICE = "torch"  # our exact batched simulator, see TorchCircuit
# PennyLane devices whose circuits run through the device API (AdjointCircuit) instead of a QNode.
ADJOINT_QDEVICES = (KOKKOS_QDEVICE, "lightning.qubit")
# Up to this many qubits lightning.kokkos simulates on one CPU thread: a gate on 2^13 amplitudes takes
# microseconds, less than an OpenMP team's barrier, and Kokkos' threads waiting beside torch's for the same
# cores made a 4-qubit batch take 170-450 ms instead of 13 ms on a busy 2-core machine.
KOKKOS_ONE_THREAD_QUBITS = 13
DEFAULT_BATCH_SIZE = 4  # the tutorial's images per batch per rank
# --lr-scaling linear multiplies --lr by global batch / this: the tutorial's images per step, one task.
REFERENCE_GLOBAL_BATCH = DEFAULT_BATCH_SIZE
# Options that must match for a checkpoint to be resumed.
RESUME_KEYS = ("n_qubits", "q_depth", "q_delta", "weights", "bn_mode", "cache_features", "batch_size",
               "lr", "gamma", "step_size", "seed", "shuffle_seed", "n_classes", "classes", "precision")
# --precision: the dtype the frozen backbone's forward is autocast to.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UsageError(Exception):
    """Bad input or environment: main() prints the one-line message and exits with status 2."""


class RunFailed(Exception):
    """A started run cannot go on (a full disk, a rank gone, an image gone): one line, exit status 1."""


class ImageUnreadable(Exception):
    """An image that became unreadable after the start-up check. Raised in a DataLoader worker, it comes
    back with the worker's traceback as its message, whose last line holds the original message."""

    def __init__(self, message):
        last = message.rstrip().splitlines()[-1]
        super().__init__(last.split(f"{type(self).__name__}: ", 1)[-1])


# ----------------------------------------------------------------------------
# The quantum circuit (the tutorial's H_layer, RY_layer, entangling_layer, dev and quantum_net)


def H_layer(nqubits):
    """Layer of single-qubit Hadamard gates: start from |+>, unbiased w.r.t. |0> and |1>."""
    for idx in range(nqubits):
        qml.Hadamard(wires=idx)


def RY_layer(w):
    """Layer of RY rotations; w[..., i] rotates wire i (a leading batch dimension broadcasts)."""
    for idx in range(w.shape[-1]):
        qml.RY(w[..., idx], wires=idx)


def entangling_layer(nqubits):
    """CNOTs on the even pairs (0,1), (2,3), ... then on the odd pairs (1,2), (3,4), ..."""
    for i in range(0, nqubits - 1, 2):
        qml.CNOT(wires=[i, i + 1])
    for i in range(1, nqubits - 1, 2):
        qml.CNOT(wires=[i, i + 1])


def quantum_net(q_input_features, q_weights_flat, nqubits=n_qubits, depth=q_depth):
    """The variational circuit: H layer, RY embedding, depth x [entangle, RY], <Z> on every wire.

    The tutorial decorates it with @qml.qnode(dev) for one device; make_quantum_net wraps it for any.
    """
    q_weights = q_weights_flat.reshape(depth, nqubits)
    H_layer(nqubits)
    RY_layer(q_input_features)
    for k in range(depth):
        entangling_layer(nqubits)
        RY_layer(q_weights[k])
    return [qml.expval(qml.PauliZ(position)) for position in range(nqubits)]


def make_quantum_net(nqubits=n_qubits, depth=q_depth, qdevice=DEFAULT_QDEVICE, device_id=None, qnode=False):
    """quantum_net on `qdevice` as a callable (q_input_features, q_weights_flat) -> list of <Z>: the
    tutorial's `dev = qml.device(...)` and `@qml.qnode(dev, interface="torch")`, for these sizes.

    device_id: the rank's GPU, for a GPU build of lightning.kokkos (None: Kokkos' own choice).
    qnode: a QNode even on ADJOINT_QDEVICES (the tutorial's way: --per-sample, and drawing); otherwise those
    devices run the circuit through AdjointCircuit. qdevice "torch" is not PennyLane's: see TorchCircuit.
    """
    if qdevice == TORCH_QDEVICE:
        return TorchCircuit(nqubits, depth)
    dev = qml.device(qdevice, wires=nqubits, **qdevice_options(qdevice, device_id, nqubits))
    circuit = functools.partial(quantum_net, nqubits=nqubits, depth=depth)
    if qdevice in ADJOINT_QDEVICES and not qnode:
        net = AdjointCircuit(circuit, dev)
    else:
        net = qml.QNode(circuit, dev, interface="torch")
    if qdevice == KOKKOS_QDEVICE:
        start_kokkos(net, nqubits, depth)
    return net


def start_kokkos(net, nqubits, depth):
    """Run the circuit once, so that Kokkos starts now, then give torch back its threads: Kokkos shares torch's
    OpenMP runtime, and starting it with one thread (qdevice_options) left torch one thread too (its backbone
    then ran at half speed). Kokkos keeps the threads it started with."""
    threads = torch.get_num_threads()
    with torch.no_grad():
        net(torch.zeros(nqubits), torch.zeros(depth * nqubits))
    torch.set_num_threads(threads)


class AdjointCircuit:
    """quantum_net on a Lightning device through PennyLane's device API: per batch one call of the device's
    execute_and_compute_derivatives (execute without gradients), one tape per image, adjoint Jacobians computed
    with the values. A QNode's workflow around each call (tape construction, transforms, interface) costs more
    than simulating this small circuit; the device's work is the same. Values come back in float64 (a QNode
    rounds them to its float32 inputs' dtype; the dressed head rounds them the same way).
    """

    def __init__(self, circuit, dev):
        """circuit: quantum_net with its sizes bound (a QNode's `func`, so named here too)."""
        self.func, self.device = circuit, dev
        self.nqubits, depth = circuit.keywords["nqubits"], circuit.keywords["depth"]
        self.config = dev.setup_execution_config(qml.devices.ExecutionConfig(gradient_method="adjoint"))
        # Built once; its parameters are the inputs' angles, then the weights.
        self.template = qml.tape.make_qscript(circuit)(np.zeros(self.nqubits), np.zeros(depth * self.nqubits))
        self.inputs, self.weights = range(self.nqubits), range(self.nqubits, self.template.num_params)

    def tapes(self, q_input_features, q_weights_flat):
        """One tape per image. The weights are bound once per batch: binding all of a tape's parameters
        anew for every image took 9x longer (0.5 ms a tape, most of a batch's call)."""
        shared = self.template.bind_new_parameters(q_weights_flat.detach().cpu().double().numpy(), self.weights)
        angles = q_input_features.detach().cpu().double().numpy().reshape(-1, self.nqubits)
        return [shared.bind_new_parameters(image, self.inputs) for image in angles]

    def __call__(self, q_input_features, q_weights_flat):
        tapes = self.tapes(q_input_features, q_weights_flat)
        if torch.is_grad_enabled() and (q_input_features.requires_grad or q_weights_flat.requires_grad):
            expvals = AdjointExpvals.apply(q_input_features, q_weights_flat, self, tapes)
        else:
            expvals = torch.from_numpy(np.array(self.device.execute(tapes, self.config)))
        expvals = expvals.reshape(*q_input_features.shape[:-1], self.nqubits).to(q_input_features.device)
        return list(expvals.unbind(-1))


class AdjointExpvals(torch.autograd.Function):
    """<Z> of an AdjointCircuit's tapes, (images, wires); backward contracts the Jacobians computed with them."""

    @staticmethod
    def forward(ctx, q_input_features, q_weights_flat, net, tapes):
        values, jacobians = net.device.execute_and_compute_derivatives(tapes, net.config)
        ctx.jacobians = torch.from_numpy(np.array(jacobians)).reshape(len(tapes), net.nqubits, -1)
        ctx.input_shape = q_input_features.shape
        ctx.like = (q_input_features.device, q_input_features.dtype), (q_weights_flat.device, q_weights_flat.dtype)
        return torch.from_numpy(np.array(values)).reshape(len(tapes), net.nqubits)

    @staticmethod
    def backward(ctx, grad_expvals):
        grads = torch.einsum("iw,iwp->ip", grad_expvals.cpu().double(), ctx.jacobians)  # (images, parameters)
        nqubits, (inputs_like, weights_like) = ctx.input_shape[-1], ctx.like
        grad_inputs = grads[:, :nqubits].reshape(ctx.input_shape).to(*inputs_like)
        return grad_inputs, grads[:, nqubits:].sum(0).to(*weights_like), None, None


def qdevice_options(qdevice, device_id, nqubits):
    """lightning.kokkos' settings: no OMP_PROC_BIND warning (binding threads would shrink the rank's CPU mask);
    on a GPU build this rank's GPU, since Kokkos does not read LOCAL_RANK; on a CPU rank one thread for a
    small state (see KOKKOS_ONE_THREAD_QUBITS). Only a process's first lightning.kokkos device initialises
    Kokkos, so these hold for the whole run."""
    if qdevice != KOKKOS_QDEVICE:
        return {}
    from pennylane_lightning.lightning_kokkos_ops import InitializationSettings

    settings = InitializationSettings().set_disable_warnings(True)
    if device_id is not None:
        settings = settings.set_device_id(device_id)
    elif nqubits <= KOKKOS_ONE_THREAD_QUBITS:
        settings = settings.set_num_threads(1)
    return {"kokkos_args": settings}


def available_qdevices():
    """Names accepted by --qdevice: every installed PennyLane device (the entry points that qml.device reads,
    found without importing PennyLane), plus our torch simulator."""
    return sorted({entry.name for entry in metadata.entry_points(group="pennylane.plugins")} | {TORCH_QDEVICE})


# ----------------------------------------------------------------------------
# The model (the tutorial's DressedQuantumNet in place of a frozen ResNet18's fc)


class DressedQuantumNet(nn.Module):
    """Linear(512 -> n_qubits), the circuit, Linear(n_qubits -> n_classes): the *dressed* quantum net."""

    def __init__(self, n_qubits=n_qubits, q_depth=q_depth, q_delta=q_delta, n_classes=2,
                 qdevice=DEFAULT_QDEVICE, per_sample=False, in_features=512, device_id=None):
        super().__init__()
        # Parameter creation order (pre_net, q_params, post_net) is the tutorial's: same seed, same numbers.
        self.pre_net = nn.Linear(in_features, n_qubits)
        self.q_params = nn.Parameter(q_delta * torch.randn(q_depth * n_qubits))
        self.post_net = nn.Linear(n_qubits, n_classes)
        self.per_sample = per_sample
        self.quantum_net = make_quantum_net(n_qubits, q_depth, qdevice, device_id, qnode=per_sample)

    def forward(self, input_features):
        with torch.autocast(input_features.device.type, enabled=False):  # fp32 after a --precision backbone
            q_in = torch.tanh(self.pre_net(input_features.float())) * math.pi / 2.0
            if self.per_sample:  # the tutorial's loop: one circuit call per image
                q_out = torch.stack([torch.hstack(self.quantum_net(elem, self.q_params)) for elem in q_in])
            else:  # one broadcast circuit call for the whole batch
                q_out = torch.stack(self.quantum_net(q_in, self.q_params), dim=-1)
            return self.post_net(q_out.float().to(input_features.device))


def resnet18_weights_error():
    return (f"cannot load ImageNet ResNet18 weights (offline?): put resnet18-f37072fd.pth into "
            f"{os.path.join(torch.hub.get_dir(), 'checkpoints')} (or set TORCH_HOME), "
            f"pass --weights PATH to a ResNet18 state_dict, or use --weights none")


def load_backbone(weights):
    """ResNet18 with `weights` (imagenet | none | PATH). Every choice draws the same random init first."""
    if weights == "imagenet":
        try:
            return torchvision.models.resnet18(weights=torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:  # offline, or a bad cached file
            raise UsageError(f"{resnet18_weights_error()} [{err}]") from None
    model = torchvision.models.resnet18(weights=None)
    if weights != "none":
        model.load_state_dict(read_resnet18_state_dict(weights, model.state_dict()))
    return model


def read_resnet18_state_dict(path, expected):
    """The state_dict in `path`, checked to have the keys and shapes of `expected` (a fresh ResNet18's)."""
    if not os.path.isfile(path):
        raise UsageError(f"--weights {path}: no such file; give a ResNet18 state_dict file, 'imagenet' or 'none'")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for unreadable files
        raise UsageError(f"--weights {path}: cannot read it ({type(err).__name__}); "
                         f"save one with torch.save(model.state_dict(), PATH)") from None
    if not isinstance(state, dict) or tensor_shapes(state) != tensor_shapes(expected):
        raise UsageError(f"--weights {path}: not a ResNet18 state_dict (keys or shapes differ); "
                         f"save one with torch.save(torchvision.models.resnet18().state_dict(), PATH)")
    return state


def check_precision(precision, device):
    """Refuse a --precision that this rank's device cannot compute in."""
    if precision == "fp16" and device.type == "cpu":
        raise UsageError("--precision fp16 needs a GPU: CPUs have no fast float16 convolutions; "
                         "use --precision bf16 (or fp32) on CPUs")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                         f"use --precision fp16 (or fp32)")


def backbone_autocast(precision, device):
    """The context of the backbone's forward: autocast to --precision (none for fp32)."""
    return torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")


def cast_frozen_convolutions(model, precision):
    """Store the backbone's convolution weights in --precision once. Autocast rounds them the same way, but at
    every batch: it keeps its casts only of weights that train."""
    if precision != "fp32":
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.to(PRECISIONS[precision])


def tensor_shapes(state):
    """{name: shape} of a state_dict; a value that is no tensor has the shape ()."""
    return {name: tuple(getattr(value, "shape", ())) for name, value in state.items()}


def build_model(args, n_classes, device_id=None):
    """Frozen ResNet18 whose fc is the dressed quantum head; random draws in the tutorial's order."""
    model = load_backbone(args.weights)
    for param in model.parameters():
        param.requires_grad = False
    model.fc = DressedQuantumNet(args.n_qubits, args.q_depth, args.q_delta, n_classes, args.qdevice,
                                 args.per_sample, model.fc.in_features, device_id)
    return model


def describe_qdevice(head, qdevice):
    """Where the circuit really runs; `summary` says it in a few words.

    lightning.kokkos tells its Kokkos execution space (OpenMP on CPUs; HIP or Cuda on GPUs): make_quantum_net
    has started Kokkos.
    """
    if qdevice == TORCH_QDEVICE:
        runs_on = str(head.q_params.device)
        return dict(name=qdevice, runs_on=runs_on,
                    summary=f"qml.py's exact torch simulator, not a PennyLane device, on {runs_on}")
    if qdevice != KOKKOS_QDEVICE:
        runs_on = "gpu" if "gpu" in qdevice else "cpu"
        return dict(name=qdevice, runs_on=runs_on, summary=f"PennyLane device on the {runs_on}")
    from pennylane_lightning.lightning_kokkos_ops import print_configuration

    config = print_configuration()
    version = re.search(r"Kokkos Version: (\S+)", config)
    space = re.search(r"Default Device: (\S+)", config)
    space = space.group(1) if space else "unknown"
    runs_on = "gpu" if space in ("Cuda", "HIP", "SYCL") else "cpu"
    return dict(name=qdevice, runs_on=runs_on, kokkos_version=version and version.group(1), kokkos_device=space,
                summary=f"Kokkos {space}, on the {runs_on}")


# ----------------------------------------------------------------------------
# qdevice "torch": qml.py's own exact simulator of quantum_net, not a PennyLane device


class TorchCircuit:
    """Exact statevector simulation of `quantum_net` in plain torch, batched and autograd-differentiable.

    H, RY and CNOT are real, so the state is a real vector of 2^n amplitudes (wire 0 most significant).
    PennyLane's per-call overhead (tens of ms) dominates this tiny circuit; this avoids it.
    """

    def __init__(self, nqubits, depth):
        self.nqubits, self.depth = nqubits, depth
        bits = (np.arange(2**nqubits)[:, None] >> np.arange(nqubits - 1, -1, -1)) & 1  # bits[j, wire]
        self.z_signs = torch.tensor(1 - 2 * bits, dtype=torch.float64)  # <Z_wire> = probs @ z_signs
        after = bits.copy()  # where the entangling layer's CNOTs send each basis state
        for first in (0, 1):
            for i in range(first, nqubits - 1, 2):
                after[:, i + 1] ^= after[:, i]
        target = after @ (1 << np.arange(nqubits - 1, -1, -1))
        self.entangle_source = torch.from_numpy(np.argsort(target))  # new[j] = old[source[j]]

    @staticmethod
    def _ry_matrices(angles):
        cos, sin = torch.cos(angles / 2), torch.sin(angles / 2)
        return torch.stack((torch.stack((cos, -sin), -1), torch.stack((sin, cos), -1)), -2)

    def __call__(self, q_input_features, q_weights_flat):
        x = q_input_features.to(torch.float64)
        weights = q_weights_flat.to(torch.float64).reshape(self.depth, self.nqubits)
        # H then RY(x) on |0> leaves each wire in (cos - sin, sin + cos)(x/2) / sqrt(2): a product state.
        cos, sin = torch.cos(x / 2), torch.sin(x / 2)
        wires = torch.stack((cos - sin, sin + cos), -1) / math.sqrt(2)
        state = wires[..., 0, :]
        for wire in range(1, self.nqubits):
            state = (state[..., :, None] * wires[..., wire, None, :]).flatten(-2)
        source = self.entangle_source.to(x.device)
        for layer in weights:
            rotations = functools.reduce(torch.kron, self._ry_matrices(layer))
            state = state[..., source] @ rotations.T
        expvals = (state * state) @ self.z_signs.to(x.device)
        return list(expvals.to(q_input_features.dtype).unbind(-1))


# ----------------------------------------------------------------------------
# Distributed setup (the tutorial's `setup` and `__main__`): torchrun, then Slurm, then mpiexec, then one process


@dataclasses.dataclass
class DistContext:
    """Where this process runs among the run's ranks: found once by init_distributed_mode, then passed on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single"  # who started the ranks: torchrun, slurm, mpi or single
    master_addr: str = "127.0.0.1"
    master_port: str = "29500"
    device: torch.device = torch.device("cpu")
    backend: str = "gloo"
    rank_facts: list = dataclasses.field(default_factory=list)  # every rank's rank_facts(), in rank order
    provenance: dict = dataclasses.field(default_factory=dict)  # what the run used: run_provenance()

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        """A launcher started us: even one task joins a process group and trains through DDP."""
        return self.source != "single"


def expand_nodelist(nodelist):
    """Hosts of a Slurm node list: 'frontier[00012-00014,00020],login1' -> frontier00012, ... login1.

    python-hostlist does it; where it is not installed (a prebuilt environment), Slurm's scontrol does.
    """
    try:
        import hostlist
    except ImportError:
        return scontrol_hostnames(nodelist)
    try:
        return hostlist.expand_hostlist(nodelist)
    except hostlist.BadHostlist as err:
        raise UsageError(f"cannot read the Slurm node list {nodelist!r} ({err}); set MASTER_ADDR") from None


def scontrol_hostnames(nodelist):
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise UsageError(f"cannot expand the Slurm node list {nodelist!r} ({err}); pip install python-hostlist "
                         f"or set MASTER_ADDR") from None
    return out.split()


# (rank, size, local rank, local size) variables of the MPI launchers that set all four:
# MPICH's and Cray MPICH's mpiexec (Hydra, PALS), and Open MPI's mpirun.
MPI_RANK_VARS = (("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
                 ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                  "OMPI_COMM_WORLD_LOCAL_SIZE"))


def mpi_ranks(env):
    """(rank, world_size, local_rank, rank 0's host or None) under mpiexec, else None.

    The launcher's variables are enough when they give all four numbers and either MASTER_ADDR is set or
    every rank is on this host; only otherwise is MPI initialised (mpi4py) to ask it.
    """
    if not any(var in env for var in MPI_LAUNCHER_VARS):
        return None
    for names in MPI_RANK_VARS:
        if all(env.get(name, "").isdigit() for name in names):
            rank, world, local, local_world = (int(env[name]) for name in names)
            if "MASTER_ADDR" in env or local_world == world:
                return rank, world, local, None
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError, OSError):  # mpi4py absent, or no MPI library to load
        return None
    if not MPI.Is_initialized():
        MPI.Init()
    comm = MPI.COMM_WORLD
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    return comm.Get_rank(), comm.Get_size(), local_rank, comm.bcast(socket.gethostname())


def discover_ranks(env=None):
    """Where this process sits (a DistContext still on the CPU): from the launcher's variables."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        ctx = DistContext(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:  # only srun steps set the step count
        ctx = DistContext(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]),
                          int(env.get("SLURM_LOCALID", 0)), "slurm")
    elif (mpi := mpi_ranks(env)) is not None:
        rank, world, local, rank0_host = mpi
        ctx = DistContext(rank, world, local, "mpi", master_addr=rank0_host or "127.0.0.1")
    else:
        ctx = DistContext()
    if "MASTER_ADDR" in env:
        ctx.master_addr = env["MASTER_ADDR"]
    elif ctx.source == "slurm":
        # The step's own nodes: in a sweep a small step may not run on the allocation's first node.
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if nodelist:
            ctx.master_addr = expand_nodelist(nodelist)[0]
    ctx.master_port = master_port(env)
    return ctx


def master_port(env):
    """MASTER_PORT, else one derived from the Slurm job id (two jobs on a node do not collide), else 29500."""
    if env.get("MASTER_PORT"):
        return env["MASTER_PORT"]
    job_id = env.get("SLURM_JOB_ID", "")
    if job_id.isdigit():
        return str(10000 + int(job_id) % 20000)
    return "29500"


def pick_device(requested, local_rank):
    """The torch device for this rank: a GPU (CUDA or ROCm) when asked for or visible, else the CPU.

    GPU = local rank modulo the visible GPUs: each task sees one (srun --gpus-per-task=1 --gpu-bind=closest),
    or all of the node's. Whether two ranks then share one is checked later (check_one_gpu_per_rank).
    """
    has_gpu = torch.cuda.is_available()
    if requested == "cuda" and not has_gpu:
        raise UsageError("--device cuda: no GPU is visible to this process; use --device cpu (or auto)")
    if requested == "cpu" or not has_gpu:
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed_mode(args):
    """The DistContext of this process: rank and world size, device and backend, the process group joined
    when a launcher started us, and where every rank runs (rank_facts)."""
    ctx = discover_ranks()
    ctx.device = pick_device(args.device, ctx.local_rank)
    ctx.backend = args.backend if args.backend != "auto" else ("nccl" if ctx.device.type == "cuda" else "gloo")
    if ctx.backend == "nccl" and ctx.device.type != "cuda":
        raise UsageError("--backend nccl needs a GPU; use --backend gloo (or auto) on CPUs")
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)  # before init_process_group, so NCCL binds the right GPU
    if ctx.distributed:
        join_process_group(ctx, args.dist_timeout)
    ctx.rank_facts = gather_objects(ctx, rank_facts(ctx))
    if ctx.backend == "nccl":
        check_one_gpu_per_rank(ctx.rank_facts)
    return ctx


def join_process_group(ctx, seconds):
    """init_process_group, failing in one line within `seconds` when the rendezvous cannot happen.

    NCCL gets gloo beside it for CPU tensors: object collectives (errors, rank facts) then need no GPU,
    and two ranks on one GPU can be told apart before NCCL aborts on them.
    """
    address = f"MASTER_ADDR={ctx.master_addr} MASTER_PORT={ctx.master_port}"
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = ctx.master_addr, ctx.master_port
    try:  # torch would retry an unknown host until the timeout, printing C++ log lines
        socket.getaddrinfo(ctx.master_addr, int(ctx.master_port))
    except (socket.gaierror, ValueError) as err:
        raise UsageError(f"{address} cannot be used ({err}); set them to rank 0's host name and a free port") from None
    if not ctx.is_main:
        wait_for_master(ctx, seconds)
    backend = "cpu:gloo,cuda:nccl" if ctx.backend == "nccl" else ctx.backend
    try:
        dist.init_process_group(backend, init_method="env://", rank=ctx.rank, world_size=ctx.world_size,
                                timeout=datetime.timedelta(seconds=seconds))
    except (RuntimeError, dist.DistError) as err:
        raise UsageError(f"rank {ctx.rank}: cannot join the process group at {ctx.master_addr}:{ctx.master_port} "
                         f"within {seconds}s ({str(err).splitlines()[0][:160]}); check MASTER_ADDR/MASTER_PORT "
                         f"and that all {ctx.world_size} ranks started") from None


def wait_for_master(ctx, seconds):
    """Wait until rank 0 listens at MASTER_ADDR:MASTER_PORT; fail within `seconds`, in one line.

    torch's own client would retry past the timeout and print C++ stack traces for a wrong address.
    """
    addr, port, deadline = ctx.master_addr, int(ctx.master_port), time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((addr, port), timeout=max(0.1, deadline - time.monotonic())).close()
            return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise UsageError(f"rank {ctx.rank}: nothing answers at {addr}:{port} within {seconds}s "
                                 f"({err}); check MASTER_ADDR/MASTER_PORT and that rank 0 started") from None
            time.sleep(0.5)


def rank_facts(ctx):
    """Where this rank runs: host, Slurm node, the CPUs it may use, and its GPU."""
    facts = dict(rank=ctx.rank, local_rank=ctx.local_rank, host=socket.gethostname(),
                 slurm_node=os.environ.get("SLURMD_NODENAME"), cpus=cpu_ranges(os.sched_getaffinity(0)))
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        facts["gpu"] = dict(index=ctx.device.index, name=props.name, id=physical_gpu_id(props, ctx.device.index),
                            visible=torch.cuda.device_count())
    return facts


def physical_gpu_id(props, index):
    """What tells this GPU from the others on its host: its UUID, else its entry in the visible-devices list."""
    uuid = str(getattr(props, "uuid", "") or "")
    if uuid.removeprefix("GPU-").replace("-", "").strip("0"):  # some builds report none, or all zeros
        return uuid
    for var in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        visible = os.environ.get(var, "").split(",")
        if index < len(visible) and visible[index]:
            return f"{var}={visible[index]}"
    return f"index {index}"


def cpu_ranges(cpus):
    """'0-6,14' for {0, 1, ..., 6, 14}: an affinity mask as taskset and Slurm print it."""
    runs = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{lo}-{hi}" if hi > lo else str(lo) for lo, hi in runs)


def check_one_gpu_per_rank(facts):
    """NCCL needs one GPU per rank; refuse (on every rank alike) ranks of one host that share a GPU."""
    seen = {}
    for fact in facts:
        seen.setdefault((fact["host"], fact["gpu"]["id"]), []).append(fact)
    for (host, _), sharing in seen.items():
        if len(sharing) > 1:
            on_host = sum(fact["host"] == host for fact in facts)
            raise UsageError(f"{on_host} ranks on {host} but {sharing[0]['gpu']['visible']} GPU(s) visible to "
                             f"each: ranks {', '.join(str(f['rank']) for f in sharing)} would share GPU "
                             f"{sharing[0]['gpu']['index']}, and NCCL needs one GPU per rank; start fewer tasks "
                             f"per node, give each its own GPU (srun --gpus-per-task=1), or use --backend gloo")


# Collectives; with one rank there is nothing to exchange.


def gather_objects(ctx, obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (CPU collectives only)."""
    if ctx.world_size == 1:
        return [obj]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_error(ctx, message):
    """Share rank 0's error (or None) with every rank so all stop together instead of hanging."""
    if ctx.world_size > 1:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message:
        raise UsageError(message)


def reduce_sums(ctx, totals):
    """Sum a tensor of per-rank totals over all ranks with one all_reduce; returns a list."""
    if ctx.world_size > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return totals.tolist()


# ----------------------------------------------------------------------------
# Data


def data_transforms():
    """The tutorial's preprocessing up to the crop, identical for train and val (no augmentation), as uint8.

    Its ToTensor and Normalize follow on the rank's device (normalize_images), so that a kept crop takes a
    quarter of the memory of its float pixels.
    """
    return transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()])


@functools.lru_cache(maxsize=None)
def normalize_constants(device):
    """255, then the ImageNet channel means and deviations, as tensors on `device`."""
    channels = dict(dtype=torch.float32, device=device)
    return (torch.tensor(255.0, **channels), torch.tensor(IMAGENET_MEAN, **channels).view(-1, 1, 1),
            torch.tensor(IMAGENET_STD, **channels).view(-1, 1, 1))


def normalize_images(images):
    """ToTensor's scaling and Normalize of uint8 crops, bit for bit the tutorial's float pixels.

    The divisors are tensors on the images' device: a GPU multiplies by the reciprocal of a Python number,
    which can differ in the last bit from dividing by it.
    """
    scale, mean, std = normalize_constants(images.device)
    return images.float().div_(scale).sub_(mean).div_(std)


def prepare_images(images, device):
    """A batch of uint8 crops as the backbone's input on `device`: normalised, and channels_last on CPUs
    (as the backbone there; the uint8 batch is the cheapest to reorder)."""
    images = images.to(device, non_blocking=True)
    if device.type == "cpu":
        images = images.contiguous(memory_format=torch.channels_last)
    return normalize_images(images)


def list_images(folder):
    """{class name: sorted image paths} of an ImageFolder split; stray non-image files are ignored.

    Found as ImageFolder finds them (os.walk, hidden files too: a macOS '._x.jpg' is named, not skipped).
    """
    classes = sorted(d.name for d in os.scandir(folder) if d.is_dir())
    return {c: sorted(os.path.join(root, name)
                      for root, _, names in os.walk(os.path.join(folder, c), followlinks=True)
                      for name in names if name.lower().endswith(IMG_EXTENSIONS)) for c in classes}


def check_layout(data_dir, expected_counts=None):
    """Check train/ and val/ hold the same >= 2 classes, each with images; optionally exact counts."""
    layout = {}
    for split in ("train", "val"):
        folder = os.path.join(data_dir, split)
        if not os.path.isdir(folder):
            raise UsageError(f"data directory {data_dir} has no {split}/ folder; it needs train/ and val/, "
                             f"each with one sub-folder of images per class")
        layout[split] = list_images(folder)
        for name, paths in layout[split].items():
            if not paths:
                raise UsageError(f"class folder {os.path.join(folder, name)} has no images; "
                                 f"add images or remove the folder")
    if list(layout["train"]) != list(layout["val"]):
        raise UsageError(f"train/ and val/ have different classes ({', '.join(layout['train'])} vs "
                         f"{', '.join(layout['val'])}); give both the same class folders")
    if len(layout["train"]) < 2:
        raise UsageError(f"{data_dir}: found {len(layout['train'])} class folder(s) in train/; "
                         f"classification needs at least 2")
    if expected_counts is not None:  # counts files: train/ants also holds a GIF that ImageFolder skips
        counts = {s: {c: len(os.listdir(os.path.join(data_dir, s, c))) for c in layout[s]} for s in layout}
        if counts != expected_counts:
            raise UsageError(f"{data_dir} has {counts} images, expected {expected_counts}; "
                             f"delete it and run again with --download")
    return layout


def check_images_decode(layout):
    """Decode every image once as training will, so that a broken file is named now instead of crashing mid-epoch.

    (PIL's verify() passes a truncated JPEG: only a full decode finds it.)
    """
    for paths in (p for split in layout.values() for p in split.values()):
        for path in paths:
            try:
                load_rgb(path)
            except Exception:  # PIL raises many types for broken files
                raise UsageError(f"{path} is not a readable image; delete or replace it") from None


def download_dataset(data_dir, url=DATA_URL):
    """Fetch the ants/bees zip, extract it safely, check it, and only then move it into place."""
    parent = os.path.dirname(os.path.abspath(data_dir))
    os.makedirs(parent, exist_ok=True)
    print(f"Downloading {url} to {data_dir}", flush=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".download-") as tmp:
        archive = os.path.join(tmp, "data.zip")
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response, open(archive, "wb") as file:
                shutil.copyfileobj(response, file)
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot download {url} ({err}); without network, copy hymenoptera_data "
                             f"somewhere and pass --data-dir DIR (or set QML_DATA_DIR)") from None
        extracted = extract_zip(archive, os.path.join(tmp, "extracted"))
        try:
            check_layout(extracted, HYMENOPTERA_COUNTS)
        except UsageError as err:
            raise UsageError(f"{url} is not the ants/bees data set ({err}); check --data-url") from None
        os.replace(extracted, data_dir)  # atomic: data_dir never holds a partial data set


def extract_zip(archive, target):
    """Extract `archive` into `target`, refusing entries that would land outside it; return the data root."""
    root = os.path.realpath(target)
    try:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if not os.path.realpath(os.path.join(root, name)).startswith(root + os.sep):
                    raise UsageError(f"the downloaded archive has an entry outside its folder ({name}); refusing it")
            zf.extractall(root)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:  # not a zip, truncated, or damaged inside
        raise UsageError(f"the downloaded file is not a complete zip archive ({err}); check --data-url") from None
    inner = [d for d in glob.glob(os.path.join(root, "*", "train")) if "__MACOSX" not in d]
    return os.path.dirname(inner[0]) if inner and not os.path.isdir(os.path.join(root, "train")) else root


def prepare_data(args, ctx):
    """Rank 0 checks (and if allowed downloads) the data; every rank gets its verdict."""
    message = None
    if ctx.is_main:
        try:
            if not os.path.isdir(args.data_dir):
                if not (args.download or args.data_dir_is_default):
                    raise UsageError(f"data directory {args.data_dir} not found; pass --data-dir DIR, "
                                     f"set QML_DATA_DIR, or add --download to fetch it")
                download_dataset(args.data_dir, args.data_url)
            check_images_decode(check_layout(args.data_dir))
        except UsageError as err:
            message = str(err)
    broadcast_error(ctx, message)


def output_paths(args):
    """(option, path) of every file rank 0 will write."""
    named = [("--save", args.save), *(("--metrics-json", path) for path in args.metrics_json),
             ("--checkpoint", args.checkpoint)]
    return [(option, path) for option, path in named if path]


def unwritable(option, path):
    """Why rank 0 could not write `path` (its folder cannot be made or takes no file), else None."""
    if os.path.isdir(path):
        return f"{option} {path} is a folder; give a file path"
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{os.path.basename(path)}.") as probe:
            probe.write(b"\0")  # a full disk may still take an empty file
            probe.flush()
    except OSError as err:
        in_the_way = isinstance(err, (FileExistsError, NotADirectoryError))
        reason = "a file is in the way" if in_the_way else err.strerror or err
        return f"{option} {path}: cannot write in {folder} ({reason}); choose a writable folder"
    return None


def check_outputs(ctx, named_paths):
    """Rank 0 tries each (option, path)'s folder before training, so a bad path fails now, not after the
    last epoch; every rank gets its verdict."""
    message = None
    if ctx.is_main:
        message = next(filter(None, (unwritable(option, path) for option, path in named_paths)), None)
    broadcast_error(ctx, message)


def load_rgb(path):
    """Open an image of any mode (grayscale, RGBA, palette, CMYK, 16-bit) as 8-bit RGB."""
    with Image.open(path) as image:
        if image.mode.startswith("I"):  # 16-bit grey: scale to 8 bits first
            image = image.convert("I").point(lambda v: v / 256).convert("L")
        return image.convert("RGB")


def read_training_image(path):
    """load_rgb for training: an image deleted or damaged since the start-up check is named in one line."""
    try:
        return load_rgb(path)
    except Exception as err:  # PIL raises many types for broken files
        raise ImageUnreadable(f"{path} can no longer be read ({getattr(err, 'strerror', None) or err})") from None


def load_datasets(data_dir):
    return {split: datasets.ImageFolder(os.path.join(data_dir, split), data_transforms(), loader=read_training_image)
            for split in ("train", "val")}


def default_workers(device):
    """Decoding workers per rank. On a GPU: one fewer than the CPUs this process may use, at most 3.
    On CPUs none: torch's and Kokkos' OpenMP threads already use every core, and a worker
    beside them stalls their barriers (an epoch measured 9 s without one, 12 s to 160 s with one).
    """
    if device.type == "cpu":
        return 0
    usable_cpus = len(os.sched_getaffinity(0))  # the task's CPUs under srun, not the node's
    return min(usable_cpus, 4) - 1


def resolve_workers(args, device):
    return args.workers if args.workers is not None else default_workers(device)


def make_loaders(datasets_, args, ctx, cached=False):
    """{"train", "validation"} loaders. Train: a DistributedSampler (shuffled, padded so ranks step together;
    loaders["train"].sampler). Validation: each image exactly once.

    Images come through ImageLoader, which decodes each once while --image-cache has room for it. Cached
    features need no decoding and validate in one batch (the batch size changes no metric there).
    """
    rank, world = ctx.rank, ctx.world_size
    train_sampler = DistributedSampler(datasets_["train"], num_replicas=world, rank=rank, seed=args.shuffle_seed)
    splits = {"train": (datasets_["train"], train_sampler, args.batch_size),
              "validation": (datasets_["val"], range(rank, len(datasets_["val"]), world),
                             len(datasets_["val"]) if cached else args.batch_size)}
    if cached:
        return {phase: DataLoader(data, sampler=sampler, batch_size=batch, pin_memory=ctx.device.type == "cuda")
                for phase, (data, sampler, batch) in splits.items()}
    kept = KeptImages(image_cache_budget(args.image_cache, ctx))
    workers = resolve_workers(args, ctx.device)
    return {phase: ImageLoader(data, sampler, batch, ctx.device, workers, kept, phase)
            for phase, (data, sampler, batch) in splits.items()}


class KeptImages:
    """Decoded crops (uint8, on the rank's device) kept after their first use while they fit in `budget` bytes,
    keyed by (phase, index in its data set)."""

    def __init__(self, budget):
        self.free, self.images = budget, {}

    def keep(self, key, image):
        if image.nbytes <= self.free:
            # A decoding worker's image stays in shared memory, holding a file descriptor: keep a private copy.
            self.images[key] = image.clone() if image.device.type == "cpu" and image.is_shared() else image
            self.free -= image.nbytes


class ImageLoader:
    """The batches DataLoader(dataset, sampler, batch_size) would give, as normalised images on `device`.

    Each pass decodes (with `workers` processes) only the images that `kept` lacks, and offers them to it, so
    that a later pass over kept images reads no file. With several ranks a rank keeps what it has decoded:
    its shuffled share of each epoch, until `kept` is full.
    """

    def __init__(self, dataset, sampler, batch_size, device, workers, kept, phase):
        self.dataset, self.sampler, self.batch_size, self.device = dataset, sampler, batch_size, device
        self.kept, self.phase = kept, phase
        self.to_decode = []  # this pass's indices of images not kept, in the order the batches need them
        self.decoder = DataLoader(dataset, sampler=self.to_decode, batch_size=None, num_workers=workers,
                                  persistent_workers=workers > 0, pin_memory=device.type == "cuda")
        self.decoded = 0  # images the last pass decoded

    def __len__(self):
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        keys = [(self.phase, index) for index in self.sampler]
        # Decided before the pass: an index that comes twice is decoded twice, or taken twice from `kept`.
        from_files = [key not in self.kept.images for key in keys]
        self.to_decode[:] = [index for (_, index), decode in zip(keys, from_files, strict=True) if decode]
        self.decoded = len(self.to_decode)
        decoded = iter(self.decoder) if self.to_decode else None
        for start in range(0, len(keys), self.batch_size):
            batch = range(start, min(start + self.batch_size, len(keys)))
            images = [self.take_decoded(keys[i], decoded) if from_files[i] else self.kept.images[keys[i]]
                      for i in batch]
            labels = torch.tensor([self.dataset.targets[keys[i][1]] for i in batch])
            yield prepare_images(torch.stack(images), self.device), labels

    def take_decoded(self, key, decoded):
        """The decoder's next image (the one of `key`) on the device, offered to `kept`."""
        image = next(decoded)[0].to(self.device, non_blocking=True)
        self.kept.keep(key, image)
        return image


def image_cache_budget(setting, ctx):
    """Bytes of decoded images this rank may keep (--image-cache): off 0, a number of MiB, or auto:
    IMAGE_CACHE_SHARE of what its GPU has free, or of the host's available memory shared by its ranks."""
    if setting == "off":
        return 0
    if setting != "auto":
        return int(setting * 2**20)
    if ctx.device.type == "cuda":
        return int(torch.cuda.mem_get_info(ctx.device)[0] * IMAGE_CACHE_SHARE)
    host = ctx.rank_facts[ctx.rank]["host"]
    ranks_here = sum(fact["host"] == host for fact in ctx.rank_facts)
    return int(available_host_memory() * IMAGE_CACHE_SHARE / ranks_here)


def available_host_memory():
    """Bytes this host can still give: MemAvailable, or less under a cgroup v2 memory limit (a Slurm job's);
    0 where /proc/meminfo cannot be read (not Linux)."""
    try:
        with open("/proc/meminfo") as file:
            available = next(int(line.split()[1]) * 1024 for line in file if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 0
    try:
        with open("/proc/self/cgroup") as file:
            group = next(line.split(":", 2)[2].strip() for line in file if line.startswith("0::"))
        folder = os.path.join("/sys/fs/cgroup", group.lstrip("/"))
        with open(os.path.join(folder, "memory.max")) as limit, open(os.path.join(folder, "memory.current")) as used:
            return min(available, int(limit.read()) - int(used.read()))
    except (OSError, StopIteration, ValueError):  # no cgroup v2, or no limit ("max")
        return available


# ----------------------------------------------------------------------------
# Checkpoints: written atomically by global rank 0


def atomic_write(path, write):
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it over `path`.

    Whatever fails, `path` keeps its previous content and no temporary file stays; an OSError (a full
    disk, a read-only or vanished folder) becomes RunFailed, one line that names it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")  # open() keeps the umask
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):  # nothing to remove when open() failed
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise RunFailed(f"cannot write {path} ({err.strerror or err}); its previous version, if any, "
                            f"is unchanged; make room or choose another path") from err
        raise


def torch_bytes(obj):
    """torch.save into memory: written to a file, a failed write then keeps its OSError (torch.save
    writing to the file itself turns a full disk into 'RuntimeError: unexpected pos')."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def run_config(args, classes):
    """The options that define a run, as stored in checkpoints and the metrics JSON."""
    config = {k: v for k, v in vars(args).items() if not k.startswith("data_dir_is")}
    return dict(config, n_classes=len(classes), classes=list(classes))


def save_checkpoint(path, model, optimizer, scheduler, state, config):
    numpy_rng = np.random.get_state()
    payload = dict(
        config=config, state=state, head=model.fc.state_dict(),
        buffers=dict(model.named_buffers()),  # BatchNorm statistics move in --bn-mode train
        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
        rng=dict(torch=torch.get_rng_state(), numpy=[numpy_rng[0], numpy_rng[1].tolist(), *numpy_rng[2:]]),
    )
    atomic_write(path, lambda file: file.write(torch_bytes(payload)))


def load_checkpoint(path, config):
    """Read a checkpoint for --resume and check it was made by the same configuration."""
    if not os.path.isfile(path):
        raise UsageError(f"--resume {path}: no such file; give a file written by --checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        saved = checkpoint["config"]
    except Exception as err:  # torch raises many types for unreadable files
        raise UsageError(f"--resume {path}: not a readable qml.py checkpoint ({type(err).__name__}); "
                         f"give a file written by --checkpoint") from None
    for key in RESUME_KEYS:
        if saved.get(key) != config.get(key):
            raise UsageError(f"--resume {path}: the checkpoint has {key}={saved.get(key)!r} but this run "
                             f"{key}={config.get(key)!r}; use the checkpoint's options or drop --resume")
    return checkpoint


def finished(args, ctx, checkpoint):
    """Whether the --resume checkpoint already holds --epochs epochs; rank 0 then says so."""
    done = checkpoint["state"]["epoch"]
    if done >= args.epochs and ctx.is_main:
        print(f"--resume {args.resume}: this run is finished ({done} epochs trained, --epochs {args.epochs}); "
              f"nothing to train (give a larger --epochs to train on)", flush=True)
    return done >= args.epochs


def check_world_size(args, checkpoint, world_size):
    """Refuse to continue on another number of ranks (another global batch and shuffle) unless asked to."""
    saved = checkpoint["state"]["history"][-1].get("world_size")
    if saved != world_size and not args.resume_any_world_size:
        raise UsageError(f"--resume {args.resume}: the checkpoint's run had {saved} rank(s), this one has "
                         f"{world_size}, so the global batch and the shuffle would differ; start {saved} ranks, or "
                         f"add --resume-any-world-size to go on anyway (the metrics JSON records each epoch's ranks)")


def restore_checkpoint(checkpoint, model, optimizer, scheduler):
    model.fc.load_state_dict(checkpoint["head"])
    buffers = dict(model.named_buffers())
    for name, value in checkpoint["buffers"].items():
        buffers[name].copy_(value)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    kind, keys, pos, has_gauss, cached = checkpoint["rng"]["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return checkpoint["state"]


# ----------------------------------------------------------------------------
# Training


def fresh_state():
    """What a run accumulates over epochs (saved in checkpoints)."""
    return dict(epoch=0, seconds=0.0, history=[], best_head=None, best_acc=0.0, best_loss=10000.0,
                best_acc_train=0.0, best_loss_train=10000.0)


def progress_every(args):
    """Print the per-batch progress line every N batches: each batch on a terminal, else every 10."""
    if args.print_freq is not None:
        return args.print_freq
    return 1 if sys.stdout.isatty() else 10


class TimeSplit:
    """Seconds an epoch spends in each part of the work, for --time-split: data (waiting for the loader:
    decoding, transforms, the copy to the device), backbone (the frozen ResNet18's forward), head (the dressed
    head's forward and backward, mostly the circuit), allreduce (DDP's gradient all-reduce) and optimizer.
    Each boundary synchronises the GPU, which costs time: runs without --time-split skip it all."""

    PARTS = ("data", "backbone", "head", "allreduce", "optimizer")

    def __init__(self, device, enabled):
        self.enabled = enabled
        self.synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.restart()

    def restart(self):
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self.mark = time.perf_counter()

    def lap(self, part):
        """Charge the time since the last lap to `part`."""
        if self.enabled:
            self.synchronize()
            now = time.perf_counter()
            self.seconds[part] += now - self.mark
            self.mark = now


def timed_allreduce(timer, bucket):
    """DDP's default all-reduce hook, waited for so that its time is told apart from the backward pass."""
    timer.lap("head")
    future = allreduce_hook(None, bucket)
    future.wait()
    timer.lap("allreduce")
    return future


def run_phase(phase, run, ctx, args, epoch):
    """One pass over the phase's loader; returns (average loss, accuracy, images) summed over all ranks."""
    training = phase == "train"
    # The dressed head has no mode-dependent layers: this only picks BatchNorm's statistics.
    run.net.train(training and args.bn_mode == "train")
    criterion = nn.CrossEntropyLoss()
    device, every, timer, loader = ctx.device, progress_every(args), run.timer, run.loaders[phase]
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for it, (inputs, labels) in enumerate(loader, 1):
        since_batch = time.time()
        inputs = inputs.to(device, non_blocking=True)  # images are there already; cached features are not
        labels = labels.to(device, non_blocking=True)
        timer.lap("data")
        with torch.set_grad_enabled(training):
            with backbone_autocast(args.precision, device):
                outputs = (run.step_net if training else run.net)(inputs)  # validation needs no DDP collectives
            loss = criterion(outputs, labels)
        timer.lap("head")  # the backbone's part was charged as the head began (a hook on model.fc)
        if training:
            run.optimizer.zero_grad()
            loss.backward()
            timer.lap("head")
            run.optimizer.step()
            timer.lap("optimizer")
        totals[0] += loss.detach().double() * len(labels)
        totals[1] += (outputs.argmax(1) == labels).sum()
        totals[2] += len(labels)
        if ctx.is_main and every and (it % every == 0 or it == len(loader)):
            if device.type == "cuda":
                torch.cuda.synchronize()  # the batch time includes the GPU's work, not only its launch
            print(f"Phase: {phase} Epoch: {epoch + 1}/{args.epochs} Iter: {it}/{len(loader)} "
                  f"Batch time: {time.time() - since_batch:.4f}", end="\r" if every == 1 and sys.stdout.isatty()
                  else "\n", flush=True)
    loss_sum, correct, count = reduce_sums(ctx, totals)
    return loss_sum / count, correct / count, int(count)


def decoding_counts(ctx, loaders):
    """Images decoded in this epoch and images kept decoded after it, summed over the ranks."""
    kept = loaders["train"].kept  # the phases share it
    counts = torch.tensor([sum(loader.decoded for loader in loaders.values()), len(kept.images)],
                          dtype=torch.float64, device=ctx.device)
    decoded, kept = reduce_sums(ctx, counts)
    return dict(images_decoded=int(decoded), images_kept=int(kept))


def sync_buffers(ctx, model):
    """Give every rank rank 0's BatchNorm running statistics before validation.

    DDP (broadcast_buffers) copies rank 0's buffers to the others only at the start of each training
    forward, so after the train phase each rank's statistics hold its own last batch; validation runs the
    bare model, without DDP, and must use the same statistics on every rank, as one model would.
    """
    if ctx.world_size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def cached_features(model, datasets_, args, ctx):
    """Run the frozen backbone once (BatchNorm in eval mode) and return TensorDatasets of features.

    Each rank embeds its share of the images; an all_gather gives every rank the whole set, so
    the training sampler draws exactly the batches it would draw from the images.
    """
    head, model.fc = model.fc, nn.Identity()
    model.eval()
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    features = {}
    for split, data in datasets_.items():
        shard = range(rank, len(data), world)
        loader = DataLoader(data, batch_size=32, sampler=shard, num_workers=resolve_workers(args, device))
        with torch.no_grad(), backbone_autocast(args.precision, device):
            chunks = [model(prepare_images(images, device)).float() for images, _ in loader]
        local = torch.cat(chunks) if chunks else torch.empty(0, head.pre_net.in_features, device=device)
        feats = gather_shards(local, len(data), world, rank)
        labels = torch.tensor(data.targets)
        features[split] = TensorDataset(feats.cpu(), labels)
    model.fc = head
    return features


def gather_shards(local, total, world, rank):
    """Reassemble rows that rank r holds for indices r, r+world, ... into dataset order."""
    if world == 1:
        return local
    rows = -(-total // world)  # ceil: pad every shard to the same length for all_gather
    padded = torch.zeros(rows, local.shape[1], dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    out = torch.empty(total, local.shape[1], dtype=local.dtype, device=local.device)
    for r in range(world):
        out[r::world] = gathered[r][: len(range(r, total, world))]
    return out


def fetch_weights_once(args, ctx):
    """With several ranks, rank 0 downloads the ImageNet weights into the torch hub cache before the others
    read them (one process simply loads them in build_model)."""
    message = None
    if args.weights == "imagenet" and ctx.world_size > 1 and ctx.is_main:
        try:
            load_backbone("imagenet")
        except UsageError as err:
            message = str(err)
    broadcast_error(ctx, message)


def record_best(state, phase, loss, acc, model):
    """The tutorial's bests: validation accuracy (whose head is kept) and loss, train accuracy and loss."""
    if phase == "validation" and acc > state["best_acc"]:
        state["best_acc"] = acc
        state["best_head"] = {k: v.detach().clone() for k, v in model.fc.state_dict().items()}
    if phase == "validation" and loss < state["best_loss"]:
        state["best_loss"] = loss
    if phase == "train" and acc > state["best_acc_train"]:
        state["best_acc_train"] = acc
    if phase == "train" and loss < state["best_loss_train"]:
        state["best_loss_train"] = loss


@dataclasses.dataclass
class Training:
    """What the epoch loop works with, built by prepare_training."""

    model: nn.Module  # the frozen backbone with the dressed head as its fc
    net: nn.Module  # what a batch goes through: the model, or only its head on cached features
    step_net: nn.Module  # net, wrapped in DDP when distributed: the training forward
    loaders: dict  # "train" and "validation" DataLoaders
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: dict  # the epochs so far and the tutorial's bests (fresh_state)
    config: dict  # the options that define the run (run_config)
    timer: TimeSplit
    started: float  # time.time() when training began, the feature cache included


def prepare_training(args, ctx):
    """Data, model, optimizer, resume state, feature cache and DDP for train_model; None when --resume finds
    the run finished. Every check that can fail runs before the model is built."""
    check_outputs(ctx, output_paths(args))
    check_precision(args.precision, ctx.device)
    prepare_data(args, ctx)
    datasets_ = load_datasets(args.data_dir)
    classes = datasets_["train"].classes
    if ctx.world_size > len(datasets_["train"]):
        raise UsageError(f"{ctx.world_size} ranks but only {len(datasets_['train'])} training images; "
                         f"start at most {len(datasets_['train'])} tasks")
    fetch_weights_once(args, ctx)
    config = run_config(args, classes)
    checkpoint = load_checkpoint(args.resume, config) if args.resume else None
    if checkpoint and finished(args, ctx, checkpoint):
        return None
    if checkpoint:
        check_world_size(args, checkpoint, ctx.world_size)

    torch.manual_seed(args.seed)  # the backbone's init, then the head's: the tutorial's order
    np.random.seed(args.seed)
    model = build_model(args, len(classes), ctx.device.index).to(ctx.device)
    if ctx.device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)  # about 25% faster convolutions on CPUs
    cast_frozen_convolutions(model, args.precision)
    optimizer = torch.optim.Adam(model.fc.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.step_size, gamma=args.gamma)
    state = restore_checkpoint(checkpoint, model, optimizer, scheduler) if checkpoint else fresh_state()
    ctx.provenance = run_provenance(ctx, describe_qdevice(model.fc, args.qdevice))
    if ctx.is_main:
        print(provenance_line(ctx), flush=True)

    started = time.time()
    net = model
    if args.cache_features:
        net, datasets_ = model.fc, cached_features(model, datasets_, args, ctx)
    timer = TimeSplit(ctx.device, args.time_split)
    model.fc.register_forward_pre_hook(lambda head, head_inputs: timer.lap("backbone"))
    # No local name here holds DDP or the loaders: Lightning's cached import tracebacks keep this frame alive
    # (build_model imported it), and train_model frees them before Python exits.
    return Training(model, net, wrap_ddp(net, ctx, args, timer),
                    make_loaders(datasets_, args, ctx, cached=args.cache_features),
                    optimizer, scheduler, state, config, timer, started)


def wrap_ddp(net, ctx, args, timer):
    """net in DistributedDataParallel when a launcher started us (its all-reduce timed for --time-split)."""
    if not ctx.distributed:
        return net
    ddp_net = DDP(net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if args.time_split:
        ddp_net.register_comm_hook(timer, timed_allreduce)
    return ddp_net


def train_model(args, ctx):
    """Train the dressed head: the tutorial's epoch loop of a train and a validation phase.

    Returns (the model holding the head of the best validation accuracy, the state with every epoch's
    metrics and the bests, the run's config), or None when --resume finds the run finished.
    """
    run = prepare_training(args, ctx)
    if run is None:
        return None
    state = run.state
    if ctx.is_main:
        print("Training started:", flush=True)
    for epoch in range(state["epoch"], args.epochs):
        run.loaders["train"].sampler.set_epoch(epoch)  # a new shuffle each epoch (the tutorial reused the first)
        epoch_start, record = time.time(), {"epoch": epoch + 1, "world_size": ctx.world_size}
        run.timer.restart()
        for phase in ("train", "validation"):
            if phase == "validation" and args.bn_mode == "train" and not args.cache_features:
                sync_buffers(ctx, run.model)
            loss, acc, count = run_phase(phase, run, ctx, args, epoch)
            if ctx.is_main:
                print("Phase: {} Epoch: {}/{} Ave. Loss: {:.4f} Ave. Acc: {:.4f}       ".format(
                    "train" if phase == "train" else "validation  ", epoch + 1, args.epochs, loss, acc), flush=True)
            key = "train" if phase == "train" else "val"
            record.update({f"{key}_loss": loss, f"{key}_acc": acc, f"{key}_count": count})
            record_best(state, phase, loss, acc, run.model)
            if phase == "train":
                run.scheduler.step()
        if not args.cache_features:
            record.update(decoding_counts(ctx, run.loaders))
        record["seconds"] = time.time() - epoch_start
        if args.time_split:
            record["time_split"] = run.timer.seconds
        state["history"].append(record)
        state["epoch"] = epoch + 1
        if args.checkpoint and ctx.is_main:
            elapsed = dict(state, seconds=state["seconds"] + time.time() - run.started)
            save_checkpoint(args.checkpoint, run.model, run.optimizer, run.scheduler, elapsed, run.config)
    state["seconds"] += time.time() - run.started
    model, config = run.model, run.config
    # Lightning caches import tracebacks that keep this frame alive: let DDP and loader workers go now.
    del run
    if state["best_head"] is not None:
        model.fc.load_state_dict(state["best_head"])
    return model, state, config


# ----------------------------------------------------------------------------
# Command line


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad options as one line (no usage block) through UsageError."""

    def error(self, message):
        raise UsageError(f"{message} (see: python qml.py --help)")


def number(kind, low, high=math.inf, above_low=False):
    """argparse type: a finite `kind` in low..high (above low if above_low), else one line at once."""
    if high < math.inf:
        wanted = f"{low}..{high}"
    else:
        wanted = "positive" if above_low and low == 0 else f"{low} or more"
    if kind is float:
        wanted += " and finite"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        finite = kind is not float or math.isfinite(value)  # inf passes the comparisons below
        if not (finite and (value > low if above_low else value >= low) and value <= high):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def positive(kind):
    return number(kind, 0, above_low=True)


SEEDS = dict(low=0, high=2**32 - 1)  # what np.random.seed accepts
DIST_TIMEOUT_MAX = 2**31 // 1000  # 24.8 days, whose milliseconds fit 32 bits; far more overflows torch's timers


def cache_size(text):
    """--image-cache: auto, off, or a budget in MiB (0 keeps nothing)."""
    if text in ("auto", "off"):
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be auto, off or a number of MiB, got {text!r}")
    return value


def qubit_count(text):
    value = positive(int)(text)
    if value > 20:
        raise argparse.ArgumentTypeError(f"must be 1..20 (a state of {text} qubits is too large to simulate here)")
    return value


def get_args_parser():
    parser = ArgumentParser(description="Hybrid quantum-classical transfer learning (OLCF Python_QML_Basics).",
                            epilog="Subcommand: 'python qml.py report RUNDIR', a sweep's scaling table. "
                                   "Speed: 'python bench.py'.")
    add = parser.add_argument
    add("--data-dir", default=None, help="ImageFolder root with train/ and val/ (default: $QML_DATA_DIR, "
        "else data/hymenoptera_data beside qml.py, downloaded when missing)")
    add("--download", action="store_true", help="download the ants/bees data set when --data-dir is missing")
    add("--data-url", default=DATA_URL, help="where --download fetches the zip (default: %(default)s)")
    add("--epochs", type=positive(int), default=30, help="training epochs (default: %(default)s)")
    add("--batch-size", type=positive(int), default=None, help=f"images per batch per rank (default: "
        f"{DEFAULT_BATCH_SIZE})")
    add("--global-batch-size", type=positive(int), default=None, help="images per optimizer step over all ranks, "
        "whatever their number: each rank takes G / ranks (instead of --batch-size)")
    add("--lr", type=positive(float), default=0.0004, help="Adam learning rate (default: %(default)s)")
    add("--lr-scaling", choices=("none", "linear"), default="none", help="linear: multiply --lr by the global "
        f"batch / {REFERENCE_GLOBAL_BATCH} (the tutorial's images per step at one task) (default: %(default)s)")
    add("--gamma", type=positive(float), default=0.1, help="StepLR decay factor (default: %(default)s)")
    add("--step-size", type=positive(int), default=10, help="StepLR period in epochs (default: %(default)s)")
    add("--n-qubits", type=qubit_count, default=n_qubits, help="qubits, 1..20 (default: %(default)s)")
    add("--q-depth", type=positive(int), default=q_depth, help="variational layers (default: %(default)s)")
    add("--q-delta", type=positive(float), default=q_delta, help="spread of initial circuit weights "
        "(default: %(default)s)")
    add("--seed", type=number(int, **SEEDS), default=42, help="seed of the model's random init, 0..2**32-1 "
        "(default: %(default)s)")
    add("--shuffle-seed", type=number(int, **SEEDS), default=0, help="seed of the training shuffle, 0..2**32-1; "
        "0 is the tutorial's DistributedSampler default (default: %(default)s)")
    add("--qdevice", default=DEFAULT_QDEVICE, help="PennyLane device simulating the circuit, or 'torch' for "
        "the built-in exact torch simulator (default: %(default)s)")
    add("--per-sample", action="store_true", help="one circuit call per image, as the tutorial "
        "(default: one call per batch)")
    add("--weights", default="imagenet", help="backbone weights: imagenet | none | PATH of a ResNet18 "
        "state_dict (default: %(default)s)")
    add("--bn-mode", choices=("train", "eval"), default="train", help="the frozen backbone's BatchNorm in the "
        "train phase: batch statistics (train, the tutorial's) or ImageNet statistics (eval) (default: %(default)s)")
    add("--cache-features", action="store_true", help="run the backbone once and train on cached features "
        "(needs --bn-mode eval)")
    add("--image-cache", type=cache_size, default="auto", help="keep decoded images (uint8, on the rank's device) "
        "so that later epochs read no file: auto (a quarter of the available GPU or host memory, shared by the "
        "host's ranks), off, or a budget in MiB per rank (default: %(default)s)")
    add("--precision", choices=tuple(PRECISIONS), default="fp32", help="the frozen backbone's forward under "
        "autocast to bf16, or fp16 (GPUs only); the dressed head and the circuit stay fp32/float64 "
        "(default: %(default)s, the tutorial's)")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: a GPU when visible "
        "(default: %(default)s)")
    add("--backend", choices=("auto", "nccl", "gloo"), default="auto", help="auto: nccl on GPUs, gloo on CPUs "
        "(default: %(default)s)")
    add("--dist-timeout", type=number(int, 1, DIST_TIMEOUT_MAX), default=300, help="seconds before a stuck "
        "rendezvous or collective fails (default: %(default)s)")
    add("--workers", type=number(int, 0), default=None, help="image-decoding processes per rank (default on "
        "GPUs: SLURM_CPUS_PER_TASK or CPU count, minus 1, at most 3; on CPUs: 0)")
    add("--print-freq", type=number(int, 0), default=None, help="progress line every N batches; 0: never "
        "(default: each batch on a terminal, every 10 in a log)")
    add("--save", default=None, help="write the best dressed-head weights (state_dict) to this file")
    add("--checkpoint", default=None, help="write a resumable checkpoint to this file after every epoch")
    add("--resume", default=None, help="continue from a --checkpoint file")
    add("--resume-any-world-size", action="store_true", help="with --resume: continue on another number of "
        "ranks than the checkpoint's (another global batch and shuffle; each epoch's ranks are recorded)")
    add("--metrics-json", action="append", default=[], help="write config, per-epoch metrics, timings and "
        "provenance to this JSON file (repeat the option for several files)")
    add("--time-split", action="store_true", help="record in --metrics-json the seconds of every epoch spent in "
        "data loading, the backbone, the dressed head, the all-reduce and the optimizer (synchronises GPUs)")
    add("--draw", action="store_true", help="print the circuit and exit")
    return parser


def validate_args(args):
    """Resolve defaults that depend on the environment and refuse impossible combinations."""
    args.data_dir_is_default = args.data_dir is None and "QML_DATA_DIR" not in os.environ
    args.data_dir = args.data_dir or os.environ.get("QML_DATA_DIR") or DEFAULT_DATA_DIR
    if args.cache_features and args.bn_mode == "train":
        raise UsageError("--cache-features needs --bn-mode eval: with batch statistics the backbone's "
                         "features change every batch and cannot be cached")
    if args.global_batch_size is not None and args.batch_size is not None:
        raise UsageError("--global-batch-size and --batch-size both set the batch size: give one of them "
                         "(--global-batch-size G gives each of N ranks G/N images)")
    if args.global_batch_size is None and args.batch_size is None:
        args.batch_size = DEFAULT_BATCH_SIZE
    if args.qdevice not in available_qdevices():
        raise UsageError(f"--qdevice {args.qdevice}: not installed; choose one of {', '.join(available_qdevices())}")


def resolve_batch_and_lr(args, world_size):
    """Set args.batch_size (per rank) and args.lr for this world size, which is known only after rank discovery.

    Kept in args, so that the checkpoint's config and --resume compare the values actually used.
    """
    if args.global_batch_size is not None:
        if args.global_batch_size % world_size:
            multiple = -(-args.global_batch_size // world_size) * world_size
            raise UsageError(f"--global-batch-size {args.global_batch_size} cannot be split evenly over "
                             f"{world_size} ranks; give a multiple of {world_size} (e.g. {multiple}) "
                             f"or a task count that divides {args.global_batch_size}")
        args.batch_size = args.global_batch_size // world_size
    if args.lr_scaling == "linear":
        args.lr *= args.batch_size * world_size / REFERENCE_GLOBAL_BATCH


def package_versions():
    names = ("torch", "torchvision", "pennylane", "pennylane_lightning", "pennylane_lightning_kokkos", "mpi4py")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_provenance(ctx, qdevice):
    """What this run really used, beyond its options: hosts, Slurm ids, GPU software, OpenMP settings, simulator."""
    collectives = None
    if ctx.backend == "nccl":
        version = torch.cuda.nccl.version()
        collectives = ("RCCL " if torch.version.hip else "NCCL ") + ".".join(map(str, np.atleast_1d(version)))
    master = f"{ctx.master_addr}:{ctx.master_port}" if ctx.distributed else None
    return dict(hosts=sorted({fact["host"] for fact in ctx.rank_facts}), master=master,
                slurm_job_id=os.environ.get("SLURM_JOB_ID"), slurm_step_id=os.environ.get("SLURM_STEP_ID"),
                torch=torch.__version__, cuda=torch.version.cuda, hip=torch.version.hip, collectives=collectives,
                qdevice=qdevice,
                omp={var: os.environ.get(var) for var in ("OMP_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES")})


def provenance_line(ctx):
    """Rank 0's first line: ranks and hosts, device, backend and where the circuit runs."""
    run, me = ctx.provenance, ctx.rank_facts[0]
    device = f"{ctx.device}, CPUs {me['cpus']}"
    if "gpu" in me:
        runtime = f"HIP {run['hip']}" if run["hip"] else f"CUDA {run['cuda']}"
        device = f"{ctx.device} ({me['gpu']['name']}, {runtime})"
    backend = f"{ctx.backend} ({run['collectives']})" if run["collectives"] else ctx.backend
    slurm = f" | Slurm job {run['slurm_job_id']}.{run['slurm_step_id']}" if run["slurm_job_id"] else ""
    return (f"Ranks: {ctx.world_size} ({ctx.source}) on {','.join(run['hosts'])} | device: {device} | "
            f"backend: {backend} | qdevice: {run['qdevice']['name']} ({run['qdevice']['summary']}){slurm}")


def head_digest(head):
    """SHA-256 of the dressed head's weights: equal on every rank when DDP kept them in step."""
    digest = hashlib.sha256()
    for name, tensor in sorted(head.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def write_metrics(path, state, config, ctx):
    best = {k: state[k] for k in ("best_acc", "best_loss", "best_acc_train", "best_loss_train")}
    report = dict(config=config, world_size=ctx.world_size, rank_source=ctx.source,
                  device=str(ctx.device), backend=ctx.backend, versions=package_versions(),
                  batch_size=config["batch_size"], global_batch_size=config["batch_size"] * ctx.world_size,
                  lr=config["lr"], provenance=ctx.provenance, ranks=ctx.rank_facts,
                  epochs=state["history"], training_seconds=state["seconds"],
                  best_val_acc=best["best_acc"], best_val_loss=best["best_loss"],
                  best_train_acc=best["best_acc_train"], best_train_loss=best["best_loss_train"])
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(path, lambda file: file.write(text.encode()))


def draw_circuit(args):
    drawable = "default.qubit" if args.qdevice == TORCH_QDEVICE else args.qdevice  # the drawer needs a QNode
    qnode = make_quantum_net(args.n_qubits, args.q_depth, drawable, qnode=True)
    inputs = torch.full((args.n_qubits,), 0.1)
    weights = args.q_delta * torch.ones(args.q_depth * args.n_qubits)
    return qml.draw(qnode)(inputs, weights)


def setup(args):
    """Join the process group, train, report from rank 0, and always leave the group."""
    ctx = None
    try:
        ctx = init_distributed_mode(args)
        resolve_batch_and_lr(args, ctx.world_size)
        trained = train_model(args, ctx)
        if trained is None:  # --resume of a finished run
            return 0
        model, state, config = trained
        for fact, digest in zip(ctx.rank_facts, gather_objects(ctx, head_digest(model.fc)), strict=True):
            fact["head_sha256"] = digest
        if ctx.is_main:
            minutes, seconds = divmod(state["seconds"], 60)
            print(f"\nTraining completed in {minutes:.0f}m {seconds:.0f}s")
            print(f"Best average loss: {state['best_loss']:.4f} | Best average accuracy: {state['best_acc']:.4f}",
                  flush=True)
            if args.save:
                atomic_write(args.save, lambda file: file.write(torch_bytes(model.fc.state_dict())))
            for path in args.metrics_json:
                write_metrics(path, state, config, ctx)
        if ctx.world_size > 1:
            dist.barrier()
        return 0
    except BaseException as err:
        drop_frames(err)  # they hold DDP (see train_model): let leave_process_group free it before the group
        line = failure_line(err, args, ctx)
        if line is None:
            raise
        raise RunFailed(line) from None
    finally:
        leave_process_group()


def drop_frames(err):
    """Clear the variables of the finished frames in the tracebacks of err and of the errors behind it."""
    while err is not None:
        traceback.clear_frames(err.__traceback__)
        err = err.__cause__ or err.__context__


PEER_GONE = re.compile(r"Connection (closed|reset) by peer|Broken pipe")  # gloo, when a peer process is gone


def failure_line(err, args, ctx):
    """The one line for an error that ends a run without being a bug here (an image or a rank gone), else None."""
    resume = (f"continue from the last --checkpoint, if one was written, with --resume {args.checkpoint}"
              if args.checkpoint else "run again (with --checkpoint PATH a run can be resumed)")
    if isinstance(err, ImageUnreadable):
        return f"{err}, though it was readable at start-up; replace it, then {resume}"
    several_ranks = ctx is not None and ctx.world_size > 1
    gone = PEER_GONE.search(str(err)) if several_ranks and isinstance(err, RuntimeError) else None
    if gone:
        peer = f"rank {1 - ctx.rank}" if ctx.world_size == 2 else "a peer rank"  # gloo names no rank
        return f"rank {ctx.rank}: {peer} is gone ({gone[0]}); its own output says why; fix that, then {resume}"
    return None


def leave_process_group():
    """Free what is left of DDP, then the process group, while Python is still fully alive.

    DDP holds the group: freed only at interpreter exit, it takes gloo's worker threads down
    with it, and one of them that then needs the GIL aborts the process (SIGABRT).
    """
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["report"]:
            return report_main(argv[1:])
        args = get_args_parser().parse_args(argv)
        validate_args(args)
        if args.draw:
            print(draw_circuit(args))
            return 0
        signal.signal(signal.SIGTERM, raise_interrupt)  # Slurm's time limit sends SIGTERM first
        return setup(args)
    except (UsageError, RunFailed) as err:
        print("qml.py: error:", " ".join(str(err).split()), file=sys.stderr)  # one line, whatever err holds
        return 2 if isinstance(err, UsageError) else 1
    except KeyboardInterrupt as err:
        print(f"qml.py: stopped by {err or 'Ctrl-C'}; the last --checkpoint file (if any) is complete: "
              f"continue with --resume", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------
# report: the scaling table of a submit_qml.sbatch sweep

SIGNIFICANCE = 0.05  # Welch's t-test: a p-value below this tells a count's mean best accuracy from the top one's


def load_runs(rundir):
    """One dict per metrics JSON in rundir (tasks, global batch, training seconds, best val accuracy and loss,
    final-epoch val accuracy), sorted by task count."""
    runs = []
    for path in sorted(glob.glob(os.path.join(rundir, "*.json"))):
        try:
            with open(path) as file:
                metrics = json.load(file)
            tasks = metrics["world_size"]
            runs.append(dict(tasks=tasks, global_batch=metrics["config"]["batch_size"] * tasks,
                             seconds=metrics["training_seconds"], best_val_acc=metrics["best_val_acc"],
                             best_val_loss=metrics["best_val_loss"], final_val_acc=metrics["epochs"][-1]["val_acc"]))
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            raise UsageError(f"{path} is not a metrics JSON written by qml.py --metrics-json; move it away") from None
    if not runs:
        raise UsageError(f"no metrics JSON files in {rundir}; run the sweep with submit_qml.sbatch 1,2,4,8")
    return sorted(runs, key=lambda run: run["tasks"])


def mean_and_std(runs, key, digits):
    """{key: mean, key_std: sample standard deviation} of runs[...][key]; the std is None for a single run."""
    values = [run[key] for run in runs]
    std = round(statistics.stdev(values), digits) if len(values) > 1 else None
    return {key: round(statistics.mean(values), digits), f"{key}_std": std}


def scaling_rows(runs):
    """One row per task count: its runs' means and spreads, and the speedup and parallel efficiency of its
    mean training time relative to the smallest task count's."""
    groups = {}
    for run in runs:
        groups.setdefault(run["tasks"], []).append(run)
    base_tasks = min(groups)
    base_seconds = statistics.mean(run["seconds"] for run in groups[base_tasks])
    rows = []
    for tasks, group in sorted(groups.items()):
        batches = sorted({run["global_batch"] for run in group})
        if len(batches) > 1:
            raise UsageError(f"the {tasks}-task runs have different global batches {batches}: they are different "
                             f"experiments; report each from its own folder")
        speedup = base_seconds / statistics.mean(run["seconds"] for run in group)
        rows.append(dict(tasks=tasks, runs=len(group), global_batch=batches[0], **mean_and_std(group, "seconds", 2),
                         speedup=round(speedup, 2), efficiency=round(speedup * base_tasks / tasks, 2),
                         **mean_and_std(group, "best_val_acc", 4), **mean_and_std(group, "final_val_acc", 4),
                         **mean_and_std(group, "best_val_loss", 4)))
    return rows


def t_two_sided_p(t, df, steps=2000):
    """P(|T| >= |t|) for Student's t with df >= 1 degrees of freedom (no scipy needed).

    With x = sqrt(df) tan(theta) the density becomes c cos(theta)^(df - 1), bounded on [0, pi/2): a midpoint
    sum of its tail is accurate to about 1e-4 for the df of a few dozen repeats.
    """
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(math.pi)
    start = math.atan(abs(t) / math.sqrt(df))
    width = (math.pi / 2 - start) / steps
    return 2 * c * width * sum(math.cos(start + (i + 0.5) * width) ** (df - 1) for i in range(steps))


def welch_p_value(a, b, key):
    """Two-sided p-value of Welch's t-test that rows a and b (each of two runs or more) share the mean of key."""
    var_a, var_b = a[f"{key}_std"] ** 2 / a["runs"], b[f"{key}_std"] ** 2 / b["runs"]
    if var_a + var_b == 0:  # no spread at all: the means are equal or surely different
        return 1.0 if a[key] == b[key] else 0.0
    df = (var_a + var_b) ** 2 / (var_a ** 2 / (a["runs"] - 1) + var_b ** 2 / (b["runs"] - 1))
    return t_two_sided_p((a[key] - b[key]) / math.sqrt(var_a + var_b), df)


def task_list(rows):
    return ", ".join(str(row["tasks"]) for row in rows)


def answer_line(rows):
    """The challenge's question: the fastest count at the greatest best accuracy. With repeats, "greatest" means
    not distinguishable from the top mean best accuracy by Welch's t-test at SIGNIFICANCE."""
    if all(row["runs"] == 1 for row in rows):  # the tutorial's single runs: today's reading, unchanged
        top = max(row["best_val_acc"] for row in rows)
        best = min((row for row in rows if row["best_val_acc"] == top), key=lambda row: row["seconds"])
        return (f"Answer: {best['tasks']} task(s) train fastest ({best['seconds']:.1f} s) at the greatest "
                f"best average accuracy ({top:.4f})")
    single = [row for row in rows if row["runs"] == 1]
    if single:
        return (f"Answer: none: {task_list(single)} task(s) have a single run, whose spread is unknown, beside "
                f"repeated counts; run every count at least twice (--repeats 2)")
    top = max(rows, key=lambda row: row["best_val_acc"])
    tied = [row for row in rows if welch_p_value(row, top, "best_val_acc") >= SIGNIFICANCE]
    worse = [row for row in rows if row not in tied]
    fastest = min(tied, key=lambda row: row["seconds"])
    verdict = (f"{task_list(worse)} task(s) are less accurate" if worse
               else "all accuracy differences between the task counts are within the noise")
    return (f"Answer: {fastest['tasks']} task(s) train fastest ({fastest['seconds']:.1f} s, mean of "
            f"{fastest['runs']} runs) among the counts whose mean best accuracy is within the noise of the top one "
            f"({top['tasks']} task(s): {top['best_val_acc']:.4f} ± {top['best_val_acc_std']:.4f} std) by Welch's "
            f"t-test at {SIGNIFICANCE:.0%}: {task_list(tied)} task(s); {verdict}")


def plot_scaling(rows, path):
    import matplotlib

    matplotlib.use("Agg")  # no display on compute nodes
    import matplotlib.pyplot as plt

    tasks = [row["tasks"] for row in rows]

    def errorbar(axes, key, style, color):
        axes.errorbar(tasks, [row[key] for row in rows], yerr=[row[f"{key}_std"] or 0 for row in rows],
                      fmt=style, color=color, capsize=4)

    fig, ax_time = plt.subplots(figsize=(6, 4))
    errorbar(ax_time, "seconds", "o-", "tab:blue")
    ax_time.set_xlabel("tasks")
    ax_time.set_ylabel("mean training time (s)", color="tab:blue")
    ax_acc = ax_time.twinx()
    errorbar(ax_acc, "best_val_acc", "s--", "tab:red")
    ax_acc.set_ylabel("mean best validation accuracy", color="tab:red")
    ax_time.set_xticks(tasks)
    ax_time.set_title("Python_QML_Basics scaling (error bars: one std over the runs)")
    fig.tight_layout()
    atomic_write(path, lambda file: fig.savefig(file, format="png", dpi=100))
    plt.close(fig)


def cell_text(value):
    """A table or CSV cell: None (the spread of a single run) stays blank."""
    return "" if value is None else str(value)


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell_text(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def report_main(argv):
    parser = ArgumentParser(prog="qml.py report", description="Scaling table, CSV and plot of a sweep's "
                            "metrics JSON files (runs/<jobid>/tasks-N.json, or tasks-N-seed-S.json with repeats): "
                            "per task count the runs' means and sample standard deviations.")
    parser.add_argument("rundir", help="folder with the sweep's metrics JSON files")
    rundir = parser.parse_args(argv).rundir
    rows = scaling_rows(load_runs(rundir))
    header = list(rows[0])
    print(markdown_table(header, [row.values() for row in rows]))
    csv_path, png_path = os.path.join(rundir, "scaling.csv"), os.path.join(rundir, "scaling.png")

    def write_csv(file):
        text = [",".join(header)] + [",".join(cell_text(v) for v in row.values()) for row in rows]
        file.write(("\n".join(text) + "\n").encode())

    atomic_write(csv_path, write_csv)
    plot_scaling(rows, png_path)
    print(f"Scaling table: {csv_path}")
    print(f"Scaling plot: {png_path}")
    print(answer_line(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
