"""--global-batch-size and --lr-scaling: the per-rank batch and learning rate follow the world size, which
is known only after rank discovery; bad combinations end in one line before training; resume still works; and
the experiment stays the same whatever the number of ranks (with --bn-mode eval, where BatchNorm does not
normalise each rank's share of a step on its own)."""

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import QML, assert_ranks_agree, cpu_env, free_port, one_stderr_line

from machinery import command_line
import qml
from qml import validate_args

# Fast, CPU-only options (as tests/test_bad_input.py's).
BASE = ["--weights", "none", "--qdevice", "torch", "--workers", "0", "--print-freq", "0", "--epochs", "1",
        "--device", "cpu"]
HANG_GUARD = 300  # seconds: two ranks that take longer are stuck, not slow, even on a loaded 2-core machine


def options(*argv):
    """Parsed and validated options, as main() has them before rank discovery."""
    args = qml.get_args_parser().parse_args(["--qdevice", "torch", *argv])
    validate_args(args)
    return args


def resolved(world_size, *argv):
    args = options(*argv)
    qml.resolve_batch_and_lr(args, world_size, qml.DEFAULT_BATCH_SIZE, qml.REFERENCE_GLOBAL_BATCH)
    return args


def run_metrics(tmp_path, data, *extra):
    """Train one epoch in this process; returns the metrics JSON."""
    path = tmp_path / "metrics.json"
    assert qml.main(["--data-dir", data, *BASE, "--metrics-json", str(path), *extra]) == 0
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------
# Resolution for a world size


def test_default_is_the_tutorials_batch_of_4_per_rank_and_its_lr():
    args = resolved(3)
    assert (args.batch_size, args.lr) == (4, 0.0004)


def test_global_batch_size_gives_each_rank_its_share():
    assert resolved(4, "--global-batch-size", "16").batch_size == 4


def test_linear_scaling_multiplies_lr_by_the_global_batch_over_4():
    # 2 ranks x 4 images = 8 images per step: twice the tutorial's 4, so twice its lr
    assert resolved(2, "--lr-scaling", "linear").lr == pytest.approx(0.0008)


def test_linear_scaling_with_a_fixed_global_batch_keeps_lr_whatever_the_ranks():
    # 16 images per step is 4 times the tutorial's 4, on 1 rank as on 8
    lrs = [resolved(world, "--global-batch-size", "16", "--lr-scaling", "linear").lr for world in (1, 8)]
    assert lrs == pytest.approx([0.0016, 0.0016])


def test_no_lr_scaling_keeps_the_given_lr():
    assert resolved(8, "--lr", "0.001").lr == 0.001


def test_global_batch_size_that_does_not_divide_the_ranks_is_refused():
    args = options("--global-batch-size", "4")
    refusal = r"--global-batch-size 4 cannot be split evenly over 3 ranks; give a multiple of 3 \(e.g. 6\)"
    with pytest.raises(command_line.UsageError, match=refusal):
        qml.resolve_batch_and_lr(args, 3, qml.DEFAULT_BATCH_SIZE, qml.REFERENCE_GLOBAL_BATCH)


def test_global_batch_size_with_batch_size_is_refused():
    with pytest.raises(command_line.UsageError, match="--global-batch-size and --batch-size both set the batch size"):
        options("--global-batch-size", "8", "--batch-size", "2")


def test_lr_scaling_accepts_only_linear_or_none():
    with pytest.raises(command_line.UsageError, match="--lr-scaling"):
        options("--lr-scaling", "sqrt")


# ----------------------------------------------------------------------------
# Real runs


def test_metrics_record_the_batch_global_batch_and_lr_used(tiny_data, tmp_path):
    metrics = run_metrics(tmp_path, tiny_data, "--global-batch-size", "2", "--lr-scaling", "linear")
    # 2 images per step on one rank: half the tutorial's 4, so half its lr
    assert (metrics["batch_size"], metrics["global_batch_size"], metrics["lr"]) == (2, 2, pytest.approx(0.0002))


def test_metrics_of_a_default_run_record_the_tutorials_batch_and_lr(tiny_data, tmp_path):
    metrics = run_metrics(tmp_path, tiny_data)
    assert (metrics["batch_size"], metrics["global_batch_size"], metrics["lr"]) == (4, 4, 0.0004)


def test_global_batch_size_trains_with_its_per_rank_batch(tiny_data, tmp_path, capsys):
    # 12 training images in batches of 2 on one rank: 6 steps per epoch
    run_metrics(tmp_path, tiny_data, "--global-batch-size", "2", "--print-freq", "1")
    steps = re.findall(r"^Phase: train Epoch: 1/1 Iter: \d+/(\d+) ", capsys.readouterr().out, flags=re.M)
    assert set(steps) == {"6"}, steps


@pytest.fixture
def checkpoint(tiny_data, tmp_path):
    path = tmp_path / "run.pt"
    run_metrics(tmp_path, tiny_data, "--global-batch-size", "2", "--lr-scaling", "linear", "--checkpoint", str(path))
    return path


def test_resume_with_the_same_global_batch_continues(tiny_data, tmp_path, checkpoint):
    metrics = run_metrics(tmp_path, tiny_data, "--global-batch-size", "2", "--lr-scaling", "linear",
                          "--resume", str(checkpoint), "--epochs", "2")
    assert [record["epoch"] for record in metrics["epochs"]] == [1, 2]


def test_resume_with_another_global_batch_is_refused(capfd, tiny_data, checkpoint):
    status = qml.main(["--data-dir", tiny_data, *BASE, "--global-batch-size", "4", "--lr-scaling", "linear",
                       "--epochs", "2", "--resume", str(checkpoint)])
    line = one_stderr_line(capfd.readouterr().err)
    assert status == 2 and "checkpoint has batch_size=2 but this run batch_size=4" in line, line


def start_ranks(world, argv):
    """world processes of qml.py joined through RANK/WORLD_SIZE; returns [(stdout, stderr, status)]."""
    env = {k: v for k, v in cpu_env().items() if not k.startswith(("SLURM_", "PMI_", "OMPI_"))}
    env.update(WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, QML, *argv], env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in range(world)]
    try:
        return [proc.communicate(timeout=HANG_GUARD) + (proc.returncode,) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()


def test_two_ranks_refuse_a_global_batch_they_cannot_split_before_training(tiny_data):
    results = start_ranks(2, ["--data-dir", tiny_data, *BASE, "--global-batch-size", "3"])
    for stdout, stderr, status in results:
        assert status == 2, stderr
        assert "--global-batch-size 3 cannot be split evenly over 2 ranks" in one_stderr_line(stderr)
        assert "Training started" not in stdout, stdout


@pytest.fixture(scope="module")
def global_batch_8(tiny_data, tmp_path_factory):
    """{ranks: (metrics JSON, saved head)} of 2-epoch runs of 1 and of 2 ranks with --global-batch-size 8,
    --lr-scaling linear and --bn-mode eval."""
    runs = {}
    for world in (1, 2):
        out = tmp_path_factory.mktemp(f"global_batch_8_on_{world}")
        results = start_ranks(world, ["--data-dir", tiny_data, *BASE, "--epochs", "2", "--global-batch-size", "8",
                                      "--lr-scaling", "linear", "--bn-mode", "eval",
                                      "--metrics-json", str(out / "metrics.json"), "--save", str(out / "head.pt")])
        assert [status for _, _, status in results] == [0] * world, results
        saved = torch.load(out / "head.pt", weights_only=True)
        runs[world] = json.loads((out / "metrics.json").read_text()), saved["head"]
    return runs


def test_two_ranks_split_the_global_batch_and_scale_the_lr(global_batch_8):
    metrics, _ = global_batch_8[2]
    # 8 images per step over 2 ranks: 4 each; twice the tutorial's 4 images, so twice its lr
    assert (metrics["batch_size"], metrics["global_batch_size"], metrics["lr"]) == (4, 8, pytest.approx(0.0008))
    assert_ranks_agree(metrics)


def test_one_and_two_ranks_at_the_same_global_batch_give_the_same_metrics(global_batch_8):
    (one, _), (two, _) = global_batch_8[1], global_batch_8[2]
    assert (one["world_size"], one["batch_size"], two["world_size"], two["batch_size"]) == (1, 8, 2, 4)
    assert len(one["epochs"]) == len(two["epochs"]) == 2
    for alone, shared in zip(one["epochs"], two["epochs"], strict=True):
        for key in ("train_count", "val_count"):
            assert shared[key] == alone[key], key
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert shared[key] == pytest.approx(alone[key], rel=0, abs=1e-6), key
    for key in ("best_val_acc", "best_val_loss", "best_train_acc", "best_train_loss"):
        assert two[key] == pytest.approx(one[key], rel=0, abs=1e-6), key


def test_one_and_two_ranks_at_the_same_global_batch_train_the_same_head(global_batch_8):
    (_, alone), (_, shared) = global_batch_8[1], global_batch_8[2]
    assert set(alone) == set(shared)
    for name in alone:
        torch.testing.assert_close(shared[name], alone[name], rtol=0, atol=1e-6, msg=name)
