"""Rank discovery, device choice, and real multi-process runs (gloo on CPUs; torchrun, env launch, mpiexec)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from conftest import NO_GPUS, QML, ROOT, TINY_COUNTS, assert_ranks_agree, free_port

from machinery import command_line, process_group
import qml

N_VAL = sum(TINY_COUNTS["val"].values())  # 9: odd, so padding the validation split over 2 ranks would show
LAUNCHER_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "OMPI_", "MPI_", "HYDRA_", "TORCHELASTIC_")
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "QML_DATA_DIR")


# ----------------------------------------------------------------------------
# expand_nodelist


@pytest.mark.parametrize("nodelist, hosts", [
    ("frontier00012", ["frontier00012"]),
    ("login1,login2,dtn3", ["login1", "login2", "dtn3"]),
    ("frontier[00012-00014]", ["frontier00012", "frontier00013", "frontier00014"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("frontier[00012-00015,00020]", ["frontier00012", "frontier00013", "frontier00014", "frontier00015",
                                     "frontier00020"]),
    ("login1,frontier[01-02]", ["login1", "frontier01", "frontier02"]),
    ("a[1-2],b[05,07]", ["a1", "a2", "b05", "b07"]),
    ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
    ("x[098-101]", ["x098", "x099", "x100", "x101"]),
], ids=["single-host", "comma-list", "zero-padded-range", "unpadded-range", "range-and-single",
        "plain-and-bracket", "two-bracket-groups", "two-brackets-in-one-name", "padding-overflows"])
def test_expand_nodelist(nodelist, hosts):
    assert process_group.expand_nodelist(nodelist) == hosts


def test_expand_nodelist_without_python_hostlist_asks_scontrol(monkeypatch, tmp_path):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames rack[1-2]" ] && printf "rack1\\nrack2\\n"\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setitem(sys.modules, "hostlist", None)  # import hostlist raises ImportError
    assert process_group.expand_nodelist("rack[1-2]") == ["rack1", "rack2"]


def test_unreadable_nodelist_without_scontrol_is_a_usage_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol
    monkeypatch.setitem(sys.modules, "hostlist", None)
    with pytest.raises(command_line.UsageError, match="python-hostlist"):
        process_group.expand_nodelist("rack[1-2]")


# ----------------------------------------------------------------------------
# discover_ranks


def ranks(env):
    got = qml.discover_ranks(env)
    return {k: getattr(got, k) for k in ("rank", "world_size", "local_rank", "source", "master_addr", "master_port")}


def test_torchrun_variables_give_rank_world_and_master():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "1234"}
    assert ranks(env) == dict(rank=3, world_size=8, local_rank=1, source="torchrun", master_addr="node7",
                              master_port="1234")


def test_torchrun_inside_a_slurm_step_wins_over_slurm():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_JOB_ID": "77"}
    got = ranks(env)
    assert (got["rank"], got["world_size"], got["source"]) == (1, 2, "torchrun")


SRUN_STEP = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
             "SLURM_JOB_NODELIST": "frontier[00012-00015,00020]", "SLURM_JOB_ID": "1234567"}


def test_srun_step_gives_rank_world_and_local_rank():
    got = ranks(SRUN_STEP)
    assert (got["rank"], got["world_size"], got["local_rank"], got["source"]) == (5, 8, 1, "slurm")


def test_srun_step_master_is_the_first_node_of_the_compressed_nodelist():
    assert ranks(SRUN_STEP)["master_addr"] == "frontier00012"


def test_srun_step_master_port_is_derived_from_the_job_id():
    assert ranks(SRUN_STEP)["master_port"] == "24567"  # 10000 + 1234567 % 20000


def test_master_port_from_the_environment_wins_over_the_job_id():
    assert ranks(dict(SRUN_STEP, MASTER_PORT="31337"))["master_port"] == "31337"


def test_master_addr_that_is_a_node_of_the_step_wins_over_its_first_node():
    assert ranks(dict(SRUN_STEP, MASTER_ADDR="frontier00015"))["master_addr"] == "frontier00015"


def test_master_addr_given_as_the_address_of_a_step_node_is_kept(capsys):
    env = dict(SRUN_STEP, SLURM_PROCID="0", SLURM_STEP_NODELIST="localhost", MASTER_ADDR="127.0.0.1")
    assert ranks(env)["master_addr"] == "127.0.0.1"
    assert capsys.readouterr().err == ""


def test_master_addr_outside_the_step_is_ignored_with_a_warning_from_rank_0(capsys):
    # e.g. `export MASTER_ADDR=$(hostname -i)` on a login node, as OLCF's pages suggest, reaching the job
    assert ranks(dict(SRUN_STEP, SLURM_PROCID="0", MASTER_ADDR="login5"))["master_addr"] == "frontier00012"
    (line,) = capsys.readouterr().err.splitlines()
    assert "warning: MASTER_ADDR=login5 is none of this step's nodes" in line and "using frontier00012" in line


def test_master_addr_outside_the_step_is_ignored_quietly_by_the_other_ranks(capsys):
    assert ranks(dict(SRUN_STEP, MASTER_ADDR="login5"))["master_addr"] == "frontier00012"  # rank 5
    assert capsys.readouterr().err == ""


def test_srun_step_master_is_the_first_node_of_the_step_not_of_the_job():
    env = dict(SRUN_STEP, SLURM_STEP_NODELIST="frontier[00014-00015]")
    assert ranks(env)["master_addr"] == "frontier00014"


def test_plain_environment_is_one_process_on_localhost():
    assert ranks({}) == dict(rank=0, world_size=1, local_rank=0, source="single", master_addr="127.0.0.1",
                             master_port="29500")


def test_slurm_batch_script_without_a_step_is_one_process():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "frontier[00001-00004]"}
    got = ranks(env)
    assert (got["rank"], got["world_size"], got["source"]) == (0, 1, "single")


MPIEXEC_ENV = {"PMI_RANK": "1", "PMI_SIZE": "3", "MPI_LOCALRANKID": "1", "PMI_HOSTNAME": "vm"}


class _UnloadableMPI(types.ModuleType):
    """An mpi4py whose MPI library cannot be loaded: importing mpi4py.MPI raises RuntimeError."""

    def __getattr__(self, name):
        raise RuntimeError("cannot load MPI library")


@pytest.mark.parametrize("broken", ["absent", "unloadable"])
def test_mpiexec_without_usable_mpi4py_falls_back_to_one_process(monkeypatch, broken):
    monkeypatch.delitem(sys.modules, "mpi4py.MPI", raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py", None if broken == "absent" else _UnloadableMPI("mpi4py"))
    got = ranks(MPIEXEC_ENV)
    assert (got["rank"], got["world_size"], got["source"]) == (0, 1, "single")


def fake_mpi(rank, size, local_rank, root_host):
    """A stand-in mpi4py.MPI: COMM_WORLD with Get_rank/Get_size/bcast/Split_type, and COMM_TYPE_SHARED."""
    mpi = types.ModuleType("mpi4py.MPI")
    mpi.COMM_TYPE_SHARED = object()

    mpi.Is_initialized = lambda: True

    class Node:
        def Get_rank(self):
            return local_rank

    class World:
        def Get_rank(self):
            return rank

        def Get_size(self):
            return size

        def bcast(self, obj, root=0):
            assert root == 0
            return root_host  # what rank 0 sent

        def Split_type(self, split_type, *args, **kwargs):
            assert split_type is mpi.COMM_TYPE_SHARED
            return Node()

    mpi.COMM_WORLD = World()
    package = types.ModuleType("mpi4py")
    package.MPI = mpi
    return package, mpi


def test_mpiexec_takes_rank_size_and_master_from_mpi4py(monkeypatch):
    package, mpi = fake_mpi(rank=2, size=3, local_rank=1, root_host="node-of-rank0")
    monkeypatch.setitem(sys.modules, "mpi4py", package)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", mpi)
    assert ranks(MPIEXEC_ENV) == dict(rank=2, world_size=3, local_rank=1, source="mpi",
                                      master_addr="node-of-rank0", master_port="29500")


@pytest.mark.parametrize("env", [
    dict(MPIEXEC_ENV, MPI_LOCALNRANKS="3"),  # MPICH's Hydra, all ranks on this host
    dict(MPIEXEC_ENV, MPI_LOCALNRANKS="2", MASTER_ADDR="node-of-rank0"),  # several hosts, master given
    {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
     "OMPI_COMM_WORLD_LOCAL_SIZE": "3"},  # Open MPI
    {"PMI_RANK": "1", "PMI_SIZE": "3", "PMI_LOCAL_RANK": "1", "PMI_LOCAL_SIZE": "3"},  # Cray MPICH's PALS
], ids=["hydra-one-host", "hydra-master-given", "open-mpi", "cray-pals"])
def test_mpiexec_variables_give_the_ranks_without_initialising_mpi(monkeypatch, env):
    # MPI_Init before the decoding workers fork is what Cray MPICH must avoid: mpi4py must not be asked.
    monkeypatch.setitem(sys.modules, "mpi4py", _UnloadableMPI("mpi4py"))
    got = ranks(env)
    assert (got["rank"], got["world_size"], got["local_rank"], got["source"]) == (1, 3, 1, "mpi")
    assert got["master_addr"] == env.get("MASTER_ADDR", "127.0.0.1")


# Records the order in which mpi4py.MPI and torch are first imported when qml is imported.
IMPORT_ORDER = textwrap.dedent("""\
    import sys
    sys.path.insert(0, {root!r})
    order = []

    class Recorder:
        def find_spec(self, name, path=None, target=None):
            if name in ("torch", "mpi4py.MPI") and name not in order:
                order.append(name)
            return None

    sys.meta_path.insert(0, Recorder())
    import qml
    print(order, "mpi4py.MPI" in sys.modules and sys.modules["mpi4py.MPI"].Is_initialized())
""")


@pytest.mark.parametrize("launched", [True, False], ids=["under-mpiexec", "alone"])
def test_mpi4py_loads_before_torch_only_under_mpiexec_and_does_not_initialise_mpi(launched):
    env = launcher_free_env(**(MPIEXEC_ENV if launched else {}))
    probe = subprocess.run([sys.executable, "-c", IMPORT_ORDER.format(root=ROOT)], env=env, capture_output=True,
                           text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    expected = "['mpi4py.MPI', 'torch'] False" if launched else "['torch'] False"
    assert probe.stdout.strip() == expected


def test_mpi4py_is_not_consulted_without_mpi_launcher_variables(monkeypatch):
    package, mpi = fake_mpi(rank=2, size=3, local_rank=1, root_host="node-of-rank0")
    monkeypatch.setitem(sys.modules, "mpi4py", package)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", mpi)
    assert ranks({})["source"] == "single"


# ----------------------------------------------------------------------------
# pick_device

@pytest.fixture
def no_gpu(monkeypatch):
    """This process sees no GPU, whatever the machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_device_is_the_cpu_without_a_gpu(no_gpu):
    assert qml.pick_device("auto", 0) == torch.device("cpu")


def test_cuda_device_without_a_gpu_is_a_usage_error(no_gpu):
    with pytest.raises(command_line.UsageError, match="--device cuda"):
        qml.pick_device("cuda", 0)


def test_cpu_device_is_the_cpu():
    assert qml.pick_device("cpu", 0) == torch.device("cpu")


# ----------------------------------------------------------------------------
# Real runs with two processes (gloo on the CPU)

# Imports qml, records the dressed head and the buffers (BatchNorm statistics) of every rank after build_model and
# after train_model, then runs main.
WRAPPER = textwrap.dedent("""\
    import os, sys
    sys.path.insert(0, {root!r})
    import torch
    import qml

    out_dir, argv = sys.argv[1], sys.argv[2:]
    build_model, train_model = qml.build_model, qml.train_model

    def save_head(model, stage):
        rank = os.environ['RANK']
        torch.save(model.fc.state_dict(), os.path.join(out_dir, f"head-{{stage}}-rank{{rank}}.pt"))
        buffers = {{name: value.clone() for name, value in model.named_buffers()}}
        torch.save(buffers, os.path.join(out_dir, f"buffers-{{stage}}-rank{{rank}}.pt"))

    def recording_build_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        save_head(model, "init")
        return model

    def recording_train_model(*args, **kwargs):
        model, state, config = train_model(*args, **kwargs)
        save_head(model, "final")
        return model, state, config

    qml.build_model, qml.train_model = recording_build_model, recording_train_model
    sys.exit(qml.main(argv))
""")


def launcher_free_env(**extra):
    """os.environ without any launcher's variables or GPUs, one thread per rank (two ranks share two cores)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES) and k not in LAUNCHER_VARS}
    return dict(env, OMP_NUM_THREADS="1", **NO_GPUS, **extra)


def check(result, what):
    assert result.returncode == 0, f"{what} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"


def launch_by_env(script_argv, out_dir, world=2, timeout=240):
    """Start `world` ranks ourselves with RANK/WORLD_SIZE/MASTER_* (as any launcher would) and wait for all."""
    port = str(free_port())
    procs = []
    try:
        for rank in range(world):
            env = launcher_free_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                                    MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            log = open(os.path.join(out_dir, f"rank{rank}.log"), "w")
            procs.append((subprocess.Popen([sys.executable, *script_argv], stdout=log, stderr=subprocess.STDOUT,
                                           env=env, text=True), log))
        for rank, (proc, log) in enumerate(procs):
            proc.wait(timeout=timeout)
            log.close()
            with open(log.name) as file:
                check(subprocess.CompletedProcess(proc.args, proc.returncode, file.read(), ""), f"rank {rank}")
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


def run_args(data_dir, metrics, *extra):
    return ["--data-dir", data_dir, "--weights", "none", "--epochs", "2", "--print-freq", "0", "--workers", "0",
            "--metrics-json", str(metrics), *extra]


@pytest.fixture(scope="module")
def torchrun_run(tiny_data, tmp_path_factory):
    """`torchrun --nproc-per-node 2` of the wrapper, tutorial defaults: (metrics, output folder)."""
    out = tmp_path_factory.mktemp("torchrun")
    wrapper = out / "wrapper.py"
    wrapper.write_text(WRAPPER.format(root=ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(wrapper), str(out), *run_args(tiny_data, out / "metrics.json", "--time-split")]
    result = subprocess.run(command, capture_output=True, text=True, env=launcher_free_env(), timeout=300)
    check(result, "torchrun")
    return json.loads((out / "metrics.json").read_text()), out


def test_torchrun_run_reports_two_ranks(torchrun_run):
    metrics, _ = torchrun_run
    assert (metrics["world_size"], metrics["rank_source"], metrics["backend"]) == (2, "torchrun", "gloo")


def test_two_ranks_record_where_each_epochs_time_went(torchrun_run):
    metrics, _ = torchrun_run
    for epoch in metrics["epochs"]:
        split = epoch["time_split"]
        assert set(split) == {"data", "backbone", "head", "allreduce", "optimizer"}
        assert min(split.values()) >= 0 and sum(split.values()) <= epoch["seconds"]
        assert split["backbone"] > 0 and split["allreduce"] > 0  # the gradients of 2 ranks were summed


def test_two_ranks_record_where_they_ran(torchrun_run):
    metrics, _ = torchrun_run
    assert [(rank["rank"], rank["local_rank"]) for rank in metrics["ranks"]] == [(0, 0), (1, 1)]
    assert metrics["provenance"]["master"].rsplit(":", 1)[1].isdigit()


def test_two_ranks_count_every_validation_image_once(torchrun_run):
    metrics, _ = torchrun_run
    assert [e["val_count"] for e in metrics["epochs"]] == [N_VAL, N_VAL]


def test_two_ranks_start_from_the_same_head(torchrun_run):
    _, out = torchrun_run
    rank0, rank1 = (torch.load(out / f"head-init-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def test_two_ranks_end_with_identical_trained_heads(torchrun_run):
    _, out = torchrun_run
    init = torch.load(out / "head-init-rank0.pt", weights_only=True)
    rank0, rank1 = (torch.load(out / f"head-final-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert set(rank0) == set(rank1) == set(init)
    assert not all(torch.equal(rank0[k], init[k]) for k in init)  # training moved the head ...
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # ... in lockstep on both ranks


def test_two_ranks_end_with_the_same_batchnorm_statistics(torchrun_run):
    # DDP gives every rank rank 0's buffers at each training forward; each rank's last batch then moves its own,
    # so the ranks agree at the end only because the statistics are synchronised before validation.
    _, out = torchrun_run
    init = torch.load(out / "buffers-init-rank0.pt", weights_only=True)
    rank0, rank1 = (torch.load(out / f"buffers-final-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert set(rank0) == set(rank1) == set(init) and any(name.endswith("running_mean") for name in init)
    assert not all(torch.equal(rank0[k], init[k]) for k in init)  # training (--bn-mode train) moved them ...
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # ... to the same values on both ranks


def test_two_ranks_record_the_backend_their_group_runs(torchrun_run):
    metrics, _ = torchrun_run
    assert metrics["provenance"]["group_backends"] == {"cpu": "gloo"}


@pytest.fixture(scope="module")
def uncached_run(tiny_data, tmp_path_factory):
    """torchrun_run's two ranks with --image-cache off, launched through RANK/WORLD_SIZE: (metrics, output folder)."""
    out = tmp_path_factory.mktemp("uncached")
    wrapper = out / "wrapper.py"
    wrapper.write_text(WRAPPER.format(root=ROOT))
    launch_by_env([str(wrapper), str(out), *run_args(tiny_data, out / "metrics.json", "--time-split",
                                                     "--image-cache", "off")], out)
    return json.loads((out / "metrics.json").read_text()), out


def test_two_ranks_give_the_same_metrics_with_the_image_cache_on_and_off(torchrun_run, uncached_run):
    keys = ("train_loss", "train_acc", "train_count", "val_loss", "val_acc", "val_count")
    cached, uncached = torchrun_run[0]["epochs"], uncached_run[0]["epochs"]
    assert [{k: e[k] for k in keys} for e in cached] == [{k: e[k] for k in keys} for e in uncached]


def test_two_ranks_train_the_same_heads_with_the_image_cache_on_and_off(torchrun_run, uncached_run):
    for rank in (0, 1):
        cached, uncached = (torch.load(out / f"head-final-rank{rank}.pt", weights_only=True)
                            for out in (torchrun_run[1], uncached_run[1]))
        assert all(torch.equal(cached[name], uncached[name]) for name in cached), rank


def test_each_of_two_ranks_decodes_only_the_images_it_has_not_seen_and_keeps_them(torchrun_run):
    # Each rank's shuffled share of the training images, from torch's own sampler; validation shards are fixed.
    n_train = sum(TINY_COUNTS["train"].values())
    seen, expected = [set(), set()], []
    for epoch in range(2):
        decoded = 0 if epoch else N_VAL
        for rank in (0, 1):
            sampler = torch.utils.data.DistributedSampler(range(n_train), num_replicas=2, rank=rank, seed=0)
            sampler.set_epoch(epoch)
            decoded += len(set(sampler) - seen[rank])
            seen[rank] |= set(sampler)
        expected.append((decoded, len(seen[0]) + len(seen[1]) + N_VAL))
    assert expected[1][0] < n_train  # the second epoch's shuffle gave the ranks some images they had seen
    assert [(e["images_decoded"], e["images_kept"]) for e in torchrun_run[0]["epochs"]] == expected


# Lightning's cached import tracebacks keep train_model's frame alive. A DDP wrapper left to interpreter exit
# takes gloo's threads down during finalization, which now and then aborts a rank; the collector is off so that
# only qml's own cleanup can free it.
DDP_COUNTER = textwrap.dedent("""\
    import gc, sys
    gc.disable()
    sys.path.insert(0, {root!r})
    import qml
    from torch.nn.parallel import DistributedDataParallel

    status = qml.main(sys.argv[1:])
    print("DDP wrappers alive after main:", sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects()))
    sys.exit(status)
""")


def write_ddp_counter(folder):
    counter = folder / "count_ddp.py"
    counter.write_text(DDP_COUNTER.format(root=ROOT))
    return counter


@pytest.fixture(scope="module")
def eval_bn_runs(tiny_data, tmp_path_factory):
    """Two 2-rank runs with --bn-mode eval, launched through RANK/WORLD_SIZE: {"images": (metrics, output folder),
    "cached": ...}. The run of images goes through DDP_COUNTER, whose ranks' logs say how many DDP wrappers
    outlived qml.main."""
    runs = {}
    for name, extra in (("images", []), ("cached", ["--cache-features"])):
        out = tmp_path_factory.mktemp(name)
        script = [str(write_ddp_counter(out))] if name == "images" else [QML]
        launch_by_env([*script, *run_args(tiny_data, out / "metrics.json", "--bn-mode", "eval", *extra)], out)
        runs[name] = json.loads((out / "metrics.json").read_text()), out
    return runs


def test_cached_features_give_the_same_metrics_as_images_on_two_ranks(eval_bn_runs):
    (images, _), (cached, _) = eval_bn_runs["images"], eval_bn_runs["cached"]
    assert images["world_size"] == cached["world_size"] == 2
    assert len(images["epochs"]) == len(cached["epochs"]) == 2
    for from_images, from_cache in zip(images["epochs"], cached["epochs"], strict=True):
        for key in ("train_count", "val_count"):
            assert from_cache[key] == from_images[key], key
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert from_cache[key] == pytest.approx(from_images[key], abs=1e-5), key


def test_two_ranks_free_the_ddp_wrapper_before_python_exits(eval_bn_runs):
    _, out = eval_bn_runs["images"]
    for rank in (0, 1):
        assert "DDP wrappers alive after main: 0" in (out / f"rank{rank}.log").read_text(), rank


# ----------------------------------------------------------------------------
# mpiexec (the tutorial's launcher): mpich's wheel puts mpiexec beside the venv's python

MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable))


NO_MPIEXEC = None if MPIEXEC else "no mpiexec beside this Python (pip install mpich)"


@pytest.fixture(scope="module")
def mpiexec_run(tiny_data, tmp_path_factory):
    """`mpiexec -n 2 python qml.py`, one epoch: the metrics JSON."""
    if NO_MPIEXEC:
        pytest.skip(NO_MPIEXEC)  # the tests that use this run carry needs(NO_MPIEXEC), which fails under CI=true
    metrics = tmp_path_factory.mktemp("mpiexec") / "metrics.json"
    command = [MPIEXEC, "-n", "2", sys.executable, QML, "--data-dir", tiny_data, "--weights", "none",
               "--epochs", "1", "--print-freq", "0", "--workers", "0", "--metrics-json", str(metrics)]
    env = launcher_free_env(MASTER_PORT=str(free_port()))  # a port of our own; the address comes from MPI
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    check(result, "mpiexec")
    return json.loads(metrics.read_text())


@pytest.mark.needs(NO_MPIEXEC)
def test_mpiexec_run_takes_its_ranks_from_mpi(mpiexec_run):
    assert (mpiexec_run["world_size"], mpiexec_run["rank_source"]) == (2, "mpi")
    assert mpiexec_run["epochs"][0]["val_count"] == N_VAL


# ----------------------------------------------------------------------------
# Every two-rank run: the ranks end in step


@pytest.mark.parametrize("run", ["torchrun_run", "uncached_run", "eval_bn_runs:images", "eval_bn_runs:cached",
                                 pytest.param("mpiexec_run", marks=pytest.mark.needs(NO_MPIEXEC))])
def test_every_rank_of_a_two_rank_run_ends_with_the_same_head_and_buffers(request, run):
    fixture, _, name = run.partition(":")
    found = request.getfixturevalue(fixture)
    found = found[name] if name else found
    metrics = found[0] if isinstance(found, tuple) else found  # (metrics, output folder) or metrics
    assert metrics["world_size"] == 2
    assert_ranks_agree(metrics)
