"""What a run records beside its options. Each epoch: where its time goes (--time-split), what it records beside its
metrics, and how often the progress line is printed. The run: what it used (package versions, hosts, Slurm ids,
GPU software, the process group's backends, OpenMP settings, where the circuit ran), each rank's digests of its
dressed head and of its BatchNorm statistics, and the metrics JSON (--metrics-json)."""

import hashlib
import json
import os
import sys
import time
from importlib import metadata

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from . import checkpoints, heldout
from .images import ImageLoader, decoding_counts
from .process_group import gather_objects

# ----------------------------------------------------------------------------
# Each epoch


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
        """A new epoch: every part at zero."""
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self.epoch_start = self.mark = time.perf_counter()

    def lap(self, part):
        """Charge the time since the last lap to `part`."""
        if self.enabled:
            self.synchronize()
            now = time.perf_counter()
            self.seconds[part] += now - self.mark
            self.mark = now


def time_split(device, enabled, run):
    """A TimeSplit whose laps, but for "data", are hooks: the backbone's part ends as the dressed head's forward
    begins and the head's as it ends; the backward pass ends at DDP's all-reduce (timed_allreduce) or at the
    optimizer's step, whose end closes the optimizer's part. Without --time-split no hook is set.

    run: qml.py's Training (its model, DDP-wrapped step_net and optimizer)."""
    timer = TimeSplit(device, enabled)
    if enabled:
        model, step_net, optimizer = run.model, run.step_net, run.optimizer
        model.fc.register_forward_pre_hook(lambda head, inputs: timer.lap("backbone"))
        model.fc.register_forward_hook(lambda head, inputs, outputs: timer.lap("head"))
        optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: timer.lap("head"))
        optimizer.register_step_post_hook(lambda optimizer, args, kwargs: timer.lap("optimizer"))
        if isinstance(step_net, DistributedDataParallel):
            step_net.register_comm_hook(timer, timed_allreduce)
    return timer


def timed_allreduce(timer, bucket):
    """DDP's default all-reduce hook, waited for so that its time is told apart from the backward pass."""
    timer.lap("head")
    future = allreduce_hook(None, bucket)
    future.wait()
    timer.lap("allreduce")
    return future


def close_epoch(record, timer, ctx, loaders):
    """An epoch's record, completed with what is not the experiment: the images decoded and kept (from image
    files; cached features decode none), the epoch's seconds and, with --time-split, its parts."""
    if isinstance(loaders["train"], ImageLoader):
        record.update(decoding_counts(ctx, loaders))
    record["seconds"] = time.perf_counter() - timer.epoch_start
    if timer.enabled:
        record["time_split"] = timer.seconds
    return record


def progress_every(print_freq):
    """Print the per-batch progress line every N batches (--print-freq): each batch on a terminal, else every 10."""
    if print_freq is not None:
        return print_freq
    return 1 if sys.stdout.isatty() else 10


# ----------------------------------------------------------------------------
# The run


PACKAGES = ("torch", "torchvision", "pennylane", "pennylane_lightning", "pennylane_lightning_kokkos", "mpi4py")


def trainable_parameters(head):
    return sum(param.numel() for param in head.parameters() if param.requires_grad)


def package_versions():
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_provenance(ctx, qdevice, head):
    """What this run really used, beyond its options: hosts, Slurm ids, GPU software, OpenMP settings, the head
    (its name and trainable parameters) and where its circuit ran (qdevice; None for a head without one)."""
    collectives = None
    if ctx.backend == "nccl":
        version = torch.cuda.nccl.version()
        collectives = ("RCCL " if torch.version.hip else "NCCL ") + ".".join(map(str, np.atleast_1d(version)))
    master = f"{ctx.master_addr}:{ctx.master_port}" if ctx.distributed else None
    return dict(hosts=sorted({fact["host"] for fact in ctx.rank_facts}), master=master,
                slurm_job_id=os.environ.get("SLURM_JOB_ID"), slurm_step_id=os.environ.get("SLURM_STEP_ID"),
                torch=torch.__version__, cuda=torch.version.cuda, hip=torch.version.hip, collectives=collectives,
                group_backends=group_backends(ctx.device), head=head, qdevice=qdevice,
                omp={var: os.environ.get(var) for var in ("OMP_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES")})


def group_backends(device):
    """{device type: backend} that the joined process group really uses for tensors on the CPU and on `device`
    (what --backend asked for is ctx.backend), e.g. {"cpu": "gloo", "cuda": "nccl"}; None without a group."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    backends = {}
    for kind in sorted({"cpu", device.type}):
        try:
            backends[kind] = dist.group.WORLD._get_backend(torch.device(kind)).name()
        except (AttributeError, RuntimeError):  # a torch without per-device backends: the group's own name
            backends[kind] = str(dist.get_backend())
    return backends


def provenance_line(ctx):
    """Rank 0's first line: ranks and hosts, device, backend, the head and where its circuit runs."""
    run, me = ctx.provenance, ctx.rank_facts[0]
    device = f"{ctx.device}, CPUs {me['cpus']}"
    if "gpu" in me:
        runtime = f"HIP {run['hip']}" if run["hip"] else f"CUDA {run['cuda']}"
        device = f"{ctx.device} ({me['gpu']['name']}, {runtime})"
    backend = f"{ctx.backend} ({run['collectives']})" if run["collectives"] else ctx.backend
    slurm = f" | Slurm job {run['slurm_job_id']}.{run['slurm_step_id']}" if run["slurm_job_id"] else ""
    head = f"head: {run['head']['name']}, {run['head']['trainable_parameters']} trainable parameters"
    qdevice = f" | qdevice: {run['qdevice']['name']} ({run['qdevice']['summary']})" if run["qdevice"] else ""
    return (f"Ranks: {ctx.world_size} ({ctx.source}) on {','.join(run['hosts'])} | device: {device} | "
            f"backend: {backend} | {head}{qdevice}{slurm}")


def tensors_digest(named_tensors):
    """SHA-256 of (name, tensor) pairs, in name order: each name, then its values' bytes (any dtype, bf16 too)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda pair: pair[0]):
        digest.update(name.encode() + tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def head_digest(head):
    """SHA-256 of the dressed head's weights: equal on every rank when DDP kept them in step."""
    return tensors_digest(head.state_dict().items())


def buffers_digest(model):
    """SHA-256 of the model's buffers (the frozen backbone's BatchNorm running statistics and batch counts):
    equal on every rank when the statistics were synchronised (process_group.sync_buffers)."""
    return tensors_digest(model.named_buffers())


def record_digests(ctx, model):
    """Every rank's digests of its dressed head and of its buffers, in ctx.rank_facts (the metrics JSON's
    "ranks": head_sha256, buffers_sha256)."""
    digests = gather_objects(ctx, dict(head_sha256=head_digest(model.fc), buffers_sha256=buffers_digest(model)))
    for fact, mine in zip(ctx.rank_facts, digests, strict=True):
        fact.update(mine)


def write_metrics(path, state, config, ctx):
    best = {k: state[k] for k in ("best_acc", "best_loss", "best_acc_train", "best_loss_train")}
    report = dict(config=config, world_size=ctx.world_size, rank_source=ctx.source,
                  device=str(ctx.device), backend=ctx.backend, versions=package_versions(),
                  batch_size=config["batch_size"], global_batch_size=config["batch_size"] * ctx.world_size,
                  lr=config["lr"], trainable_parameters=ctx.provenance["head"]["trainable_parameters"],
                  provenance=ctx.provenance, ranks=ctx.rank_facts,
                  epochs=state["history"], training_seconds=state["seconds"],
                  best_val_acc=best["best_acc"], best_val_loss=best["best_loss"],
                  best_train_acc=best["best_acc_train"], best_train_loss=best["best_loss_train"],
                  **heldout.metrics_fields(state),
                  resumed=state.get("resumed", 0), complete=True)  # written only when the last epoch is done
    text = json.dumps(report, indent=2) + "\n"
    checkpoints.atomic_write(path, lambda file: file.write(text.encode()))


def write_finished_metrics(args, ctx, checkpoint, config):
    """The --metrics-json files of a run that --resume finds finished, from its checkpoint, as the run itself would
    have written them (it stopped after its last checkpoint, before its JSON): its epochs, bests and seconds, and
    the digests of the head it would have ended with (that of the best validation accuracy, else the last) and of
    its last buffers, which every rank held. No circuit is built, so `qdevice` names the device only."""
    state = checkpoint["state"]
    head = state["best_head"] if state["best_head"] is not None else checkpoint["head"]
    digests = dict(head_sha256=tensors_digest(head.items()),
                   buffers_sha256=tensors_digest(checkpoint["buffers"].items()))
    for fact in ctx.rank_facts:
        fact.update(digests)
    qdevice = dict(name=args.qdevice, summary="not started: the run was finished") if args.head == "quantum" else None
    trained = dict(name=args.head, trainable_parameters=sum(tensor.numel() for tensor in checkpoint["head"].values()))
    ctx.provenance = run_provenance(ctx, qdevice, trained)
    if ctx.is_main:
        for path in args.metrics_json:
            write_metrics(path, state, config, ctx)
