"""sweep.py's decisions as functions, without Slurm, bash or qml.py: the launcher's arguments, the runs and their
names, a run's state, the run folder, the steps' shapes and environments, Lmod's plugin. tests/test_slurm.py runs
the whole launcher (submit_qml.sbatch, then sweep.py) with fake srun and scontrol, and on a real local Slurm."""

import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from machinery import sweep
from machinery.command_line import RESUMABLE, UsageError

GENERIC_NODE = {"SLURM_JOB_ID": "9", "SLURM_JOB_NUM_NODES": "1", "SLURM_CPUS_ON_NODE": "8"}
FRONTIER_NODE = dict(GENERIC_NODE, QML_SITE="frontier", SLURM_CPUS_ON_NODE="112")


def test_qml_py_sweep_imports_neither_torch_nor_numpy_and_starts_at_once():
    """submit_qml.sbatch runs `qml.py sweep`: qml.py hands it over to machinery/sweep.py before it imports torch."""
    probe = ("import atexit, runpy, sys, time; t = time.time(); "
             "atexit.register(lambda: print('LOADED', time.time() - t, 'torch' in sys.modules, "
             "'numpy' in sys.modules)); "
             "sys.argv = ['qml.py', 'sweep']; "
             "runpy.run_path('qml.py', run_name='__main__')")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "not inside a Slurm job" in proc.stderr, proc.stderr  # the sweep's own check
    _, seconds, *heavy = proc.stdout.split()
    assert heavy == ["False", "False"] and float(seconds) < 0.5, proc.stdout
    assert time.monotonic() - started < 5  # the interpreter too, even on a loaded machine


def test_the_resumable_status_is_qml_pys():
    assert sweep.RESUMABLE is RESUMABLE == 75


@pytest.mark.parametrize("argv, counts, repeats, vary, continue_dir, qml_args", [
    ([], (1,), 1, None, None, ()),
    (["1,02,4", "--epochs", "2"], (1, 2, 4), 1, None, None, ("--epochs", "2")),
    (["2", "--seed", "7", "--repeats=3", "--shuffle-seed=5"], (2,), 3, None, None, ("--seed", "7", "--shuffle-seed=5")),
    (["1", "--vary", "n-qubits=2,4", "--continue", "runs/7"], (1,), 1, (("n-qubits", ("2", "4")),), "runs/7", ()),
    (["1", "--vary", "head=quantum,linear", "--epochs", "2", "--vary=lr=0.1,0.2"], (1,), 1,
     (("head", ("quantum", "linear")), ("lr", ("0.1", "0.2"))), None, ("--epochs", "2")),
    (["1", "--rep", "2", "--resume", "x.pt"], (1,), 1, None, None, ("--rep", "2", "--resume", "x.pt")),
], ids=["default", "counts", "repeats-anywhere", "vary-continue", "grid", "no-prefixes"])
def test_parse_sweep_splits_the_launchers_arguments_from_qml_pys(argv, counts, repeats, vary, continue_dir, qml_args):
    parsed = sweep.parse_sweep(argv)
    assert (parsed.counts, parsed.repeats, parsed.continue_dir, parsed.qml_args) == (
        counts, repeats, continue_dir, qml_args)
    assert parsed.varied == (vary or ())


def test_a_sweeps_words_are_spelled_one_way():
    words = sweep.parse_sweep(["01,2", "--epochs", "2", "--vary", "lr=1,2", "--repeats", "3"]).words()
    assert words == ["1,2", "--repeats=3", "--vary=lr=1,2", "--epochs", "2"]
    assert sweep.parse_sweep(["1,2", "--repeats=3", "--vary=lr=1,2", "--epochs", "2"]).words() == words


@pytest.mark.parametrize("argv, named", [(["0"], "'0'"), (["1,1"], "twice"), (["1", "--repeats", "0"], "--repeats"),
                                         (["1", "--vary", "a b=1"], "--vary"), (["1", "--repeats"], "--repeats"),
                                         (["1", "--vary", "lr=1", "--lr=2"], "--lr is both varied"),
                                         (["1", "--vary", "lr=1", "--vary", "head=linear", "--lr", "2"],
                                          "--lr is both varied"),
                                         (["1", "--vary", "lr=1,2", "--vary", "lr=3"], "lr=... is given twice")])
def test_parse_sweep_refuses_bad_arguments_in_one_line(argv, named):
    with pytest.raises(UsageError, match=named) as refused:
        sweep.parse_sweep(argv)
    assert "\n" not in str(refused.value)


def names(runs):
    return [(run.tasks, run.args, os.path.basename(run.stem)) for run in runs]


def test_runs_of_one_repeat_without_vary_keep_their_plain_names():
    runs = sweep.plan_runs(sweep.parse_sweep(["1,2"]), "runs/9")
    assert names(runs) == [(1, (), "tasks-1"), (2, (), "tasks-2")] and runs[0].stem == "runs/9/tasks-1"


def test_runs_are_repeat_major_and_carry_the_value_and_the_repeat():
    runs = sweep.plan_runs(sweep.parse_sweep(["1,2", "--vary", "n-qubits=2,4", "--repeats", "2"]), "runs/9")
    assert names(runs)[:3] == [(1, ("--n-qubits", "2", "--repeat", "0"), "tasks-1-n-qubits-2-repeat-0"),
                               (2, ("--n-qubits", "2", "--repeat", "0"), "tasks-2-n-qubits-2-repeat-0"),
                               (1, ("--n-qubits", "4", "--repeat", "0"), "tasks-1-n-qubits-4-repeat-0")]
    assert names(runs)[-1] == (2, ("--n-qubits", "4", "--repeat", "1"), "tasks-2-n-qubits-4-repeat-1")
    assert len({run.stem for run in runs}) == len(runs) == 8
    assert names(sweep.plan_runs(sweep.parse_sweep(["4", "--repeats", "3"]), "r"))[2] == (
        4, ("--repeat", "2"), "tasks-4-repeat-2")
    assert names(sweep.plan_runs(sweep.parse_sweep(["4", "--vary", "lr=0.1,0.01"]), "r")) == [
        (4, ("--lr", "0.1"), "tasks-4-lr-0.1-repeat-0"), (4, ("--lr", "0.01"), "tasks-4-lr-0.01-repeat-0")]


def test_a_grid_runs_every_combination_at_every_count_and_names_each_run_by_all_its_values():
    grid = sweep.parse_sweep(["1,2", "--vary", "head=quantum,linear", "--vary", "lr=0.1,0.2,0.4", "--repeats", "2"])
    runs = sweep.plan_runs(grid, "r")
    assert len(runs) == 2 * 3 * 2 * 2 == len({run.stem for run in runs})
    assert names(runs)[:3] == [
        (1, ("--head", "quantum", "--lr", "0.1", "--repeat", "0"), "tasks-1-head-quantum-lr-0.1-repeat-0"),
        (2, ("--head", "quantum", "--lr", "0.1", "--repeat", "0"), "tasks-2-head-quantum-lr-0.1-repeat-0"),
        (1, ("--head", "quantum", "--lr", "0.2", "--repeat", "0"), "tasks-1-head-quantum-lr-0.2-repeat-0")]
    assert names(runs)[-1] == (2, ("--head", "linear", "--lr", "0.4", "--repeat", "1"),
                               "tasks-2-head-linear-lr-0.4-repeat-1")
    assert grid.words()[2:4] == ["--vary=head=quantum,linear", "--vary=lr=0.1,0.2,0.4"]


def test_the_runs_line_multiplies_the_grid_and_counts_the_complete_runs(tmp_path):
    grid = sweep.parse_sweep(["1", "--vary", "head=quantum,linear", "--vary", "lr=0.1,0.2,0.4", "--repeats", "2"])
    runs = sweep.plan_runs(grid, str(tmp_path))
    (tmp_path / "tasks-1-head-linear-lr-0.2-repeat-1.json").write_text('{"complete": true}')
    assert sweep.runs_line(grid, runs) == "12 runs (2 head x 3 lr x 1 task count(s) x 2 repeat(s)), 1 complete already"


@pytest.mark.parametrize("files, state", [({}, "new"), ({".pt": b"x"}, "begun"),
                                          ({".pt": b"x", ".json": b'{"complete": false}'}, "begun"),
                                          ({".json": b'{"complete": true}'}, "complete"),
                                          ({".pt": b"x", ".json": b'{"complete": tr'}, "begun"),
                                          ({".json": b"[1]"}, "new")],
                         ids=["nothing", "checkpoint", "json-not-complete", "complete", "half-written", "not-a-dict"])
def test_run_state(tmp_path, files, state):
    for suffix, data in files.items():
        (tmp_path / f"tasks-1{suffix}").write_bytes(data)
    assert sweep.run_state(str(tmp_path / "tasks-1")) == state


def test_a_new_folder_records_its_sweep_and_a_second_start_finds_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = sweep.parse_sweep(["1,2", "--epochs", "2"])
    assert sweep.find_rundir(plan, "9") == ("runs/9", False)
    sweep.record_sweep("runs/9", plan)
    assert (tmp_path / "runs/9/sweep.args").read_bytes() == b"1,2\0--repeats=1\0--epochs\0002\0"
    assert os.listdir("runs/9") == ["sweep.args"]  # no temporary file left
    assert sweep.find_rundir(plan, "9") == ("runs/9", True)
    assert sweep.find_rundir(sweep.parse_sweep(["1,2", "--epochs", "2", "--continue", "./runs/9/"]), "10") == (
        "runs/9", True)


def test_a_folder_of_another_sweep_is_refused_naming_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep.record_sweep("runs/9", sweep.parse_sweep(["1,2", "--epochs", "2"]))
    with pytest.raises(UsageError) as refused:
        sweep.find_rundir(sweep.parse_sweep(["1,2", "--epochs", "3", "--continue", "runs/9"]), "10")
    assert ("its runs were started as 'submit_qml.sbatch 1,2 --repeats=1 --epochs 2', this job is "
            "'submit_qml.sbatch 1,2 --repeats=1 --epochs 3'") in str(refused.value)
    with pytest.raises(UsageError, match="no sweep.args there"):
        sweep.find_rundir(sweep.parse_sweep(["1", "--continue", "runs/8"]), "10")


def test_an_unwritable_folder_fails_in_one_line(tmp_path):
    (tmp_path / "runs").write_text("a file in the way")
    with pytest.raises(sweep.RunFailed, match="cannot write"):
        sweep.record_sweep(str(tmp_path / "runs" / "9"), sweep.parse_sweep(["1"]))


def shape(tasks, env, counts="1"):
    step = sweep.plan_step(tasks, sweep.read_allocation(env), counts)
    return step.nodes, step.per_node, step.cpus


@pytest.mark.parametrize("tasks, env, expected", [
    (8, FRONTIER_NODE, (1, 8, 7)), (16, dict(FRONTIER_NODE, SLURM_JOB_NUM_NODES="2"), (2, 8, 7)),
    (2, dict(FRONTIER_NODE, SLURM_JOB_NUM_NODES="2"), (1, 2, 7)),  # GPU tasks pack onto one node
    (4, dict(GENERIC_NODE, SLURM_JOB_NUM_NODES="2"), (2, 2, 4)),  # CPU tasks spread
    (3, GENERIC_NODE, (1, 3, 2)), (2, dict(GENERIC_NODE, SLURM_CPUS_PER_TASK="1"), (1, 2, 1)),
    (2, dict(GENERIC_NODE, SLURM_CPUS_PER_TASK="1", QML_CPUS_PER_TASK="3"), (1, 2, 3)),
    (2, dict(FRONTIER_NODE, SLURM_CPUS_PER_TASK="14"), (1, 2, 14)),
    (4, dict(GENERIC_NODE, SLURM_GPUS_ON_NODE="2", SLURM_JOB_NUM_NODES="2"), (2, 2, 4)),  # 2 GPUs a node
], ids=["frontier-8", "frontier-16", "frontier-packs", "cpu-spread", "cpu-share", "sbatch-c", "qml-wins",
        "frontier-sbatch-c", "gpus-per-node"])
def test_plan_step(tasks, env, expected):
    assert shape(tasks, env) == expected


@pytest.mark.parametrize("tasks, env, named", [
    (16, FRONTIER_NODE, "16 tasks need 2 nodes (8 tasks per node) but the job has 1: submit with 'sbatch -N 2"),
    (4, dict(GENERIC_NODE, SLURM_CPUS_PER_TASK="4"), "4 CPUs each, from sbatch --cpus-per-task"),
    (1, dict(GENERIC_NODE, QML_CPUS_PER_TASK="9"), "9 CPUs per task (QML_CPUS_PER_TASK) but a node has 8"),
    (1, dict(GENERIC_NODE, SLURM_GPUS_ON_NODE="1", QML_GPUS_PER_TASK="2"), "2 GPUs per task but a node has 1"),
])
def test_plan_step_refuses_what_the_job_cannot_hold(tasks, env, named):
    with pytest.raises(UsageError, match=named.replace("(", r"\(").replace(")", r"\)")):
        shape(tasks, env, "1,16")


def test_read_allocation_refuses_bad_settings():
    for name, value in (("QML_CPUS_PER_TASK", "0"), ("QML_GPUS_PER_TASK", "x"), ("QML_CPUS_PER_TASK", "2.5")):
        with pytest.raises(UsageError, match=f"{name} must be"):
            sweep.read_allocation(dict(GENERIC_NODE, **{name: value}))


@pytest.mark.parametrize("env, threads", [(GENERIC_NODE, "4"), (dict(GENERIC_NODE, OMP_NUM_THREADS="2"), "2"),
                                          (FRONTIER_NODE, "1"), (dict(FRONTIER_NODE, QML_CPUS_PER_TASK="7"), "7"),
                                          (dict(FRONTIER_NODE, SLURM_CPUS_PER_TASK="3"), "3")])
def test_omp_threads(env, threads):
    alloc = sweep.read_allocation(env)
    assert sweep.omp_threads(sweep.plan_step(2, alloc, "2"), alloc, env) == threads


def test_srun_command_of_frontier_and_elsewhere():
    frontier = sweep.read_allocation(dict(FRONTIER_NODE, SLURM_JOB_NUM_NODES="2"))
    assert sweep.srun_command(sweep.plan_step(16, frontier, "16"), frontier, ["python", "qml.py"]) == [
        "srun", "-n16", "-N2", "--ntasks-per-node=8", "-c7", "--kill-on-bad-exit=1", "--gpus-per-task=1",
        "--gpu-bind=closest", "--network=disable_rdzv_get", "python", "qml.py"]
    gpus = sweep.read_allocation(dict(GENERIC_NODE, SLURM_GPUS_ON_NODE="4"))
    assert sweep.srun_command(sweep.plan_step(2, gpus, "2"), gpus, ["p"]) == [
        "srun", "-n2", "-N1", "--ntasks-per-node=2", "-c4", "--kill-on-bad-exit=1", "--gpus-per-task=1", "p"]


def fake_lmod(tmp_path, stdout, status=0):
    lmod = tmp_path / "lmod"
    lmod.write_text(f"#!/bin/bash\ncat <<'PY'\n{stdout}\nPY\nexit {status}\n")
    lmod.chmod(0o755)
    return {"LMOD_CMD": str(lmod), "PATH": os.environ["PATH"]}


LMOD_LOADS = """import os
os.environ["NCCL_NET"] = "AWS Libfabric"
os.environ["LD_LIBRARY_PATH"] = "/opt/plugin/lib:/opt/cray/lib64"
os.environ["__LMOD_REF_COUNT_LD_LIBRARY_PATH"] = "/opt/plugin/lib:1;/opt/cray/lib64:1"
del os.environ["OLD_PLUGIN"]
_mlstatus = True"""


def test_lmod_load_reads_the_changes_without_running_them(tmp_path):
    changes = sweep.lmod_load("rccl-net-plugin", fake_lmod(tmp_path, LMOD_LOADS + '\nos.system("touch ran")'))
    assert changes == {"NCCL_NET": "AWS Libfabric", "LD_LIBRARY_PATH": "/opt/plugin/lib:/opt/cray/lib64",
                       "__LMOD_REF_COUNT_LD_LIBRARY_PATH": "/opt/plugin/lib:1;/opt/cray/lib64:1", "OLD_PLUGIN": None}
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("stdout, status", [("_mlstatus = False", 0), ("false", 0), (LMOD_LOADS, 1),
                                            ("not python (", 0)], ids=["status", "old-lmod", "exit", "garbage"])
def test_lmod_load_of_a_module_that_does_not_load_is_none(tmp_path, stdout, status):
    assert sweep.lmod_load("rccl-net-plugin", fake_lmod(tmp_path, stdout, status)) is None
    assert sweep.lmod_load("rccl-net-plugin", {}) is None  # no Lmod


def test_rccl_between_nodes_lets_yours_and_the_modules_values_win(tmp_path, capsys):
    env = dict(fake_lmod(tmp_path, LMOD_LOADS.replace("_mlstatus", 'os.environ["FI_CXI_RDZV_PROTO"] = "x"\n_mlstatus')),
               NCCL_CROSS_NIC="0")
    changes = sweep.rccl_between_nodes(env)
    assert (changes["FI_CXI_RDZV_PROTO"], changes["NCCL_NET_GDR_LEVEL"], changes["OLD_PLUGIN"]) == ("x", "PHB", None)
    assert "NCCL_CROSS_NIC" not in changes and capsys.readouterr().err == ""
    assert sweep.rccl_between_nodes({})["FI_CXI_RDZV_PROTO"] == "alt_read"
    assert "warning: no rccl-net-plugin module" in capsys.readouterr().err


def test_step_environment_drops_the_jobs_gpu_requests_and_keeps_the_plugin_to_multi_node_steps():
    env = dict(FRONTIER_NODE, SLURM_JOB_NUM_NODES="2", SLURM_GPUS_PER_TASK="2", SLURM_TRES_PER_TASK="gres/gpu:2",
               OLD_PLUGIN="1", HOME="/home/me")
    alloc, plugin = sweep.read_allocation(env), {"NCCL_NET": "AWS Libfabric", "OLD_PLUGIN": None}
    one, two = (sweep.step_environment(sweep.plan_step(n, alloc, "8,16"), alloc, env, plugin) for n in (8, 16))
    assert not {"SLURM_GPUS_PER_TASK", "SLURM_TRES_PER_TASK"} & (set(one) | set(two))
    assert (one.get("NCCL_NET"), one["OLD_PLUGIN"], one["HOME"]) == (None, "1", "/home/me")
    assert (two["NCCL_NET"], "OLD_PLUGIN" in two, two["OMP_NUM_THREADS"]) == ("AWS Libfabric", False, "1")


def test_the_launchers_options_for_the_docs_check():
    options = {option for option in sweep.get_args_parser()._option_string_actions if option.startswith("--")}
    assert options == {"--repeats", "--vary", "--continue"}


def test_a_missing_slurm_job_is_refused_in_one_line(capsys, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert sweep.main(["1"]) == 2
    assert capsys.readouterr().err.startswith("sweep.py: error: not inside a Slurm job")


def test_sweep_args_with_spaces_are_read_back_word_for_word(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = sweep.parse_sweep(["1", "--data-dir", "/my data/with space", "--vary", "lr=0.1,0.01"])
    sweep.record_sweep(os.path.join("runs", "9"), plan)
    assert sweep.find_rundir(plan, "9") == ("runs/9", True)
    with pytest.raises(UsageError):
        sweep.find_rundir(sweep.parse_sweep(["1", "--data-dir", "/my", "data/with space", "--vary", "lr=0.1,0.01"]),
                          "9")
