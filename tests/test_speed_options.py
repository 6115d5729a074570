"""The speed options change no result they promise to keep: --image-cache (decode once) and --precision.

Runs train in this process on the tiny data set for two epochs, with the torch simulator (the circuit's device
plays no part in what is tested here).
"""

import json
import os
import types

import pytest
import torch
import torchvision
from conftest import TINY_COUNTS, run_main
from PIL import Image
from torchvision import transforms

import bench
from machinery import images
import qml
from machinery import records, simulators

N_IMAGES = sum(TINY_COUNTS["train"].values()) + sum(TINY_COUNTS["val"].values())  # 21
CROP_BYTES = 3 * 224 * 224  # one uint8 crop
RESULT_KEYS = ("train_loss", "train_acc", "train_count", "val_loss", "val_acc", "val_count")


def train(data_dir, out, *extra):
    """Two epochs, in this process; returns (metrics JSON, saved head)."""
    metrics, head = out / "metrics.json", out / "head.pt"
    result = run_main(qml, ["--data-dir", data_dir, "--weights", "none", "--epochs", "2", "--print-freq", "0",
                            "--qdevice", "torch", "--metrics-json", str(metrics), "--save", str(head), *extra])
    assert result.returncode == 0, result.stderr
    return json.loads(metrics.read_text()), torch.load(head, weights_only=True)["head"]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """{setting: (metrics, head)} for the default cache, no cache, a 1 MiB cache and a bf16 backbone."""
    settings = {"auto": [], "off": ["--image-cache", "off"], "1MiB": ["--image-cache", "1"],
                "bf16": ["--precision", "bf16"]}
    with pytest.MonkeyPatch.context() as patch:  # bf16's numbers are tested, not its speed: on any CPU
        patch.setattr(images, "cpu_computes_bf16", lambda: True)
        return {name: train(tiny_data, tmp_path_factory.mktemp(name), *extra) for name, extra in settings.items()}


def results(metrics):
    return [{key: epoch[key] for key in RESULT_KEYS} for epoch in metrics["epochs"]]


# ----------------------------------------------------------------------------
# --image-cache


def test_normalising_kept_crops_gives_the_tutorials_pixels_bit_for_bit(tiny_data):
    tutorial = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                   transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    folder = os.path.join(tiny_data, "train", "ants")
    photos = [Image.open(os.path.join(folder, name)).convert("RGB") for name in sorted(os.listdir(folder))]
    crops = torch.stack([qml.data_transforms()(photo) for photo in photos])
    assert crops.dtype == torch.uint8
    assert torch.equal(images.normalize_images(crops), torch.stack([tutorial(photo) for photo in photos]))


@pytest.mark.parametrize("setting", ["off", "1MiB"])
def test_image_cache_changes_no_metric(runs, setting):
    assert results(runs[setting][0]) == results(runs["auto"][0])


@pytest.mark.parametrize("setting", ["off", "1MiB"])
def test_image_cache_changes_no_weight_of_the_trained_head(runs, setting):
    cached, other = runs["auto"][1], runs[setting][1]
    assert set(cached) == set(other)
    assert all(torch.equal(cached[name], other[name]) for name in cached)


def test_epochs_after_the_first_decode_no_image_by_default(runs):
    metrics, _ = runs["auto"]
    assert [(e["images_decoded"], e["images_kept"]) for e in metrics["epochs"]] == [(N_IMAGES, N_IMAGES),
                                                                                      (0, N_IMAGES)]


def test_image_cache_off_decodes_every_image_every_epoch(runs):
    metrics, _ = runs["off"]
    assert [(e["images_decoded"], e["images_kept"]) for e in metrics["epochs"]] == [(N_IMAGES, 0)] * 2


def test_image_cache_keeps_only_what_fits_its_budget(runs):
    metrics, _ = runs["1MiB"]
    fits = 2**20 // CROP_BYTES  # 6: one process sees every training image each epoch, the 6 kept among them
    assert [(e["images_decoded"], e["images_kept"]) for e in metrics["epochs"]] == [(N_IMAGES, fits),
                                                                                      (N_IMAGES - fits, fits)]


def test_images_from_decoding_workers_are_kept_as_private_copies():
    image = torch.arange(48, dtype=torch.uint8).reshape(3, 4, 4).share_memory_()  # as a worker's image arrives
    kept = images.KeptImages(budget=10**6)
    kept.keep(("train", 0), image)
    assert not kept.images[("train", 0)].is_shared() and torch.equal(kept.images[("train", 0)], image)


def rank_facts(*hosts):
    return [dict(rank=rank, host=host) for rank, host in enumerate(hosts)]


def test_image_cache_auto_on_cpus_is_a_quarter_of_the_available_memory_shared_by_the_hosts_ranks(monkeypatch):
    monkeypatch.setattr(images, "available_host_memory", lambda: 64 * 2**30)
    ctx = qml.DistContext(rank=1, world_size=4, rank_facts=rank_facts("a", "a", "b", "a"))
    assert images.image_cache_budget("auto", ctx) == 64 * 2**30 // 4 // 3


@pytest.mark.parametrize("setting, budget", [("off", 0), (0.0, 0), (1.5, 3 * 2**19)], ids=["off", "0", "1.5MiB"])
def test_image_cache_off_or_in_mib_is_that_many_bytes(setting, budget):
    ctx = qml.DistContext(rank_facts=rank_facts("a"))
    assert images.image_cache_budget(setting, ctx) == budget


def test_available_host_memory_is_at_most_the_hosts_memory():
    assert 0 < images.available_host_memory() <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------
# --precision


def test_dressed_head_computes_in_fp32_under_a_bf16_autocast():
    torch.manual_seed(0)
    head = qml.DressedQuantumNet(qdevice=simulators.TORCH_QDEVICE)
    features = torch.randn(4, 512)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = head(features)
    assert autocast.dtype == torch.float32
    assert torch.equal(autocast, head(features))


def test_casting_frozen_convolutions_once_gives_autocasts_output_bit_for_bit():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), images.backbone_autocast("bf16", torch.device("cpu")):
        expected = model(pixels)
        images.cast_frozen_convolutions(model, "bf16")
        got = model(pixels)
    assert model.conv1.weight.dtype == torch.bfloat16 and model.bn1.weight.dtype == torch.float32
    assert torch.equal(got, expected)


def test_fp32_leaves_the_backbone_and_its_forward_alone():
    model = torchvision.models.resnet18(weights=None)
    images.cast_frozen_convolutions(model, "fp32")
    assert {param.dtype for param in model.parameters()} == {torch.float32}
    with images.backbone_autocast("fp32", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")


def test_bf16_run_records_its_precision_and_keeps_an_fp32_head(runs):
    metrics, head = runs["bf16"]
    assert metrics["config"]["precision"] == "bf16" and runs["auto"][0]["config"]["precision"] == "fp32"
    assert {value.dtype for value in head.values()} == {torch.float32}


@pytest.mark.parametrize("key", ["train_loss", "val_loss"])
def test_bf16_first_epoch_loss_is_within_a_hundredth_of_fp32(runs, key):
    bf16, fp32 = runs["bf16"][0]["epochs"][0][key], runs["auto"][0]["epochs"][0][key]
    assert bf16 != fp32  # the backbone really ran in bf16 ...
    assert bf16 == pytest.approx(fp32, abs=0.01)  # ... and the head learnt from features ~1% off


# ----------------------------------------------------------------------------
# --precision bf16 only where the CPU computes bfloat16


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, False), (True, False, True),
                                                         (False, True, True)])
def test_cpu_computes_bf16_with_avx512_bf16_or_amx(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(images.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert images.cpu_computes_bf16() is expected


def test_cpu_bf16_is_unknown_where_torch_cannot_tell(monkeypatch):
    monkeypatch.setattr(images.platform, "machine", lambda: "aarch64")
    assert images.cpu_computes_bf16() is None


def bf16_run(capfd, monkeypatch, computes, *extra):
    """qml.main with --precision bf16 on a CPU faked to compute bfloat16 or not; (status, stderr)."""
    monkeypatch.setattr(images, "cpu_computes_bf16", lambda: computes)
    status = qml.main(["--device", "cpu", "--precision", "bf16", "--weights", "none", *extra])
    return status, capfd.readouterr().err


def test_bf16_on_a_cpu_without_bfloat16_exits_2_naming_the_cpu_and_fp32_before_reading_data(capfd, monkeypatch,
                                                                                             tmp_path):
    status, stderr = bf16_run(capfd, monkeypatch, False, "--data-dir", str(tmp_path / "nowhere"))
    assert status == 2 and stderr.count("\n") == 1, stderr
    assert "--precision bf16" in stderr and images.cpu_name() in stderr and "use --precision fp32" in stderr


@pytest.mark.parametrize("computes, expected", [(False, 2), (True, 0), (None, 0)])
def test_check_refuses_bf16_only_on_a_cpu_without_bfloat16(capfd, monkeypatch, computes, expected):
    status, stderr = bf16_run(capfd, monkeypatch, computes, "--check")
    assert status == expected, stderr


# ----------------------------------------------------------------------------
# bench


def test_bench_compares_against_the_tutorial_equivalent_and_offers_fp16_only_on_gpus(monkeypatch):
    monkeypatch.setattr(images, "cpu_computes_bf16", lambda: True)
    labels = [label for label, _ in bench.bench_setups(torch.device("cpu"))]
    assert labels[:2] == ["tutorial-equivalent: --per-sample --image-cache off", "default"]
    assert "--precision bf16 --qdevice torch" in labels
    assert not any("fp16" in label for label in labels)


def test_bench_leaves_out_bf16_on_a_cpu_without_bfloat16_and_says_so(monkeypatch):
    monkeypatch.setattr(images, "cpu_computes_bf16", lambda: False)
    labels = [label for label, _ in bench.bench_setups(torch.device("cpu"))]
    assert "--qdevice torch" in labels and not any("bf16" in label for label in labels)
    assert images.cpu_name() in bench.cpu_description() and "no bfloat16" in bench.cpu_description()


def test_bench_table_keeps_each_setups_fastest_later_epoch_over_the_rounds(monkeypatch, tmp_path):
    # Per setup and round, a later epoch of (10, 6) s for the tutorial-equivalent and (4, 3) s for the others.
    later = {True: [10.0, 6.0], False: [4.0, 3.0]}
    calls = []

    def fake_time_run(command, args, tmp, launcher=()):
        seconds = later["--per-sample" in command][calls.count(command)]  # this setup's round
        calls.append(command)
        split = dict.fromkeys(records.TimeSplit.PARTS, seconds / 5)
        epochs = [dict(seconds=20.0, train_loss=0.7, train_acc=0.5, val_loss=0.6, val_acc=0.5),
                  dict(seconds=seconds, time_split=split)]
        return 0.0, dict(device="cpu", backend="gloo", epochs=epochs)

    monkeypatch.setattr(bench, "time_run", fake_time_run)
    rows = bench.epoch_rows(types.SimpleNamespace(epochs=2, rounds=2), str(tmp_path))
    assert len(calls) == 2 * len(bench.bench_setups(qml.pick_device("auto", 0)))
    assert [row[2:4] for row in rows[:2]] == [("6.00", "1.00x"), ("3.00", "0.50x")]
    assert rows[1][4:9] == ("0.60",) * 5 and rows[1][9] == "0.7000/0.5000/0.6000/0.5000"


# ----------------------------------------------------------------------------
# --help of qml.py and bench.py says what the code does


def test_every_bench_option_has_help():
    actions = bench.get_args_parser()._actions
    assert [action.dest for action in actions if not action.help] == []


def test_every_qml_option_with_a_default_value_shows_it_in_help():
    parser = qml.get_args_parser()
    shown = [action for action in parser._actions if action.dest != "help" and action.default not in (None, False, [])]
    assert [action.dest for action in shown if "%(default)s" not in action.help] == []


def test_workers_help_gives_the_affinity_mask_default_of_default_workers():
    (workers,) = [action for action in qml.get_args_parser()._actions if action.dest == "workers"]
    assert "CPU affinity mask" in workers.help and "SLURM_CPUS_PER_TASK" not in workers.help, workers.help
