"""The sweep driver of submit_qml.sbatch, which sets up the site's environment and hands its arguments over:

    qml.py sweep [TASKS[,TASKS...]] [--repeats K] [--vary OPTION=V1,V2,...]... [--continue runs/<jobid>] [qml.py args]

Every check comes before the first step: the arguments, every count against the job's nodes, CPUs and GPUs, the
run folder against the sweep it was started with, and qml.py's own check of its arguments (`qml.py --check`).
Then one `srun` step per run (task count x combination of the varied values x repeat), each writing its metrics
JSON and checkpoint in runs/<jobid>; Slurm's wall-time warning (SIGUSR1) goes on to the running step, and a step
stopped by it requeues the job, which then skips the complete runs and resumes the begun one; a sweep ends with
`qml.py report`.

Only the standard library and command_line.py: no torch, no qml.py, so it starts at once on a batch node.
docs/slurm.md says what it plans and why.
"""

import argparse
import ast
import dataclasses
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys

from .command_line import RESUMABLE, RunFailed, UsageError, atomic_write

# Frontier (OLCF's "Frontier User Guide"): 8 GCDs a node, one per task; 64 cores a node less 8 for the system
# (core specialisation -S 8), 7 per task. srun -c counts physical cores there: SLURM_CPUS_ON_NODE may count
# hardware threads (2 a core), so the guide's cores are used instead.
FRONTIER_GPUS_PER_NODE, FRONTIER_CORES_PER_NODE, FRONTIER_CORES_PER_TASK = 8, 56, 7
# OLCF's RCCL settings for its libfabric plugin between Frontier nodes ("PyTorch on Frontier", RCCL Environment
# Variables); a value you or the rccl-net-plugin module set wins. FI_CXI_RDZV_PROTO=alt_read needs srun
# --network=disable_rdzv_get.
OLCF_RCCL_SETTINGS = {
    "NCCL_NET_GDR_LEVEL": "PHB", "NCCL_CROSS_NIC": "1", "HSA_FORCE_FINE_GRAIN_PCIE": "1",
    "FI_MR_CACHE_MONITOR": "kdreg2", "FI_CXI_DISABLE_HOST_REGISTER": "1", "FI_CXI_DEFAULT_CQ_SIZE": "131072",
    "FI_CXI_DEFAULT_TX_SIZE": "2048", "FI_CXI_RX_MATCH_MODE": "hybrid", "FI_CXI_RDZV_PROTO": "alt_read",
    "FI_CXI_RDZV_EAGER_SIZE": "0", "FI_CXI_RDZV_THRESHOLD": "0", "FI_CXI_RDZV_GET_MIN": "0",
}
# The job's own GPU requests (sbatch --gpus-per-node, --gpus-per-task, ...) reach srun as these variables and would
# ask for the job's shape again in a step of another shape.
JOB_GPU_REQUESTS = ("SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_SOCKET", "SLURM_GPUS_PER_TASK",
                    "SLURM_TRES_PER_TASK", "SLURM_CPUS_PER_GPU", "SLURM_MEM_PER_GPU", "SLURM_NTASKS_PER_GPU",
                    "SLURM_GPU_BIND")
GPU_ALLOCATIONS = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK")
SET_BY_THE_SWEEP = ("checkpoint", "resume", "metrics-json", "repeat", "check")  # qml.py options no --vary may take
WARNED_BEFORE_START = "QML_WALL_TIME_WARNED"  # set by submit_qml.sbatch when the warning came while it set up


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (usage: sbatch submit_qml.sbatch [TASKS[,TASKS...]] [--repeats K] "
                         f"[--vary OPTION=V1,V2,...]... [--continue runs/<jobid>] [qml.py arguments])")


def positive_count(text):
    if not re.fullmatch(r"\d{1,4}", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (runs per task count), not '{text}'")
    return int(text)


def option_values(text):
    """--vary OPTION=V1,V2,...: a qml.py option, without its dashes, and its values, which name the runs' files."""
    option, _, values = text.partition("=")
    values = values.split(",")
    if not (re.fullmatch(r"[a-z][a-z0-9-]*", option) and all(re.fullmatch(r"[\w.+=-]+", v) for v in values)):
        raise argparse.ArgumentTypeError(f"must be OPTION=V1,V2,... (a qml.py option without its dashes, values of "
                                         f"letters, digits and . _ + = -; e.g. n-qubits=2,4), not '{text}'")
    if option in SET_BY_THE_SWEEP or len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(f"'{text}': the sweep sets --{option} itself" if option in SET_BY_THE_SWEEP
                                         else f"'{text}' names a value twice")
    return option, values


class Once(argparse.Action):
    """An option given at most once: a second one would silently win."""

    def __call__(self, parser, namespace, values, option_string=None):
        if self.dest in namespace.given:
            parser.error(f"{option_string} is given twice; give it once")
        namespace.given.add(self.dest)
        setattr(namespace, self.dest, values)


class EachOptionOnce(argparse.Action):
    """--vary, given once per option: the grid's axes, in the order given."""

    def __call__(self, parser, namespace, values, option_string=None):
        varied = getattr(namespace, self.dest) or ()
        if values[0] in dict(varied):
            parser.error(f"{option_string} {values[0]}=... is given twice; give each option once")
        setattr(namespace, self.dest, (*varied, values))


def get_args_parser():
    """The launcher's own options, anywhere after the task counts; every other argument goes to qml.py (no prefix
    of ours is taken for one of qml.py's: --re could be --resume)."""
    parser = ArgumentParser(prog="submit_qml.sbatch", allow_abbrev=False, add_help=False)
    parser.set_defaults(given=set())
    add = parser.add_argument
    add("--repeats", action=Once, type=positive_count, default=1, help="runs of every count and value")
    add("--vary", action=EachOptionOnce, type=option_values, default=(), help="OPTION=V1,V2,...: one run per value "
        "of a qml.py option; given for several options, one run per combination of their values")
    add("--continue", action=Once, dest="continue_dir", help="finish the sweep of an earlier job's runs/<jobid>")
    return parser


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What a job was asked to run (submit_qml.sbatch's arguments)."""

    counts: tuple  # task counts, in order
    repeats: int
    varied: tuple  # ((qml.py option without dashes, its values), ...) of every --vary, in order; () without
    continue_dir: str | None
    qml_args: tuple  # the rest, for every run

    def words(self):
        """The sweep's arguments, spelled one way: what sweep.args holds and a --continue job must repeat."""
        vary = [f"--vary={option}={','.join(values)}" for option, values in self.varied]
        return [",".join(map(str, self.counts)), f"--repeats={self.repeats}", *vary, *self.qml_args]

    def combinations(self):
        """Every combination of the varied values, each a tuple of (option, value), the last option fastest;
        one empty combination without --vary."""
        return list(itertools.product(*([(option, value) for value in values] for option, values in self.varied)))


def parse_sweep(argv):
    """The first argument is the task count(s), N or N1,N2,... (default 1); then the launcher's options, anywhere,
    and qml.py's arguments."""
    first = argv[0] if argv else "1"
    if not re.fullmatch(r"\d{1,5}(,\d{1,5})*", first) or 0 in (counts := tuple(map(int, first.split(",")))):
        raise UsageError(f"first argument must be a task count or a comma list of them (e.g. 4 or 1,2,4,8), "
                         f"not '{first}'")
    if len(set(counts)) < len(counts):
        raise UsageError(f"first argument '{first}' names a task count twice; name each once")
    ours, qml_args = get_args_parser().parse_known_args(argv[1:])
    for option, _ in ours.vary:
        if any(arg == f"--{option}" or arg.startswith(f"--{option}=") for arg in qml_args):
            raise UsageError(f"--{option} is both varied (--vary) and given to qml.py; drop one of them")
    varied = tuple((option, tuple(values)) for option, values in ours.vary)
    return Sweep(counts, ours.repeats, varied, ours.continue_dir, tuple(qml_args))


@dataclasses.dataclass(frozen=True)
class Run:
    tasks: int
    args: tuple  # this run's qml.py arguments beside the sweep's: the varied values, the repeat
    stem: str  # runs/<jobid>/<name>: the run's metrics JSON is stem.json, its checkpoint stem.pt


def plan_runs(sweep, rundir):
    """Every run, repeat-major: each round runs every combination of values and every count once, so that a slow
    spell of the nodes spreads over all of them. A run's name is tasks-N alone, else it carries each varied option
    and its value, and the repeat."""
    runs = []
    for repeat in range(sweep.repeats):
        for combination in sweep.combinations():
            for tasks in sweep.counts:
                name = "-".join([f"tasks-{tasks}", *(f"{option}-{value}" for option, value in combination)])
                args = [word for option, value in combination for word in (f"--{option}", value)]
                if sweep.repeats > 1:
                    args += ["--repeat", str(repeat)]
                if sweep.repeats > 1 or combination:
                    name += f"-repeat-{repeat}"
                runs.append(Run(tasks, tuple(args), os.path.join(rundir, name)))
    return runs


def run_state(stem):
    """"complete" when the run's metrics JSON says so (qml.py writes it last, also for a finished checkpoint),
    "begun" when its checkpoint exists (its step resumes it), else "new"."""
    try:
        with open(f"{stem}.json") as file:
            if json.load(file).get("complete") is True:
                return "complete"
    except (OSError, ValueError, AttributeError):  # none yet, half-written by hand, or not a JSON object
        pass
    return "begun" if os.path.exists(f"{stem}.pt") else "new"


@dataclasses.dataclass(frozen=True)
class Allocation:
    """What the job holds and the site's rules, read once from the batch script's environment."""

    frontier: bool
    nodes: int
    cpus_per_node: int  # in srun -c's unit; 0 when Slurm does not say
    gpus_per_node: int  # 0 when Slurm does not say
    gpus_per_task: int
    cpus_per_task: int | None  # the same for every step, or None: the node's CPUs shared by the step's tasks there
    cpus_from: str  # your setting that fixed cpus_per_task (what to change when it does not fit), or ""


def whole_number(env, name, low):
    text = env.get(name, "")
    if not text:
        return None
    if not re.fullmatch(r"\d+", text) or int(text) < low:
        raise UsageError(f"{name} must be {'a positive' if low else 'a non-negative'} integer, not '{text}'")
    return int(text)


def read_allocation(env):
    """The job's nodes, CPUs and GPUs. CPUs per task: QML_CPUS_PER_TASK, else your sbatch --cpus-per-task (Slurm
    exports it as SLURM_CPUS_PER_TASK), else Frontier's 7 cores, else a share of the node. GPUs per task:
    QML_GPUS_PER_TASK, else 1 on Frontier or when the allocation has GPUs, else none."""
    frontier = env.get("QML_SITE") == "frontier"
    has_gpus = any(env.get(name) and not re.fullmatch(r"([^:]*:)?0", env[name]) for name in GPU_ALLOCATIONS)
    gpus = whole_number(env, "QML_GPUS_PER_TASK", 0)
    cpus, cpus_from = whole_number(env, "QML_CPUS_PER_TASK", 1), "QML_CPUS_PER_TASK"
    if cpus is None and (cpus := whole_number(env, "SLURM_CPUS_PER_TASK", 1)) is not None:
        cpus_from = "sbatch --cpus-per-task"
    if cpus is None:
        cpus, cpus_from = FRONTIER_CORES_PER_TASK if frontier else None, ""
    nodes = whole_number(env, "SLURM_JOB_NUM_NODES", 1) or whole_number(env, "SLURM_NNODES", 1) or 1
    if frontier:
        return Allocation(True, nodes, FRONTIER_CORES_PER_NODE, FRONTIER_GPUS_PER_NODE, 1 if gpus is None else gpus,
                          cpus, cpus_from)
    return Allocation(False, nodes, whole_number(env, "SLURM_CPUS_ON_NODE", 0) or 0,
                      whole_number(env, "SLURM_GPUS_ON_NODE", 0) or 0, int(has_gpus) if gpus is None else gpus,
                      cpus, cpus_from)


@dataclasses.dataclass(frozen=True)
class Step:
    tasks: int
    nodes: int
    per_node: int
    cpus: int  # srun -c


def plan_step(tasks, alloc, counts):
    """The shape of a step of `tasks` tasks. GPU tasks pack onto as few nodes as hold them (collectives inside a node
    are fastest); CPU tasks spread over the job's nodes, so that each gets more cores. A node holds as many tasks as
    both its GPUs and its CPUs allow (a task takes 1 CPU when they are shared). A step the job cannot hold is refused
    in one line naming the sbatch -N that fits (`counts`: the sweep's, for that line)."""
    cpus_each, caps = alloc.cpus_per_task or 1, []
    if alloc.cpus_per_node:
        if cpus_each > alloc.cpus_per_node:
            raise UsageError(f"{cpus_each} CPUs per task ({alloc.cpus_from}) but a node has {alloc.cpus_per_node}: "
                             f"lower {alloc.cpus_from or 'QML_CPUS_PER_TASK'}")
        caps.append(alloc.cpus_per_node // cpus_each)
    if alloc.gpus_per_task and alloc.gpus_per_node:
        if alloc.gpus_per_task > alloc.gpus_per_node:
            raise UsageError(f"{alloc.gpus_per_task} GPUs per task but a node has {alloc.gpus_per_node}: lower "
                             f"QML_GPUS_PER_TASK")
        caps.append(alloc.gpus_per_node // alloc.gpus_per_task)
    nodes = min(tasks, alloc.nodes)
    if caps and (alloc.gpus_per_task or -(-tasks // min(caps)) > nodes):
        nodes = -(-tasks // min(caps))
    if nodes > alloc.nodes:
        of = f"; {cpus_each} CPUs each, from {alloc.cpus_from}" if alloc.cpus_from else ""
        raise UsageError(f"{tasks} tasks need {nodes} nodes ({min(caps)} tasks per node{of}) but the job has "
                         f"{alloc.nodes}: submit with 'sbatch -N {nodes} submit_qml.sbatch {counts} ...'")
    per_node = -(-tasks // nodes)
    return Step(tasks, nodes, per_node, alloc.cpus_per_task or max(alloc.cpus_per_node // per_node, 1))


def srun_command(step, alloc, program):
    cmd = ["srun", f"-n{step.tasks}", f"-N{step.nodes}", f"--ntasks-per-node={step.per_node}", f"-c{step.cpus}",
           "--kill-on-bad-exit=1"]  # a failed rank ends its step, rather than leaving the others waiting
    if alloc.gpus_per_task:
        # OLCF's --gpu-bind=closest gives each task its own GCD on Frontier; elsewhere it may give a task every GPU
        # of its NUMA domain, which ranks would then share, while --gpus-per-task alone binds each task its own.
        cmd += [f"--gpus-per-task={alloc.gpus_per_task}", *(["--gpu-bind=closest"] if alloc.frontier else [])]
    if alloc.frontier and step.nodes > 1:
        cmd.append("--network=disable_rdzv_get")  # what OLCF's FI_CXI_RDZV_PROTO=alt_read needs
    return cmd + program


def omp_threads(step, alloc, env):
    """Yours when set; 1 on Frontier's default 7 cores (the value of OLCF's own script for the tutorial); else one
    thread per CPU of the task."""
    if env.get("OMP_NUM_THREADS"):
        return env["OMP_NUM_THREADS"]
    return "1" if alloc.frontier and not alloc.cpus_from else str(step.cpus)


def lmod_load(module, env):
    """The environment changes of `module load MODULE`, {name: value, or None to unset}, or None when it does not
    load. `module` is a shell function; Lmod's Python interface (`$LMOD_CMD python load M`) prints Python statements
    instead, which are read here, not run: os.environ[...] = ..., del os.environ[...], and its status (_mlstatus,
    or `false` before Lmod 8.2)."""
    if not env.get("LMOD_CMD"):
        return None
    try:
        out = subprocess.run([env["LMOD_CMD"], "python", "load", module], env=env, stdout=subprocess.PIPE, text=True)
        changes, loaded = {}, out.returncode == 0
        for node in ast.parse(out.stdout).body:
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Subscript):
                changes[ast.literal_eval(node.targets[0].slice)] = ast.literal_eval(node.value)
            elif isinstance(node, ast.Delete):
                changes.update((ast.literal_eval(target.slice), None) for target in node.targets)
            elif isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_mlstatus":
                loaded = loaded and ast.literal_eval(node.value) is True
            elif isinstance(node, ast.Expr) and getattr(node.value, "id", "") == "false":
                loaded = False
    except (OSError, SyntaxError, ValueError):
        return None
    return changes if loaded else None


def rccl_between_nodes(env):
    """The changes a Frontier step over several nodes makes to its environment: OLCF's rccl-net-plugin module
    (without it RCCL falls back to TCP sockets between nodes; inside one node the plugin does not initialise, so
    one-node steps go without), then OLCF's RCCL settings where neither you nor the module set them."""
    changes = lmod_load("rccl-net-plugin", env)
    if changes is None:
        print("sweep.py: warning: no rccl-net-plugin module: RCCL uses TCP sockets between nodes", file=sys.stderr,
              flush=True)
    changes = changes or {}
    after = {name: value for name, value in {**env, **changes}.items() if value is not None}
    return {**changes, **{name: value for name, value in OLCF_RCCL_SETTINGS.items() if name not in after}}


def step_environment(step, alloc, env, between_nodes):
    """The batch environment less the job's GPU requests, with the step's OpenMP threads and, for a Frontier step
    over several nodes, `between_nodes` (rccl_between_nodes): nothing of one step's setup reaches the next."""
    step_env = {name: value for name, value in env.items() if name not in JOB_GPU_REQUESTS}
    step_env["OMP_NUM_THREADS"] = omp_threads(step, alloc, env)
    if alloc.frontier and step.nodes > 1:
        step_env.update(between_nodes)
    return {name: value for name, value in step_env.items() if value is not None}


def find_rundir(sweep, job_id):
    """(folder, whether it holds an earlier start of this sweep): --continue's, else runs/<jobid>, which a requeued
    job (same id) finds again. A folder with a sweep.args must be of this sweep, word for word, so that no run of
    its report is of another experiment."""
    rundir = os.path.normpath(sweep.continue_dir or os.path.join("runs", job_id))
    try:
        with open(os.path.join(rundir, "sweep.args"), "rb") as file:
            saved = file.read().decode(errors="replace").split("\0")[:-1]
    except FileNotFoundError:
        if sweep.continue_dir:
            raise UsageError(f"--continue {rundir}: no sweep.args there: give the runs/<jobid> folder of an earlier "
                             f"submit_qml.sbatch job") from None
        return rundir, False
    if saved != sweep.words():
        raise UsageError(f"{'--continue ' if sweep.continue_dir else ''}{rundir}: its runs were started as "
                         f"'submit_qml.sbatch {' '.join(saved)}', this job is 'submit_qml.sbatch "
                         f"{' '.join(sweep.words())}'; continue it with the same arguments")
    return rundir, True


def record_sweep(rundir, sweep):
    """Make the folder and write its sweep.args (the words, each ended by NUL) whole or not at all."""
    words = "".join(f"{word}\0" for word in sweep.words()).encode()
    atomic_write(os.path.join(rundir, "sweep.args"), lambda file: file.write(words))


def check_qml_args(python, script, sweep):
    """qml.py's own check of the arguments its runs get (`qml.py ... --check`), once per combination of the varied
    values (a combination may be refused where each value alone is not), with the last
    repeat's seeds, on the batch node: bad arguments end the job before any step, in qml.py's one line, rather than
    in a step, once per rank. Exits with qml.py's status when they are refused."""
    last_repeat = ("--repeat", str(sweep.repeats - 1)) if sweep.repeats > 1 else ()
    for combination in sweep.combinations():
        varied = [word for option, value in combination for word in (f"--{option}", value)]
        status = subprocess.run([python, "-W", "ignore", script, *sweep.qml_args, *varied, *last_repeat,
                                 "--check"]).returncode
        if status:
            raise SystemExit(status)


class WallTimeWarning:
    """Slurm's warning before the wall-time limit (#SBATCH --signal=B:USR1@120), sent to this process: passed on to
    the running step, whose ranks stop between batches and exit RESUMABLE; between steps, the sweep stops before
    the next one. Installed first thing: submit_qml.sbatch ignores the signal until then."""

    def __init__(self, env):
        self.came, self.step, self.forwarded = env.pop(WARNED_BEFORE_START, "") == "1", None, False
        signal.signal(signal.SIGUSR1, self.forward)

    def forward(self, signum, frame):
        self.came = True
        print("== wall-time warning: the running step stops between batches, keeping its last complete epoch",
              flush=True)
        if self.step is not None:
            self.forwarded = True
            self.step.send_signal(signal.SIGUSR1)  # srun passes it on to every task

    def run(self, command, env):
        """Run a step to its end: its exit status, and whether the warning was passed on to it."""
        self.step, self.forwarded = subprocess.Popen(command, env=env), False
        try:
            return self.step.wait(), self.forwarded
        finally:
            self.step = None


def requeue_or_say_how_to_continue(why, sweep, rundir, job_id):
    """After the warning: requeue this job (it starts again later with the same id, finds its folder and goes on),
    or, where that is refused, say in one line what continues it. Ends the driver: 0 requeued, else RESUMABLE."""
    if subprocess.run(["scontrol", "requeue", job_id]).returncode == 0:
        print(f"== {why}; job {job_id} is requeued and will continue in {rundir}", flush=True)
        raise SystemExit(0)
    print(f"sweep.py: {why} and this job cannot be requeued; continue it with: sbatch submit_qml.sbatch "
          f"{shlex.join([*sweep.words(), '--continue', rundir])}", file=sys.stderr, flush=True)
    raise SystemExit(RESUMABLE)


@dataclasses.dataclass(frozen=True)
class Job:
    """Where and how this job runs its steps, set up once by main."""

    job_id: str
    rundir: str
    alloc: Allocation
    steps: dict  # task count -> Step
    env: dict  # the batch script's environment
    python: str  # the interpreter submit_qml.sbatch chose: it runs this driver, qml.py's check, the steps, the report
    script: str  # qml.py
    between_nodes: dict  # rccl_between_nodes(), for Frontier steps over several nodes


def run_step(run, state, sweep, job, warning):
    """The run's srun step, resumed from its checkpoint when begun. Requeues when the warning stopped it; a failed
    step ends the sweep with its status."""
    json_path, checkpoint = f"{run.stem}.json", f"{run.stem}.pt"
    resume = ("--resume", checkpoint) if state == "begun" else ()
    program = [job.python, "-W", "ignore", "-u", job.script, *sweep.qml_args, *run.args, "--checkpoint", checkpoint,
               *resume, "--metrics-json", json_path]  # the user's own --metrics-json, if any, is written too
    step, alloc = job.steps[run.tasks], job.alloc
    command, env = srun_command(step, alloc, program), step_environment(step, alloc, job.env, job.between_nodes)
    port = job.env.get("MASTER_PORT") or "qml.py's, from the job id"
    print(f"== {os.path.basename(run.stem)}: site={'frontier' if alloc.frontier else 'generic'} tasks={step.tasks} "
          f"nodes={step.nodes} cpus/task={step.cpus} gpus/task={alloc.gpus_per_task} "
          f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} MASTER_PORT={port}\n+ {shlex.join(command)}", flush=True)
    status, warned = warning.run(command, env)
    # RESUMABLE: its ranks stopped between batches. A rank still starting (importing torch) has no handler yet
    # and dies of the signal: its step lost no epoch either.
    if status == RESUMABLE or (status and warned):
        requeue_or_say_how_to_continue(f"the {run.tasks}-task step was stopped by the wall-time warning", sweep,
                                       job.rundir, job.job_id)
    if status:
        status = 128 - status if status < 0 else status  # killed by a signal: as a shell says it
        print(f"sweep.py: error: the {run.tasks}-task step failed with exit status {status}", file=sys.stderr)
        raise SystemExit(status)


def run_sweep(sweep, runs, job, warning):
    """Every run not complete yet, in order; a warning that came between steps requeues before the next one."""
    for run in runs:
        state = run_state(run.stem)
        if state == "complete":
            print(f"== {run.tasks} tasks: {run.stem}.json is complete, skipped", flush=True)
        elif warning.came:
            requeue_or_say_how_to_continue(f"the wall-time warning came before the {run.tasks}-task step", sweep,
                                           job.rundir, job.job_id)
        else:
            run_step(run, state, sweep, job, warning)


def report(sweep, job):
    """`qml.py report RUNDIR` over the folder: the table, CSV, plot and answer. Its exit status."""
    varied = "".join(f", --{option} {','.join(values)}" for option, values in sweep.varied)
    command = [job.python, "-W", "ignore", "-u", job.script, "report", job.rundir]
    print(f"== scaling report for task counts {sweep.words()[0]}{varied}, {sweep.repeats} run(s) each\n"
          f"+ {shlex.join(command)}", flush=True)
    status = subprocess.run(command).returncode
    if status:
        print(f"sweep.py: error: the scaling report failed with exit status {status}", file=sys.stderr)
    return status


def runs_line(sweep, runs):
    """The sweep's size, before its first step: the runs, how they multiply, and how many are complete already."""
    factors = [f"{len(values)} {option}" for option, values in sweep.varied]
    factors += [f"{len(sweep.counts)} task count(s)", f"{sweep.repeats} repeat(s)"]
    complete = sum(run_state(run.stem) == "complete" for run in runs)
    return f"{len(runs)} runs ({' x '.join(factors)}), {complete} complete already"


def set_up(sweep, env):
    """Everything the steps need, every check before the first: the job, its counts against its allocation, the
    run folder, qml.py's arguments."""
    if not env.get("SLURM_JOB_ID"):
        raise UsageError("not inside a Slurm job: submit it with 'sbatch submit_qml.sbatch [TASKS[,TASKS...]] "
                         "[qml.py args]'")
    alloc = read_allocation(env)
    counts = sweep.words()[0]
    steps = {tasks: plan_step(tasks, alloc, counts) for tasks in sweep.counts}  # all must fit before one runs
    script = env.get("QML_SCRIPT") or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                   "qml.py")
    if not os.path.isfile(script):
        raise RunFailed(f"training script {script} not found (keep qml.py beside machinery/ or set QML_SCRIPT)")
    rundir, continuing = find_rundir(sweep, env["SLURM_JOB_ID"])
    if not continuing or sweep.continue_dir:  # a requeued job's own folder: its arguments passed at its first start
        check_qml_args(sys.executable, script, sweep)
    if continuing:
        print(f"== continuing {rundir} (restart {env.get('SLURM_RESTART_COUNT', '0')} of job {env['SLURM_JOB_ID']})",
              flush=True)
    else:
        record_sweep(rundir, sweep)
    several = alloc.frontier and any(step.nodes > 1 for step in steps.values())
    return Job(env["SLURM_JOB_ID"], rundir, alloc, steps, env, sys.executable, script,
               rccl_between_nodes(env) if several else {})


def main(argv=None):
    env = dict(os.environ)
    warning = WallTimeWarning(env)
    try:
        sweep = parse_sweep(sys.argv[1:] if argv is None else list(argv))
        job = set_up(sweep, env)
        runs = plan_runs(sweep, job.rundir)
        print(f"== {runs_line(sweep, runs)}", flush=True)
        run_sweep(sweep, runs, job, warning)
        return report(sweep, job) if len(runs) > 1 else 0
    except (UsageError, RunFailed) as err:
        print(f"sweep.py: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
