"""Hybrid quantum-classical transfer learning on HPC (OLCF "Python_QML_Basics").

A frozen ImageNet ResNet18 turns each image into 512 features; its `fc` layer is replaced by `DressedQuantumNet`:
Linear(512 -> n_qubits), a PennyLane variational circuit simulated on `lightning.kokkos`, and Linear(n_qubits ->
classes). Only the dressed head trains, with DistributedDataParallel across Slurm/torchrun/MPI ranks.

    python qml.py                        # the tutorial's experiment; --help: every option
    python qml.py report runs/<jobid>    # a sweep's table, answer and plots (machinery/report.py)
    python qml.py predict MODEL IMAGES   # classify images with a --save or --checkpoint file (machinery/predict.py)

Reading this file beside the tutorial; its sections come in this order:

    tutorial                                 here
    import mpi4py (in __main__)              first, before torch, when an MPI launcher started us
    n_qubits, q_depth, q_delta               the same globals, below the imports
    H_layer, RY_layer, entangling_layer      "The quantum circuit": the same functions
    dev = qml.device(...), @qml.qnode        make_quantum_net(qdevice=...) wraps quantum_net in a QNode
      quantum_net                            (--per-sample), or on Lightning runs a batch of it through the
                                             device API (simulators.AdjointCircuit)
    DressedQuantumNet, resnet18 + fc         "The model": DressedQuantumNet, build_model
    setup: init_process_group; __main__:     "Distributed setup": discover_ranks (torchrun, srun, mpiexec
      mpi4py ranks, MASTER_ADDR                or one process), init_distributed_mode (device, process group)
    data_transforms, ImageFolder, samplers   "Data": data_transforms, load_datasets, make_loaders
    train_model                              "Training": train_model (the epoch loop), run_phase (one pass),
                                             record_best, prepare_training (model, optimizer, data, DDP)
    step, num_epochs, batch_size,            "Command line": --lr, --epochs, --batch-size, --gamma,
      gamma_lr_scheduler, manual_seed(42)      --seed (get_args_parser); setup: join, train, report, leave

The machinery around it lives in machinery/, one module for each thing it holds, none importing this file
(README's "Layout"); `python bench.py` is the speed benchmark.
"""

import copy
import dataclasses
import functools
import importlib
import math
import os
import signal
import socket
import sys
import time

# `qml.py report RUNDIR` and `qml.py sweep ...` (what submit_qml.sbatch runs) need neither torch nor PennyLane:
# they start before those load.
SUBCOMMANDS = (["report"], ["sweep"])
if __name__ == "__main__" and sys.argv[1:2] in SUBCOMMANDS:
    sys.exit(importlib.import_module(f"machinery.{sys.argv[1]}").main(sys.argv[2:]))

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
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import datasets, transforms

try:  # the machinery beside this file (machinery/)
    from machinery import checkpoints, heldout, images, qpu, records
    from machinery.checkpoints import Interrupted, catch_wall_time_warning, stop_between_batches
    from machinery.command_line import (DIST_TIMEOUT_MAX, RESUMABLE, SEEDS, ArgumentParser, RunFailed, UsageError,
                                        cache_size, drop_frames, failure_line, number, positive, qubit_count,
                                        raise_interrupt, repeat_seeds, resolve_batch_and_lr)
    from machinery.images import (PRECISIONS, backbone_autocast, cast_frozen_convolutions, check_precision,
                                  fetch_weights_once, load_backbone)
    from machinery.process_group import (DistContext, check_one_gpu_per_rank, gather_objects,
                                         join_process_group, leave_process_group, master_port, mpi_ranks,
                                         pick_device, rank_facts, reduce_sums, step_master, sync_buffers)
    from machinery.records import close_epoch, progress_every, time_split, trainable_parameters
    from machinery.simulators import (ADJOINT_QDEVICES, KOKKOS_QDEVICE, TORCH_QDEVICE, AdjointCircuit, CircuitTrace,
                                      NoAdjoint, available_qdevices, check_memory, decomposed_templates,
                                      describe_qdevice, lazy_import, qdevice_options, start_kokkos)
except ModuleNotFoundError as err:  # qml.py copied alone: README's "Layout" lists what it needs
    print(f"qml.py: error: no module {err.name}; keep qml.py beside its machinery/ folder", file=sys.stderr)
    sys.exit(2)

# The tutorial's `import pennylane as qml`, loaded when a circuit is first built: importing PennyLane takes
# about 2 s, which `--help` and a refused option do not need.
qml = lazy_import("pennylane")

# The tutorial's hyperparameters of the quantum layer.
n_qubits = 4  # Number of qubits
q_depth = 6  # Depth of the quantum circuit (number of variational layers)
q_delta = 0.01  # Initial spread of random quantum weights

DEFAULT_QDEVICE = KOKKOS_QDEVICE  # the tutorial's
HEADS = ("quantum", "classical", "linear")  # --head: the tutorial's, its classical control, a linear baseline
DEFAULT_BATCH_SIZE = 4  # the tutorial's images per batch per rank
REFERENCE_GLOBAL_BATCH = DEFAULT_BATCH_SIZE  # --lr-scaling linear: --lr x global batch / the tutorial's, one task


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


def quantum_net(q_input_features, q_weights_flat, nqubits=n_qubits, depth=q_depth, entangle=True):
    """The variational circuit: H layer, RY embedding, depth x [entangle (unless --entangle off), RY], <Z> on each wire.

    The tutorial decorates it with @qml.qnode(dev) for one device; make_quantum_net wraps it for any.
    """
    q_weights = q_weights_flat.reshape(depth, nqubits)
    H_layer(nqubits)
    RY_layer(q_input_features)
    for k in range(depth):
        if entangle:
            entangling_layer(nqubits)
        RY_layer(q_weights[k])
    return [qml.expval(qml.PauliZ(position)) for position in range(nqubits)]


def make_quantum_net(nqubits, depth, n_weights, qdevice=DEFAULT_QDEVICE, device_id=None, qnode=False, entangle=True,
                     shots=None, noise=None, seed=None):
    """quantum_net on `qdevice` as a callable (q_input_features, q_weights_flat) -> list of expectation values:
    the tutorial's `dev = qml.device(...)` and `@qml.qnode(dev, interface="torch")`, for these sizes. Every path
    runs what quantum_net records when traced (its `trace`), so an edit of the circuit reaches them all. device_id:
    the rank's GPU for Kokkos. qnode: a QNode even on ADJOINT_QDEVICES (--per-sample), which otherwise run a batch
    through AdjointCircuit, or a QNode where it cannot (`qnode_reason`). shots, noise, seed: machinery/qpu.py."""
    ablation = {} if entangle else dict(entangle=False)  # so an edited quantum_net need not take `entangle`
    circuit = functools.partial(quantum_net, nqubits=nqubits, depth=depth, **ablation)
    if qdevice == TORCH_QDEVICE:
        return qpu.torch_circuit(circuit, nqubits, n_weights, shots, noise, seed)
    options = qdevice_options(qdevice, device_id, nqubits)
    if qdevice == KOKKOS_QDEVICE:
        start_kokkos(options)
    dev = qml.device(qdevice, wires=nqubits, seed=seed, **options)
    reason = None
    if qdevice in ADJOINT_QDEVICES and not qnode:
        try:
            qpu.refuse_adjoint(dev, shots, noise)  # shots and noise go to the QNode, never ignored
            return AdjointCircuit(circuit, nqubits, n_weights, dev)
        except NoAdjoint as err:
            reason = str(err)
    net = qpu.make_qnode(circuit, dev, shots, noise)
    net.trace, net.qnode_reason = CircuitTrace(circuit, nqubits, n_weights, expand=decomposed_templates), reason
    qpu.check_runs(net, qdevice, nqubits, n_weights, noise)
    return net


# ----------------------------------------------------------------------------
# The model (the tutorial's DressedQuantumNet in place of a frozen ResNet18's fc)


class DressedQuantumNet(nn.Module):
    """Linear(512 -> n_qubits), the circuit, Linear(its outputs -> n_classes): the *dressed* quantum net."""

    def __init__(self, n_qubits=n_qubits, q_depth=q_depth, q_delta=q_delta, n_classes=2,
                 qdevice=DEFAULT_QDEVICE, per_sample=False, in_features=512, device_id=None, entangle=True, shots=None,
                 noise=None, seed=None):
        super().__init__()
        # Parameter creation order (pre_net, q_params, post_net) is the tutorial's: same seed, same numbers.
        self.pre_net = nn.Linear(in_features, n_qubits)
        self.q_params = nn.Parameter(q_delta * torch.randn(q_depth * n_qubits))
        self.quantum_net = make_quantum_net(n_qubits, q_depth, self.q_params.numel(), qdevice, device_id,
                                            qnode=per_sample, entangle=entangle, shots=shots, noise=noise, seed=seed)
        self.post_net = nn.Linear(self.quantum_net.trace.outputs, n_classes)  # one input per measured value
        self.per_sample = per_sample
        # What the circuit is, whichever simulator runs it: checkpoints record its digest.
        self.circuit = CircuitTrace(self.quantum_net.func, n_qubits, self.q_params.numel(), decomposed_templates)

    def forward(self, input_features):
        with torch.autocast(input_features.device.type, enabled=False):  # fp32 after a --precision backbone
            q_in = torch.tanh(self.pre_net(input_features.float())) * math.pi / 2.0
            if self.per_sample:  # the tutorial's loop: one circuit call per image
                q_out = torch.stack([torch.hstack(self.quantum_net(elem, self.q_params)) for elem in q_in])
            else:  # one broadcast circuit call for the whole batch
                q_out = torch.stack(self.quantum_net(q_in, self.q_params), dim=-1)
            return self.post_net(q_out.float().to(input_features.device))


class DressedClassicalNet(nn.Module):
    """--head classical, the control: DressedQuantumNet with its circuit replaced by tanh(Linear(n_qubits -> n_qubits)),
    the same inputs and outputs, n_qubits * (n_qubits + 1) weights against the circuit's q_depth * n_qubits (20
    against 24 at the tutorial's sizes): what differs is only what the circuit adds."""

    def __init__(self, n_qubits=n_qubits, n_classes=2, in_features=512):
        super().__init__()
        self.pre_net = nn.Linear(in_features, n_qubits)
        self.classical_net = nn.Linear(n_qubits, n_qubits)
        self.post_net = nn.Linear(n_qubits, n_classes)

    def forward(self, input_features):
        with torch.autocast(input_features.device.type, enabled=False):  # fp32 after a --precision backbone
            c_in = torch.tanh(self.pre_net(input_features.float())) * math.pi / 2.0
            return self.post_net(torch.tanh(self.classical_net(c_in)))


def quantum_head(args, n_classes=2, in_features=512, device_id=None, rank=0, qdevice=None):
    """The DressedQuantumNet of these options; its draws (--shots) seeded by --seed and the rank."""
    return DressedQuantumNet(args.n_qubits, args.q_depth, args.q_delta, n_classes, qdevice or args.qdevice,
                             args.per_sample, in_features, device_id, args.entangle == "on", args.shots, args.noise,
                             qpu.draw_seed(args.seed, rank))


def build_model(args, n_classes, device_id=None, rank=0):
    """Frozen ResNet18 whose fc is the --head (the dressed quantum net, its classical control, or Mari et al.'s
    Linear(512 -> classes) baseline); random draws in the tutorial's order."""
    model = load_backbone(args.weights)
    for param in model.parameters():
        param.requires_grad = False
    in_features = model.fc.in_features
    if args.head == "quantum":
        model.fc = quantum_head(args, n_classes, in_features, device_id, rank)
    elif args.head == "classical":
        model.fc = DressedClassicalNet(args.n_qubits, n_classes, in_features)
    else:
        model.fc = nn.Linear(in_features, n_classes)
    return model


# ----------------------------------------------------------------------------
# Distributed setup (the tutorial's `setup` and `__main__`): torchrun, then Slurm, then mpiexec, then one process


def discover_ranks(env=None):
    """Where this process sits (a DistContext still on the CPU): from the launcher's variables."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        ctx = DistContext(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:  # only srun steps set the step count
        ctx = DistContext(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]),
                          int(env.get("SLURM_LOCALID", 0)), "slurm")
    elif any(var in env for var in MPI_LAUNCHER_VARS) and (mpi := mpi_ranks(env)) is not None:
        rank, world, local, rank0_host = mpi
        ctx = DistContext(rank, world, local, "mpi", master_addr=rank0_host or "127.0.0.1")
    else:
        ctx = DistContext()
    if ctx.source == "slurm":
        ctx.master_addr = step_master(env, warn=ctx.is_main) or ctx.master_addr
    elif "MASTER_ADDR" in env:
        ctx.master_addr = env["MASTER_ADDR"]
    ctx.master_port = master_port(env)
    return ctx


def init_distributed_mode(args):
    """The DistContext of this process: ranks, device, backend, the process group joined, where each rank runs."""
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


# ----------------------------------------------------------------------------
# Data


def data_transforms():
    """The tutorial's preprocessing up to the crop, identical for train and val (no augmentation), as uint8: its
    ToTensor and Normalize follow on the rank's device (images.normalize_images), so a kept crop takes a quarter of
    the memory of its float pixels."""
    return transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()])


def load_datasets(data_dir):
    splits = ("train", "val", "test") if os.path.isdir(os.path.join(data_dir, "test")) else ("train", "val")
    return {split: datasets.ImageFolder(os.path.join(data_dir, split), data_transforms(),
                                        loader=images.read_training_image)
            for split in splits}


def make_loaders(datasets_, args, ctx, cached=False):
    """{"train", "validation"} loaders, and "test" with a test part. Train: a DistributedSampler (shuffled, padded
    so ranks step together). Validation and test: each image exactly once. Images come through images.ImageLoader,
    which decodes each once while --image-cache has room; cached features validate in one batch."""
    rank, world = ctx.rank, ctx.world_size
    train_sampler = DistributedSampler(datasets_["train"], num_replicas=world, rank=rank, seed=args.shuffle_seed)
    splits = {"train": (datasets_["train"], train_sampler, args.batch_size)}
    for phase, data in (("validation", datasets_["val"]), ("test", datasets_.get("test"))):
        if data is not None:
            splits[phase] = (data, range(rank, len(data), world), len(data) if cached else args.batch_size)
    if cached:
        return {phase: DataLoader(data, sampler=sampler, batch_size=batch, pin_memory=ctx.device.type == "cuda")
                for phase, (data, sampler, batch) in splits.items()}
    kept = images.KeptImages(images.image_cache_budget(args.image_cache, ctx))
    workers = images.resolve_workers(args, ctx.device)
    return {phase: images.ImageLoader(data, sampler, batch, ctx.device, workers, kept, phase)
            for phase, (data, sampler, batch) in splits.items()}


# ----------------------------------------------------------------------------
# Training


def fresh_state():
    """What a run accumulates over epochs (saved in checkpoints); the tutorial's bests start here."""
    return dict(epoch=0, seconds=0.0, history=[], best_head=None, best_acc=0.0, best_loss=10000.0,
                best_acc_train=0.0, best_loss_train=10000.0)


def record_best(state, phase, loss, acc, model):
    """The tutorial's bests: validation accuracy (whose head is kept) and loss, train accuracy and loss."""
    if phase == "validation" and acc > state["best_acc"]:
        state["best_acc"] = acc
        state["best_head"] = {k: v.detach().clone() for k, v in model.fc.state_dict().items()}
        state["best_buffers"] = {k: v.detach().clone() for k, v in model.named_buffers()}  # --bn-mode train moves them
    if phase == "validation" and loss < state["best_loss"]:
        state["best_loss"] = loss
    if phase == "train" and acc > state["best_acc_train"]:
        state["best_acc_train"] = acc
    if phase == "train" and loss < state["best_loss_train"]:
        state["best_loss_train"] = loss


def run_phase(phase, run, ctx, args, epoch):
    """One pass over the phase's loader; returns (average loss, accuracy, images) summed over all ranks."""
    training = phase == "train"
    # The dressed head has no mode-dependent layers: this only picks BatchNorm's statistics.
    run.net.train(training and args.bn_mode == "train")
    criterion = nn.CrossEntropyLoss()
    device, every, loader = ctx.device, progress_every(args.print_freq), run.loaders[phase]
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for it, (inputs, labels) in enumerate(loader, 1):
        since_batch = time.time()
        inputs = inputs.to(device, non_blocking=True)  # images are there already; cached features are not
        labels = labels.to(device, non_blocking=True)
        run.timer.lap("data")  # the other parts of --time-split are timed by hooks (records.time_split)
        with torch.set_grad_enabled(training):
            with backbone_autocast(args.precision, device):
                outputs = (run.step_net if training else run.net)(inputs)  # validation needs no DDP collectives
            loss = criterion(outputs, labels)
        if training:
            run.optimizer.zero_grad()
            loss.backward()
            run.optimizer.step()
            stop_between_batches(ctx, epoch, args.checkpoint)  # on Slurm's wall-time warning, all ranks at once
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


@dataclasses.dataclass
class Training:
    """What the epoch loop works with, built by prepare_training."""

    model: nn.Module  # the frozen backbone with the dressed head as its fc
    net: nn.Module  # what a batch goes through: the model, or only its head on cached features
    step_net: nn.Module  # net, wrapped in DDP when distributed: the training forward
    loaders: dict  # "train" and "validation" loaders
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: dict  # the epochs so far and the tutorial's bests (fresh_state)
    config: dict  # the options that define the run (checkpoints.run_config)
    started: float  # time.time() when training began, the feature cache included
    timer: object = None  # records.TimeSplit, set by train_model


def check_circuit_memory(args, ctx):
    """Refuse, before any data are read, a circuit that the chosen simulator cannot hold in this rank's memory
    (its GPU's, or its share of the host's); returns the circuit's trace, or None for a head without one. The head
    is built only to trace the circuit (the seed is set after)."""
    if args.head != "quantum":
        return None
    head = quantum_head(args, device_id=ctx.device.index)
    on_gpu = ctx.device.type == "cuda" and (args.qdevice == TORCH_QDEVICE or
                                            describe_qdevice(head, args.qdevice)["runs_on"] == "gpu")
    check_memory(head.quantum_net, args.qdevice, args.batch_size, *images.rank_memory(ctx, on_gpu))
    return head.circuit


def prepare_training(args, ctx):
    """Data, model, optimizer, resume state, feature cache and DDP for train_model (every check that can fail first);
    None when --resume finds the run finished (its metrics JSON is then written from the checkpoint)."""
    checkpoints.check_outputs(ctx, args)
    check_precision(args.precision, ctx.device)
    circuit = check_circuit_memory(args, ctx)
    images.prepare_data(args, ctx)
    datasets_ = heldout.split_holdout(load_datasets(args.data_dir), args)
    classes = datasets_["train"].classes
    if ctx.world_size > len(datasets_["train"]):
        raise UsageError(f"{ctx.world_size} ranks but only {len(datasets_['train'])} training images; "
                         f"start at most {len(datasets_['train'])} tasks")
    fetch_weights_once(args, ctx)
    config = checkpoints.run_config(args, classes, circuit and circuit.digest())
    checkpoint = checkpoints.load_checkpoint(args.resume, config) if args.resume else None
    if checkpoint and checkpoints.finished(args, ctx, checkpoint):
        records.write_finished_metrics(args, ctx, checkpoint, config)
        return None
    if checkpoint:
        checkpoints.check_world_size(args, checkpoint, ctx.world_size)

    torch.manual_seed(args.seed)  # the backbone's init, then the head's: the tutorial's order
    np.random.seed(args.seed)
    model = build_model(args, len(classes), ctx.device.index, ctx.rank).to(ctx.device)
    if ctx.device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)  # about 25% faster convolutions on CPUs
    cast_frozen_convolutions(model, args.precision)
    optimizer = torch.optim.Adam(model.fc.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.step_size, gamma=args.gamma)
    state = checkpoints.restore_checkpoint(checkpoint, model, optimizer, scheduler) if checkpoint else fresh_state()
    head = dict(name=args.head, trainable_parameters=trainable_parameters(model.fc))
    qdevice = describe_qdevice(model.fc, args.qdevice) if args.head == "quantum" else None
    ctx.provenance = records.run_provenance(ctx, qdevice, head)
    if ctx.is_main:
        print(records.provenance_line(ctx), flush=True)

    started = time.time()
    net = model
    if args.cache_features:
        net, datasets_ = model.fc, images.cached_features(model, datasets_, args, ctx)
    # No local name here holds DDP or the loaders: Lightning's cached import tracebacks keep this frame alive
    # (build_model imported it), and train_model frees them before Python exits.
    return Training(model, net, DDP(net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
                    if ctx.distributed else net, make_loaders(datasets_, args, ctx, cached=args.cache_features),
                    optimizer, scheduler, state, config, started)


def train_model(args, ctx):
    """Train the dressed head: the tutorial's epoch loop of a train and a validation phase. Returns (the model holding
    the head of the best validation accuracy, the state with every epoch's metrics and the bests, the run's config),
    or None when --resume finds the run finished."""
    run = prepare_training(args, ctx)
    if run is None:
        return None
    state, run.timer = run.state, time_split(ctx.device, args.time_split, run)
    if ctx.is_main:
        print("Training started:", flush=True)
    for epoch in range(state["epoch"], args.epochs):
        run.loaders["train"].sampler.set_epoch(epoch)  # a new shuffle each epoch (the tutorial reused the first)
        run.timer.restart()
        record = {"epoch": epoch + 1, "world_size": ctx.world_size}
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
        record.update(qpu.executed(run.model.fc, record))  # the circuits and shots a QPU would have run
        state["history"].append(close_epoch(record, run.timer, ctx, run.loaders))
        state["epoch"] = epoch + 1
        if state["epoch"] == args.epochs and "test" in run.loaders:  # the kept head, scored once on unseen images
            state["test"] = heldout.score_kept_head(run.model, state,
                                                    functools.partial(run_phase, "test", run, ctx, args, epoch))
        if args.checkpoint and ctx.is_main:
            checkpoints.save_checkpoint(args.checkpoint, run)
    state["seconds"] += time.time() - run.started
    model, config = run.model, run.config
    del run  # Lightning caches import tracebacks that keep this frame alive: let DDP and loader workers go now
    if state["best_head"] is not None:
        model.fc.load_state_dict(state["best_head"])
    return model, state, config


# ----------------------------------------------------------------------------
# Command line (the tutorial's hyperparameters in train_model, its setup and __main__)


def get_args_parser():
    parser = ArgumentParser(prog="qml.py",
                            description="Hybrid quantum-classical transfer learning (OLCF Python_QML_Basics).",
                            epilog="Subcommands: 'python qml.py report RUNDIR', a sweep's scaling table; "
                                   "'python qml.py predict MODEL IMAGES', a trained model's classes. "
                                   "Speed: 'python bench.py'.")
    add = parser.add_argument
    add("--data-dir", default=None, help="ImageFolder root with train/ and val/ (default: $QML_DATA_DIR, "
        "else data/hymenoptera_data beside qml.py, downloaded when missing)")
    add("--download", action="store_true", help="download the ants/bees data set when the data folder "
        "(--data-dir or $QML_DATA_DIR) is missing (the default folder is downloaded without it)")
    add("--data-url", default=images.DATA_URL, help="where --download fetches the zip (default: %(default)s)")
    add("--epochs", type=positive(int), default=30, help="training epochs (default: %(default)s)")
    add("--batch-size", type=positive(int), default=None, help=f"images per batch per rank (default: "
        f"{DEFAULT_BATCH_SIZE})")
    add("--global-batch-size", type=positive(int), default=None, help="images per optimizer step over all ranks, "
        "whatever their number: each rank takes G / ranks (default: unset, each rank takes --batch-size)")
    add("--lr", type=positive(float), default=0.0004, help="Adam learning rate (default: %(default)s)")
    add("--lr-scaling", choices=("none", "linear"), default="none", help="linear: multiply --lr by the global "
        f"batch / {REFERENCE_GLOBAL_BATCH} (the tutorial's images per step at one task) (default: %(default)s)")
    add("--gamma", type=positive(float), default=0.1, help="StepLR decay factor (default: %(default)s)")
    add("--step-size", type=positive(int), default=10, help="StepLR period in epochs (default: %(default)s)")
    add("--n-qubits", type=qubit_count, default=n_qubits, help="qubits, 1..30, as far as the "
        "simulator's memory allows (checked before training) (default: %(default)s)")
    add("--q-depth", type=positive(int), default=q_depth, help="variational layers (default: %(default)s)")
    add("--q-delta", type=positive(float), default=q_delta, help="spread of initial circuit weights "
        "(default: %(default)s)")
    add("--seed", type=number(int, **SEEDS), default=42, help="seed of the model's random init, 0..2**32-1 "
        "(default: %(default)s)")
    add("--shuffle-seed", type=number(int, **SEEDS), default=0, help="seed of the training shuffle, 0..2**32-1; "
        "0 is the tutorial's DistributedSampler default (default: %(default)s)")
    add("--repeat", type=number(int, 0), default=0, help="the R-th repeat of an experiment: trains with --seed + R "
        "and --shuffle-seed + R; submit_qml.sbatch --repeats sets it (default: %(default)s)")
    add("--holdout", type=number(float, 0, 1, above_low=True), default=None, help="score the kept head on this share "
        "of each class of val/, held out from selection (default: none; else a test/ folder beside train/ and val/)")
    add("--holdout-seed", type=number(int, **SEEDS), default=0, help="seed of --holdout's split (default: %(default)s)")
    add("--entangle", choices=("on", "off"), default="on", help="off: no entangling layers (default: %(default)s)")
    add("--head", choices=HEADS, default="quantum", help="what replaces ResNet18's fc: quantum, the tutorial's "
        "DressedQuantumNet; classical, its circuit replaced by a classical layer of its inputs, outputs and about its "
        "weights (the control); linear, Mari et al.'s Linear(512 -> classes) baseline (default: %(default)s)")
    add("--qdevice", default=DEFAULT_QDEVICE, help="PennyLane device simulating the circuit, or 'torch' for "
        "the built-in exact torch simulator (default: %(default)s)")
    add("--shots", type=positive(int), default=None, metavar="N", help="estimate every expectation value from this "
        "many samples, gradients by the parameter-shift rule, as on a QPU (default: exact)")
    add("--noise", type=qpu.noise_spec, default=None, metavar="SPEC", help="noise after the gates and at readout: "
        f"{qpu.NOISE_HELP} (default: none)")
    add("--per-sample", action="store_true", help="one circuit call per image, as the tutorial (default: per batch)")
    add("--weights", default="imagenet", help="backbone weights: imagenet | none | PATH of a ResNet18 "
        "state_dict (default: %(default)s)")
    add("--bn-mode", choices=("train", "eval"), default="train", help="the frozen backbone's BatchNorm in the train "
        "phase: batch statistics (train, the tutorial's) or ImageNet's (eval) (default: %(default)s)")
    add("--cache-features", action="store_true", help="train on the backbone's features, computed once (needs "
        "--bn-mode eval)")
    add("--image-cache", type=cache_size, default="auto", help="keep decoded images (uint8, on the rank's device) "
        "so that later epochs read no file: auto (a quarter of the rank's GPU's free memory, on CPUs of the host's "
        "available memory split between its ranks), off, or a budget in MiB per rank (default: %(default)s)")
    add("--precision", choices=tuple(PRECISIONS), default="fp32", help="the frozen backbone's forward under autocast "
        "to bf16, or fp16 (GPUs only); the head and circuit stay fp32/float64 (default: %(default)s, the tutorial's)")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: a GPU when visible "
        "(default: %(default)s)")
    add("--backend", choices=("auto", "nccl", "gloo"), default="auto", help="auto: nccl on GPUs, gloo on CPUs "
        "(default: %(default)s)")
    add("--dist-timeout", type=number(int, 1, DIST_TIMEOUT_MAX), default=300, help="seconds before a stuck "
        "rendezvous or collective fails (default: %(default)s)")
    add("--workers", type=number(int, 0), default=None, help="image-decoding processes per rank (default on GPUs: "
        "one fewer than the CPUs of its CPU affinity mask (srun: the task's), at most 3; on CPUs 0: OpenMP uses all)")
    add("--print-freq", type=number(int, 0), default=None, help="progress line every N batches; 0: never "
        "(default: each batch when stdout is a terminal, else every 10)")
    add("--save", default=None, help="write the trained model (the kept head and all that 'qml.py predict' needs "
        "to rebuild it) to this file")
    add("--checkpoint", default=None, help="write a resumable checkpoint to this file after every epoch")
    add("--resume", default=None, help="continue from a --checkpoint file")
    add("--resume-any-world-size", action="store_true", help="with --resume: continue on another number of "
        "ranks than the checkpoint's (another global batch and shuffle; each epoch's ranks are recorded)")
    add("--metrics-json", action="append", default=[], help="write config, per-epoch metrics, timings and "
        "provenance to this JSON file (repeat the option for several files)")
    add("--time-split", action="store_true", help="record in --metrics-json the seconds of every epoch spent in "
        "data loading, the backbone, the dressed head, the all-reduce and the optimizer (synchronises GPUs)")
    add("--draw", action="store_true", help="print the circuit and exit")
    add("--check", action="store_true", help="check the options and exit: status 0, or one line and status 2 "
        "(submit_qml.sbatch checks its runs' options so, once, before its first step)")
    return parser


def validate_args(args):
    """Resolve the defaults that depend on the environment and refuse impossible combinations."""
    args.data_dir_is_default = args.data_dir is None and "QML_DATA_DIR" not in os.environ
    args.data_dir = args.data_dir or os.environ.get("QML_DATA_DIR") or images.DEFAULT_DATA_DIR
    repeat_seeds(args)  # the R-th repeat trains with its own seeds, recorded as such in the checkpoint and metrics
    if args.cache_features and args.bn_mode == "train":
        raise UsageError("--cache-features needs --bn-mode eval: with batch statistics the backbone's "
                         "features change every batch and cannot be cached")
    if args.global_batch_size is not None and args.batch_size is not None:
        raise UsageError("--global-batch-size and --batch-size both set the batch size: give one of them "
                         "(--global-batch-size G gives each of N ranks G/N images)")
    qpu.check_head(args)  # --shots and --noise need a circuit
    if args.qdevice not in available_qdevices():
        raise UsageError(f"--qdevice {args.qdevice}: not installed; choose one of {', '.join(available_qdevices())}")


def check_run(args):
    """--check: the options (already validated), the precision on this machine's device, then the circuit against
    its memory as one process (a step's ranks on one host share it: each checks its share before training)."""
    ctx = DistContext(device=pick_device(args.device, 0), rank_facts=[dict(host=socket.gethostname())])
    args = copy.copy(args)
    args.batch_size = args.batch_size or args.global_batch_size or DEFAULT_BATCH_SIZE
    check_precision(args.precision, ctx.device)
    check_circuit_memory(args, ctx)


def draw_circuit(args):
    """quantum_net as the dressed head records it, with the angles 0.1 and the weights --q-delta."""
    head = quantum_head(args, qdevice="default.qubit")
    return head.circuit.draw(torch.full((args.n_qubits,), 0.1), args.q_delta * torch.ones_like(head.q_params))


def setup(args):
    """Join the process group, train, report from rank 0, and always leave the group."""
    ctx = None
    try:
        ctx = init_distributed_mode(args)
        resolve_batch_and_lr(args, ctx.world_size, DEFAULT_BATCH_SIZE, REFERENCE_GLOBAL_BATCH)
        trained = train_model(args, ctx)
        if trained is None:  # --resume of a finished run
            return 0
        model, state, config = trained
        records.record_digests(ctx, model)
        if ctx.is_main:
            minutes, seconds = divmod(state["seconds"], 60)
            print(f"\nTraining completed in {minutes:.0f}m {seconds:.0f}s")
            print(f"Best average loss: {state['best_loss']:.4f} | Best average accuracy: {state['best_acc']:.4f}",
                  flush=True)
            if state.get("test"):
                print(heldout.test_line(state), flush=True)
            if args.save:
                checkpoints.save_model(args.save, model, state, config)
            for path in args.metrics_json:
                records.write_metrics(path, state, config, ctx)
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


def main(argv=None):
    argv, args = sys.argv[1:] if argv is None else list(argv), None
    try:
        if argv[:1] in SUBCOMMANDS:
            return importlib.import_module(f"machinery.{argv[0]}").main(argv[1:])
        if argv[:1] == ["predict"]:  # classify images with a trained model, rebuilt by this file's build_model
            predict = importlib.import_module("machinery.predict")
            return predict.main(argv[1:], build_model, data_transforms(), get_args_parser().parse_args([]))
        args = get_args_parser().parse_args(argv)
        validate_args(args)
        if args.check:
            check_run(args)
            return 0
        if args.draw:
            print(draw_circuit(args))
            return 0
        signal.signal(signal.SIGTERM, raise_interrupt)  # Slurm's time limit sends SIGTERM first
        catch_wall_time_warning()  # its warning (sbatch --signal=B:USR1@120) asks for a stop between batches
        return setup(args)
    except (UsageError, RunFailed) as err:
        print("qml.py: error:", " ".join(str(err).split()), file=sys.stderr)  # one line, whatever err holds
        return 2 if isinstance(err, UsageError) else 1
    except Interrupted as err:
        print(f"qml.py: {err}", file=sys.stderr)
        return RESUMABLE
    except KeyboardInterrupt as err:  # Ctrl-C (no message), or SIGTERM (raise_interrupt names it)
        checkpoint = args.checkpoint if args is not None else None  # None: stopped while the options were parsed
        print(f"qml.py: {checkpoints.stopped_line(err, argv, checkpoint)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
