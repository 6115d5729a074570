"""Process-group plumbing around qml.py's rank discovery: the DistContext it fills, what MPI launchers and Slurm
tell (ranks, node lists, the port), joining and leaving the group, where each rank runs (rank_facts) and the
one-GPU-per-rank check, and the few collectives the run needs."""

import dataclasses
import datetime
import gc
import os
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from .command_line import UsageError


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
    provenance: dict = dataclasses.field(default_factory=dict)  # what the run used: records.run_provenance

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        """A launcher started us: even one task joins a process group and trains through DDP."""
        return self.source != "single"


# (rank, size, local rank, local size) variables of the MPI launchers that set all four:
# MPICH's mpiexec (Hydra), Cray MPICH's (PALS), and Open MPI's mpirun.
MPI_RANK_VARS = (("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
                 ("PMI_RANK", "PMI_SIZE", "PMI_LOCAL_RANK", "PMI_LOCAL_SIZE"),  # Cray PALS
                 ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                  "OMPI_COMM_WORLD_LOCAL_SIZE"))


def mpi_ranks(env):
    """(rank, world_size, local_rank, rank 0's host or None) of a process an MPI launcher started (the caller
    knows it did), or None when neither its variables nor mpi4py tell.

    The launcher's variables are enough when they give all four numbers and either MASTER_ADDR is set or
    every rank is on this host; only otherwise is MPI initialised (mpi4py) to ask it.
    """
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


def master_port(env):
    """MASTER_PORT, else one derived from the Slurm job id (two jobs on a node do not collide), else 29500."""
    if env.get("MASTER_PORT"):
        return env["MASTER_PORT"]
    job_id = env.get("SLURM_JOB_ID", "")
    if job_id.isdigit():
        return str(10000 + int(job_id) % 20000)
    return "29500"


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


def step_master(env, warn):
    """An srun step's MASTER_ADDR: the environment's when it is one of the step's own nodes (in a sweep a small step
    may not run on the allocation's first node), else their first, else None. A MASTER_ADDR from a login shell
    (OLCF's pages suggest `export MASTER_ADDR=$(hostname -i)`) names a host outside the step, where the ranks would
    wait until the timeout; `warn`: say so on stderr."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    nodes, given = expand_nodelist(nodelist) if nodelist else [], env.get("MASTER_ADDR")
    if not nodes or given is None or names_one_of(given, nodes):
        return given or (nodes[0] if nodes else None)
    if warn:
        print(f"qml.py: warning: MASTER_ADDR={given} is none of this step's nodes ({', '.join(nodes[:4])}"
              f"{', ...' if len(nodes) > 4 else ''}); using {nodes[0]}", file=sys.stderr, flush=True)
    return nodes[0]


def names_one_of(addr, hosts):
    """Whether addr (a host name, short or full, or an IP address) is one of hosts, by name or by address."""
    if addr in hosts or addr.split(".")[0] in hosts:
        return True
    try:
        wanted = {info[4][0] for info in socket.getaddrinfo(addr, None)}
        return any(wanted & {info[4][0] for info in socket.getaddrinfo(host, None)} for host in hosts)
    except OSError:  # a name that does not resolve is none of the hosts
        return False


def pick_device(requested, local_rank=0):
    """The torch device for this rank: a GPU (CUDA or ROCm) when asked for or visible, else the CPU. GPU = local
    rank modulo the visible GPUs: each task sees one (srun --gpus-per-task=1), or all of the node's; whether two
    ranks then share one is checked later (check_one_gpu_per_rank)."""
    has_gpu = torch.cuda.is_available()
    if requested == "cuda" and not has_gpu:
        raise UsageError("--device cuda: no GPU is visible to this process; use --device cpu (or auto)")
    if requested == "cpu" or not has_gpu:
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


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


def leave_process_group():
    """Free what is left of DDP, then the process group, while Python is still fully alive.

    DDP holds the group: freed only at interpreter exit, it takes gloo's worker threads down
    with it, and one of them that then needs the GIL aborts the process (SIGABRT).
    """
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


def sync_buffers(ctx, model):
    """Give every rank rank 0's BatchNorm running statistics before validation.

    DDP (broadcast_buffers) copies rank 0's buffers to the others only at the start of each training
    forward, so after the train phase each rank's statistics hold its own last batch; validation runs the
    bare model, without DDP, and must use the same statistics on every rank, as one model would.
    """
    if ctx.world_size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


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
