"""Bad input ends with exit status 2 and one stderr line naming the problem and the fix; odd but valid
images (any mode, any size, stray non-image files beside them) are trained on.

Most cases call qml.main() in this process (fast); the SUBPROCESS_CASES run qml.py as a real process,
since "no traceback" is a property of the process.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import QML, cpu_env, make_image_folder, one_stderr_line, start_ranks
from PIL import Image

import qml

# Fast, CPU-only options; cases override what they test (argparse keeps the last value).
BASE = ["--weights", "none", "--qdevice", "torch", "--workers", "0", "--print-freq", "0", "--epochs", "1",
        "--device", "cpu"]
HANG_GUARD = 300  # seconds: a bad-input run that takes longer is stuck, not slow, even on a loaded 2-core machine


def error_line(stderr):
    """The single stderr line (no traceback), which must be qml.py's error line."""
    line = one_stderr_line(stderr)
    assert line.startswith("qml.py: error: "), stderr
    return line


def main_error(capfd, argv):
    """Run qml.main(argv) in this process; assert status 2 and return its one stderr line."""
    status = qml.main(argv)
    stderr = capfd.readouterr().err
    assert status == 2, stderr
    return error_line(stderr)


def assert_mentions(line, *parts):
    for part in parts:
        assert part in line, f"{part!r} not in {line!r}"


@pytest.fixture
def data(tiny_data, tmp_path):
    """A private copy of the tiny data set that a test may break."""
    return shutil.copytree(tiny_data, tmp_path / "data")


# ----------------------------------------------------------------------------
# Options


OPTION_CASES = [
    ("n-qubits-0", ["--n-qubits", "0"], ["--n-qubits", "positive"]),
    ("n-qubits-negative", ["--n-qubits", "-3"], ["--n-qubits", "positive"]),
    ("n-qubits-31", ["--n-qubits", "31"], ["--n-qubits", "1..30"]),
    ("n-qubits-not-a-number", ["--n-qubits", "four"], ["--n-qubits", "'four'"]),
    ("q-depth-0", ["--q-depth", "0"], ["--q-depth", "positive"]),
    ("batch-size-0", ["--batch-size", "0"], ["--batch-size", "positive"]),
    ("batch-size-negative", ["--batch-size", "-4"], ["--batch-size", "positive"]),
    ("epochs-0", ["--epochs", "0"], ["--epochs", "positive"]),
    ("lr-0", ["--lr", "0"], ["--lr", "positive"]),
    ("lr-negative", ["--lr", "-0.001"], ["--lr", "positive"]),
    ("lr-nan", ["--lr", "nan"], ["--lr", "positive"]),
    ("q-delta-0", ["--q-delta", "0"], ["--q-delta", "positive"]),
    ("gamma-0", ["--gamma", "0"], ["--gamma", "positive"]),
    ("gamma-negative", ["--gamma", "-0.1"], ["--gamma", "positive"]),
    ("lr-inf", ["--lr", "inf"], ["--lr", "positive and finite"]),
    ("q-delta-inf", ["--q-delta", "inf"], ["--q-delta", "positive and finite"]),
    ("dist-timeout-0", ["--dist-timeout", "0"], ["--dist-timeout", "1..2147483"]),
    ("dist-timeout-25-days", ["--dist-timeout", "2160000"], ["--dist-timeout", "1..2147483"]),
    ("seed-negative", ["--seed", "-1"], ["--seed", "0..4294967295"]),
    ("seed-2**32", ["--seed", "4294967296"], ["--seed", "0..4294967295"]),
    ("seed-not-a-number", ["--seed", "abc"], ["--seed", "'abc'"]),
    ("shuffle-seed-negative", ["--shuffle-seed", "-1"], ["--shuffle-seed", "0..4294967295"]),
    ("shuffle-seed-2**32", ["--shuffle-seed", "4294967296"], ["--shuffle-seed", "0..4294967295"]),
    ("print-freq-negative", ["--print-freq", "-1"], ["--print-freq", "0 or more"]),
    ("workers-negative", ["--workers", "-1"], ["--workers", "0 or more"]),
    ("unknown-option", ["--n-qbits", "4"], ["--n-qbits", "--help"]),
    ("unknown-qdevice", ["--qdevice", "lightning.nosuch"],
     ["--qdevice lightning.nosuch", "not installed", "default.qubit", "lightning.qubit", "torch"]),
    ("backend-nccl-on-cpu", ["--backend", "nccl"], ["--backend nccl", "GPU", "--backend gloo"]),
    ("cache-features-with-batch-statistics", ["--cache-features", "--bn-mode", "train"],
     ["--cache-features", "--bn-mode eval"]),
    ("image-cache-negative", ["--image-cache", "-1"], ["--image-cache", "auto, off or a number of MiB"]),
    ("image-cache-word", ["--image-cache", "lots"], ["--image-cache", "auto, off or a number of MiB", "'lots'"]),
    ("precision-fp16-on-cpu", ["--precision", "fp16"], ["--precision fp16", "GPU", "--precision bf16"]),
]


@pytest.mark.parametrize("extra, expected", [case[1:] for case in OPTION_CASES],
                         ids=[case[0] for case in OPTION_CASES])
def test_bad_option_exits_2_with_one_line(capfd, data, extra, expected):
    line = main_error(capfd, ["--data-dir", str(data), *BASE, *extra])
    assert_mentions(line, *expected)


def test_bad_number_is_refused_before_the_data_is_looked_at(capfd, tmp_path):
    line = main_error(capfd, ["--data-dir", str(tmp_path / "nowhere"), *BASE, "--seed", "4294967296"])
    assert_mentions(line, "--seed", "0..4294967295")


def test_largest_accepted_seeds_seed_numpy_torch_and_the_sampler():
    args = qml.get_args_parser().parse_args(["--seed", "4294967295", "--shuffle-seed", "4294967295"])
    assert (args.seed, args.shuffle_seed) == (2**32 - 1, 2**32 - 1)  # kept as given; each call below raises if refused
    np.random.RandomState(args.seed)  # checks its seed as np.random.seed does, without touching the global state
    torch.Generator().manual_seed(args.seed)
    torch.Generator().manual_seed(args.shuffle_seed + 10**6)  # DistributedSampler seeds shuffle_seed + epoch


def test_device_cuda_without_gpu_exits_2_with_one_line(capfd, data, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = main_error(capfd, ["--data-dir", str(data), *BASE, "--device", "cuda"])
    assert_mentions(line, "--device cuda", "no GPU", "--device cpu")


def test_backend_nccl_with_auto_device_and_no_gpu_exits_2_with_one_line(capfd, data, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = main_error(capfd, ["--data-dir", str(data), *BASE, "--device", "auto", "--backend", "nccl"])
    assert_mentions(line, "--backend nccl", "needs a GPU", "--backend gloo")


# ----------------------------------------------------------------------------
# --weights PATH


class RunsCodeWhenUnpickled:
    """A pickle that creates `marker` when loaded without weights_only=True."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def weights_file(kind, tmp_path):
    path = tmp_path / f"{kind}.pt"
    if kind == "not-a-state-dict":
        torch.save({"weight": torch.zeros(3)}, path)
    elif kind == "other-resnet18-head":  # right keys, but a 10-class fc
        import torchvision

        torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    elif kind == "a-tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "garbage-bytes":
        path.write_bytes(b"this is not a torch file\n" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "pickle-running-code":
        torch.save(RunsCodeWhenUnpickled(tmp_path / "ran"), path)
    return path


WEIGHT_CASES = [
    ("not-a-state-dict", "not a ResNet18 state_dict"),
    ("other-resnet18-head", "not a ResNet18 state_dict"),
    ("a-tensor", "not a ResNet18 state_dict"),
    ("garbage-bytes", "cannot read it"),
    ("empty", "cannot read it"),
    ("pickle-running-code", "cannot read it"),
]


@pytest.mark.parametrize("kind, expected", WEIGHT_CASES, ids=[case[0] for case in WEIGHT_CASES])
def test_weights_file_that_is_not_resnet18_exits_2_with_one_line(capfd, data, tmp_path, kind, expected):
    path = weights_file(kind, tmp_path)
    line = main_error(capfd, ["--data-dir", str(data), *BASE, "--weights", str(path)])
    assert_mentions(line, f"--weights {path}", expected, "torch.save")


def test_weights_file_is_loaded_without_running_its_code(capfd, data, tmp_path):
    path = weights_file("pickle-running-code", tmp_path)
    main_error(capfd, ["--data-dir", str(data), *BASE, "--weights", str(path)])
    assert not (tmp_path / "ran").exists()


def test_missing_weights_file_exits_2_with_one_line(capfd, data, tmp_path):
    line = main_error(capfd, ["--data-dir", str(data), *BASE, "--weights", str(tmp_path / "nowhere.pth")])
    assert_mentions(line, "nowhere.pth", "no such file", "'imagenet' or 'none'")


# ----------------------------------------------------------------------------
# The data directory


def remove(path):
    shutil.rmtree(path)


def break_data(case, root):
    """Damage the data set at `root` as `case` says; returns the path the message must name, if any."""
    train, val = root / "train", root / "val"
    if case == "missing-train":
        remove(train)
    elif case == "missing-val":
        remove(val)
    elif case == "empty-class-folder":
        (train / "wasps").mkdir()
        return str(train / "wasps")
    elif case == "class-folder-with-only-stray-files":
        (train / "wasps").mkdir()
        (train / "wasps" / "notes.txt").write_text("not an image")
        (train / "wasps" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        return str(train / "wasps")
    elif case == "different-classes":
        (val / "bees").rename(val / "wasps")
    elif case == "one-class":
        remove(train / "bees")
        remove(val / "bees")
    elif case == "no-class":
        for split in (train, val):
            for folder in split.iterdir():
                remove(folder)
    elif case == "text-named-jpg":
        (train / "ants" / "broken.jpg").write_text("this is not a JPEG")
        return str(train / "ants" / "broken.jpg")
    elif case == "empty-file":
        (val / "bees" / "empty.png").write_bytes(b"")
        return str(val / "bees" / "empty.png")
    elif case == "truncated-jpeg":  # header intact: PIL opens it and verify() passes; decoding fails
        whole = (train / "bees" / "0.jpg").read_bytes()
        (train / "bees" / "truncated.jpg").write_bytes(whole[: len(whole) * 7 // 10])
        return str(train / "bees" / "truncated.jpg")
    elif case == "macos-resource-fork":  # ImageFolder loads hidden files too
        (train / "ants" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
        return str(train / "ants" / "._0.jpg")
    elif case == "image-in-subfolder-broken":  # ImageFolder walks sub-folders of a class
        (val / "ants" / "more").mkdir()
        (val / "ants" / "more" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
        return str(val / "ants" / "more" / "bad.png")
    return None


DATA_CASES = [
    ("missing-train", ["no train/ folder", "train/ and val/"]),
    ("missing-val", ["no val/ folder", "train/ and val/"]),
    ("empty-class-folder", ["has no images", "add images or remove the folder"]),
    ("class-folder-with-only-stray-files", ["has no images", "add images or remove the folder"]),
    ("different-classes", ["different classes", "ants, bees vs ants, wasps", "same class folders"]),
    ("one-class", ["1 class folder", "at least 2"]),
    ("no-class", ["0 class folder", "at least 2"]),
    ("text-named-jpg", ["not a readable image", "delete or replace it"]),
    ("empty-file", ["not a readable image", "delete or replace it"]),
    ("truncated-jpeg", ["not a readable image", "delete or replace it"]),
    ("macos-resource-fork", ["not a readable image", "delete or replace it"]),
    ("image-in-subfolder-broken", ["not a readable image", "delete or replace it"]),
]


@pytest.mark.parametrize("case, expected", DATA_CASES, ids=[case[0] for case in DATA_CASES])
def test_bad_data_directory_exits_2_with_one_line(capfd, data, case, expected):
    named = break_data(case, data)
    line = main_error(capfd, ["--data-dir", str(data), *BASE])
    assert_mentions(line, *expected, *([named] if named else []))


SMALL_COUNTS = {"train": {"ants": 2, "bees": 2}, "val": {"ants": 1, "bees": 1}}


def test_three_unreadable_images_are_all_named_in_one_line(capfd, tmp_path):
    data = make_image_folder(tmp_path / "data", SMALL_COUNTS)
    broken = [os.path.join(data, "train", "ants", "empty.png"), os.path.join(data, "train", "ants", "text.jpg"),
              os.path.join(data, "val", "bees", "truncated.jpg")]  # in the check's order: two in one folder
    open(broken[0], "wb").close()
    with open(broken[1], "w") as file:
        file.write("this is not a JPEG")
    with open(os.path.join(data, "val", "bees", "0.jpg"), "rb") as file:
        whole = file.read()
    with open(broken[2], "wb") as file:  # header intact: only a full decode finds it
        file.write(whole[: len(whole) * 7 // 10])
    line = main_error(capfd, ["--data-dir", data, *BASE])
    assert_mentions(line, f"3 files are not readable images: {', '.join(broken)}; delete or replace them")
    assert "more" not in line


def test_thirteen_unreadable_images_name_the_first_ten_and_count_the_rest(capfd, tmp_path):
    data = make_image_folder(tmp_path / "data", SMALL_COUNTS)
    broken = [os.path.join(data, "val", "ants", f"bad{i:02}.jpg") for i in range(13)]
    for path in broken:
        with open(path, "w") as file:
            file.write("this is not a JPEG")
    line = main_error(capfd, ["--data-dir", data, *BASE])
    assert_mentions(line, f"13 files are not readable images: {', '.join(broken[:10])} ... and 3 more; "
                          f"delete or replace them")
    for path in broken[10:]:
        assert path not in line


def test_missing_data_directory_exits_2_with_one_line(capfd, tmp_path):
    line = main_error(capfd, ["--data-dir", str(tmp_path / "nowhere"), *BASE])
    assert_mentions(line, str(tmp_path / "nowhere"), "not found", "--data-dir DIR", "--download")


def run_ranks(world, *argv):
    """qml.py as `world` ranks of one gloo run on this host; returns [(stdout, stderr, status)] by rank."""
    procs = start_ranks(world, [*argv, "--dist-timeout", "30"])
    try:
        return [proc.communicate(timeout=HANG_GUARD) + (proc.returncode,) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()


def test_more_ranks_than_training_images_exit_2_with_one_line_each(tmp_path):
    data = make_image_folder(tmp_path / "two", {"train": {"ants": 1, "bees": 1}, "val": {"ants": 1, "bees": 1}})
    for _, stderr, status in run_ranks(3, "--data-dir", data, *BASE):
        assert status == 2, stderr
        assert_mentions(error_line(stderr), "3 ranks", "only 2 training images", "at most 2 tasks")


# ----------------------------------------------------------------------------
# Output paths: checked at start-up, not after the last epoch

OUTPUT_OPTIONS = ("--save", "--metrics-json", "--checkpoint")


def output_error(capfd, argv):
    """Run qml.main(argv); assert status 2 before training started; return its one stderr line."""
    status = qml.main(argv)
    out, err = capfd.readouterr()
    assert status == 2, err
    assert "Training started" not in out
    return error_line(err)


@pytest.mark.parametrize("option", OUTPUT_OPTIONS)
def test_output_path_under_a_regular_file_exits_2_with_one_line_before_training(capfd, tiny_data, tmp_path, option):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    path = tmp_path / "notes.txt" / "run" / "out"
    line = output_error(capfd, ["--data-dir", tiny_data, *BASE, option, str(path)])
    assert_mentions(line, f"{option} {path}", "a file is in the way", "writable folder")


def test_unwritable_output_path_stops_every_rank_with_one_line(tiny_data, tmp_path):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    path = tmp_path / "notes.txt" / "metrics.json"
    for stdout, stderr, status in run_ranks(2, "--data-dir", tiny_data, *BASE, "--metrics-json", path):
        assert status == 2, stderr
        assert "Training started" not in stdout
        assert_mentions(error_line(stderr), f"--metrics-json {path}", "a file is in the way")


def test_output_path_that_is_a_folder_exits_2_with_one_line_before_training(capfd, tiny_data, tmp_path):
    line = output_error(capfd, ["--data-dir", tiny_data, *BASE, "--save", str(tmp_path)])
    assert_mentions(line, f"--save {tmp_path} is a folder", "file path")


# mount -t tmpfs -o OPTIONS tmpfs FOLDER, fill it with FILL bytes, then run the command that follows.
ON_TMPFS = 'mount -t tmpfs -o "$1" tmpfs "$2" && { [ "$3" -eq 0 ] || head -c "$3" /dev/zero > "$2/filler"; } ' \
           '&& shift 3 && exec "$@"'


@pytest.fixture(scope="module")
def private_mounts(tmp_path_factory):
    """Skip (fail under CI=true) unless this process may mount a tmpfs in a private mount namespace (root)."""
    if shutil.which("unshare") is None:
        reason = "unshare is not installed"
    else:
        result = subprocess.run(["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o ro tmpfs "$1"', "sh",
                                 tmp_path_factory.mktemp("mount-check")], capture_output=True, text=True)
        reason = result.returncode != 0 and f"unshare -m, then mount: {result.stderr.strip()}"
    if reason and os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"cannot test read-only and full disks: {reason} (CI=true: these tests must run)")
    if reason:
        pytest.skip(f"cannot test read-only and full disks: {reason} (needs root)")


def run_on_tmpfs(folder, mount_options, fill, *qml_args):
    """qml.py in a private mount namespace where `folder` is a new tmpfs, `fill` bytes of it taken."""
    command = ["unshare", "-m", "sh", "-c", ON_TMPFS, "sh", mount_options, folder, str(fill), sys.executable, QML,
               *qml_args]
    return subprocess.run(command, capture_output=True, text=True, timeout=HANG_GUARD)


def test_output_path_on_a_read_only_mount_exits_2_with_one_line_before_training(private_mounts, tiny_data, tmp_path):
    path = tmp_path / "run.pt"
    result = run_on_tmpfs(tmp_path, "ro", 0, "--data-dir", tiny_data, *BASE, "--checkpoint", path)
    assert result.returncode == 2, result.stderr
    assert "Training started" not in result.stdout
    assert_mentions(error_line(result.stderr), f"--checkpoint {path}", "Read-only file system", "writable folder")


def test_output_path_on_a_full_disk_exits_2_with_one_line_before_training(private_mounts, tiny_data, tmp_path):
    path = tmp_path / "metrics.json"
    result = run_on_tmpfs(tmp_path, "size=4k", 4096, "--data-dir", tiny_data, *BASE, "--metrics-json", path)
    assert result.returncode == 2, result.stderr
    assert "Training started" not in result.stdout
    assert_mentions(error_line(result.stderr), f"--metrics-json {path}", "No space left on device")


# ----------------------------------------------------------------------------
# --resume with a checkpoint of another configuration


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory):
    """A checkpoint after one epoch of the BASE configuration on the tiny data."""
    path = tmp_path_factory.mktemp("ckpt") / "run.pt"
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert qml.main(["--data-dir", tiny_data, *BASE, "--checkpoint", str(path)]) == 0
    finally:
        signal.signal(signal.SIGTERM, handler)
    return path


@pytest.mark.parametrize("extra, key", [
    (["--lr", "0.001"], "lr=0.001"),
    (["--n-qubits", "3"], "n_qubits=3"),
    (["--q-depth", "2"], "q_depth=2"),
    (["--seed", "7"], "seed=7"),
    (["--batch-size", "2"], "batch_size=2"),
    (["--bn-mode", "eval"], "bn_mode='eval'"),
    (["--head", "classical"], "head='classical'"),
], ids=["lr", "n-qubits", "q-depth", "seed", "batch-size", "bn-mode", "head"])
def test_resume_from_other_configuration_exits_2_with_one_line(capfd, tiny_data, checkpoint, extra, key):
    line = main_error(capfd, ["--data-dir", tiny_data, *BASE, "--epochs", "2", "--resume", str(checkpoint), *extra])
    assert_mentions(line, f"--resume {checkpoint}", key, "drop --resume")


def test_resume_on_data_with_other_classes_exits_2_with_one_line(capfd, tmp_path, checkpoint):
    data = make_image_folder(tmp_path / "cats", {"train": {"cats": 2, "dogs": 2}, "val": {"cats": 1, "dogs": 1}})
    line = main_error(capfd, ["--data-dir", data, *BASE, "--epochs", "2", "--resume", str(checkpoint)])
    assert_mentions(line, "classes=['ants', 'bees']", "classes=['cats', 'dogs']")


@pytest.mark.parametrize("kind, expected", [
    ("missing", "no such file"),
    ("garbage-bytes", "not a readable qml.py checkpoint"),
    ("a-state-dict", "not a readable qml.py checkpoint"),
    ("pickle-running-code", "not a readable qml.py checkpoint"),
], ids=["missing", "garbage-bytes", "a-state-dict", "pickle-running-code"])
def test_resume_from_a_file_that_is_not_a_checkpoint_exits_2_with_one_line(capfd, data, tmp_path, kind, expected):
    path = tmp_path / "resume.pt"
    if kind == "garbage-bytes":
        path.write_bytes(b"PK\x03\x04 not really" * 5)
    elif kind == "a-state-dict":
        torch.save({"weight": torch.zeros(2)}, path)
    elif kind == "pickle-running-code":
        torch.save(RunsCodeWhenUnpickled(tmp_path / "ran"), path)
    line = main_error(capfd, ["--data-dir", str(data), *BASE, "--resume", str(path)])
    assert_mentions(line, f"--resume {path}", expected, "--checkpoint")
    assert not (tmp_path / "ran").exists()


# ----------------------------------------------------------------------------
# Real processes: no traceback and one line, whatever the process prints


SUBPROCESS_CASES = {
    "missing-data-dir": (["--data-dir", "{tmp}/nowhere"], ["not found", "--data-dir DIR"]),
    "undecodable-image": (["--data-dir", "{broken}"], ["broken.jpg", "not a readable image"]),
}


@pytest.fixture(scope="module")
def launched(tiny_data, tmp_path_factory):
    """Start all SUBPROCESS_CASES at once (each mostly waits on imports): {case: Popen}."""
    tmp = tmp_path_factory.mktemp("procs")
    broken = shutil.copytree(tiny_data, tmp / "broken")
    (broken / "val" / "bees" / "broken.jpg").write_bytes(b"not a JPEG at all")
    procs = {}
    for case, (extra, _) in SUBPROCESS_CASES.items():
        argv = [arg.format(tmp=tmp, broken=broken) for arg in ["--data-dir", tiny_data, *BASE, *extra]]
        procs[case] = subprocess.Popen([sys.executable, QML, *argv], env=cpu_env(), text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    yield procs
    for proc in procs.values():
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_process_exits_2_with_one_line_and_no_traceback(launched, case):
    _, stderr = launched[case].communicate(timeout=HANG_GUARD)
    assert launched[case].returncode == 2, stderr
    assert_mentions(error_line(stderr), *SUBPROCESS_CASES[case][1])


# ----------------------------------------------------------------------------
# Valid but unusual input is used, not refused


def train_counts(capfd, data, tmp_path):
    """Train one epoch in this process; returns (train images, val images) as counted by the run."""
    metrics = tmp_path / "metrics.json"
    status = qml.main(["--data-dir", str(data), *BASE, "--metrics-json", str(metrics)])
    stderr = capfd.readouterr().err
    assert status == 0, stderr
    epoch = json.loads(metrics.read_text())["epochs"][0]
    return epoch["train_count"], epoch["val_count"]


def test_stray_non_image_files_are_ignored(capfd, data, tmp_path):
    for folder in (data, data / "train", data / "val", data / "train" / "ants", data / "val" / "bees"):
        (folder / "notes.txt").write_text("labels checked by hand")
        (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1\0")
        (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    assert train_counts(capfd, data, tmp_path) == (12, 9)


def odd_image(kind, rng):
    """(PIL image, file suffix) of one unusual-but-valid kind."""
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    if kind == "grayscale-L":
        return Image.fromarray(rgb[..., 0]), ".jpg"
    if kind == "RGBA":
        return Image.fromarray(np.dstack([rgb, rgb[..., :1]])), ".png"
    if kind == "palette-P":
        return Image.fromarray(rgb).convert("P"), ".png"
    if kind == "CMYK":
        return Image.fromarray(rgb).convert("CMYK"), ".jpg"
    if kind == "16-bit-I;16":
        return Image.fromarray(rng.integers(0, 65536, (30, 40), dtype=np.uint16)), ".png"
    if kind == "1x1":
        return Image.fromarray(rgb[:1, :1]), ".png"
    if kind == "3000x20":
        return Image.fromarray(rng.integers(0, 256, (20, 3000, 3), dtype=np.uint8)), ".jpg"
    if kind == "20x3000":
        return Image.fromarray(rng.integers(0, 256, (3000, 20, 3), dtype=np.uint8)), ".bmp"
    raise ValueError(kind)


ODD_KINDS = ["grayscale-L", "RGBA", "palette-P", "CMYK", "16-bit-I;16", "1x1", "3000x20", "20x3000"]


def test_images_of_any_mode_and_size_are_trained_on(capfd, tmp_path):
    rng = np.random.default_rng(1)
    data = tmp_path / "odd"
    modes = set()
    for split in ("train", "val"):
        for name in ("ants", "bees"):
            (data / split / name).mkdir(parents=True)
            for i, kind in enumerate(ODD_KINDS):
                image, suffix = odd_image(kind, rng)
                path = data / split / name / f"{i}-{kind.replace(';', '')}{suffix}"
                image.save(path)
                with Image.open(path) as saved:
                    modes.add(saved.mode)
    assert {"L", "RGBA", "P", "CMYK", "RGB"} <= modes and any(mode.startswith("I;16") for mode in modes)
    assert train_counts(capfd, data, tmp_path) == (2 * len(ODD_KINDS), 2 * len(ODD_KINDS))


def test_bench_with_a_missing_data_set_exits_2_with_one_line(tmp_path):
    bench = os.path.join(os.path.dirname(QML), "bench.py")
    result = subprocess.run([sys.executable, bench, "--data-dir", str(tmp_path / "nowhere")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    line = one_stderr_line(result.stderr)
    assert line.startswith("bench.py: error:") and "no train/ folder" in line, line


# ----------------------------------------------------------------------------
# `qml.py report` on a path that holds no sweep, and a data folder one level too high


def report_path(tmp_path, case):
    """The RUNDIR of a report case: a missing path, a file that is no metrics JSON, an empty folder."""
    if case == "missing":
        return tmp_path / "runs" / "4242"
    if case == "file":
        (tmp_path / "tasks-1.json").write_text("{}")
        return tmp_path / "tasks-1.json"
    return tmp_path


REPORT_CASES = [
    ("missing", ["runs/4242 does not exist", "--metrics-json DIR/tasks-N.json"]),
    ("file", ["tasks-1.json is not a metrics JSON written by qml.py --metrics-json", "learning curves",
              "folder of them", "DIR/tasks-N.json"]),
    ("empty-folder", ["no metrics JSON files (*.json) in {tmp}", "submit_qml.sbatch", "--metrics-json"]),
]


@pytest.mark.parametrize("case, expected", REPORT_CASES, ids=[case[0] for case in REPORT_CASES])
def test_report_on_a_path_without_metrics_exits_2_with_one_line_saying_which(capfd, tmp_path, case, expected):
    line = main_error(capfd, ["report", str(report_path(tmp_path, case))])
    assert_mentions(line, *(part.format(tmp=tmp_path) for part in expected))


def test_data_dir_above_the_data_set_suggests_its_sub_folder(capfd, tiny_data, tmp_path):
    inner = shutil.copytree(tiny_data, tmp_path / "download" / "hymenoptera_data")
    line = main_error(capfd, ["--data-dir", str(tmp_path / "download"), *BASE])
    assert_mentions(line, "has no train/ folder", f"pass --data-dir {inner}")


def test_data_dir_with_two_data_sets_inside_suggests_neither(capfd, tiny_data, tmp_path):
    for name in ("ants_bees", "wasps_flies"):
        shutil.copytree(tiny_data, tmp_path / "download" / name)
    line = main_error(capfd, ["--data-dir", str(tmp_path / "download"), *BASE])
    assert_mentions(line, "has no train/ folder", "it needs train/ and val/")
