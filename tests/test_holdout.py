"""The test part (heldout.py): --holdout's stratified split of val/ and a test/ folder; the kept head scored once on
it, every image once across ranks, its line after the tutorial's two and its metrics; selection blind to it. On
generated image sets whose answer is known: red against blue images, which even a random backbone tells apart, and
noise against noise, which nothing can. And --entangle off, the circuit without its entangling layers."""

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import one_stderr_line, run_main, start_ranks
from PIL import Image
from torchvision import datasets

import qml
from machinery import checkpoints, heldout
from machinery.command_line import UsageError

RUN = ["--weights", "none", "--cache-features", "--bn-mode", "eval", "--print-freq", "0", "--workers", "0",
       "--head", "linear", "--lr", "0.01", "--epochs", "2"]
TEST_LINE = re.compile(r"^Test accuracy of the selected head: (\d\.\d{4}) \((\d+) images; loss \d+\.\d{4}; head of "
                       r"epoch (\d+)\)$")


def make_colour_folder(root, counts, separable=True, seed=0):
    """JPEGs of counts = {split: {class: n}}: with `separable`, each class a colour of its own (red, blue) under
    noise; otherwise noise alone, the same for every class."""
    rng = np.random.default_rng(seed)
    for split, classes in counts.items():
        for label, (name, n) in enumerate(classes.items()):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 120, (40, 48, 3))
                if separable:
                    pixels[..., 2 * label] += 135  # red for the first class, blue for the second
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.jpg")
    return root


COLOURS = {"train": {"blue": 6, "red": 6}, "val": {"blue": 6, "red": 5}}


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_colour_folder(tmp_path_factory.mktemp("colours"), COLOURS)


def trained(data, folder, name, *extra):
    """qml.py on `data` in this process: (stdout lines, metrics)."""
    path = folder / f"{name}.json"
    run = run_main(qml, ["--data-dir", str(data), *RUN, "--metrics-json", str(path), *extra])
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines(), json.loads(path.read_text())


# ----------------------------------------------------------------------------
# The split


def test_holdout_takes_its_share_of_every_class_and_the_rest_selects():
    targets = [0] * 70 + [1] * 83  # the ants and bees of val/
    selection, test = heldout.split_indices(targets, 0.5, 0, ["ants", "bees"])
    assert sorted(selection + test) == list(range(153)) and not set(selection) & set(test)
    assert [sum(targets[i] == label for i in test) for label in (0, 1)] == [35, 42]  # 35 and 41.5, rounded half up
    assert [sum(targets[i] == label for i in selection) for label in (0, 1)] == [35, 41]
    assert heldout.split_indices(targets, 0.2, 0, ["ants", "bees"])[1].__len__() == 14 + 17


def test_holdout_split_follows_its_own_seed_only():
    targets = [0] * 20 + [1] * 20
    first = heldout.split_indices(targets, 0.5, 0, ["a", "b"])
    assert heldout.split_indices(targets, 0.5, 0, ["a", "b"]) == first
    assert heldout.split_indices(targets, 0.5, 1, ["a", "b"]) != first


def test_repeats_keep_the_holdout_seed_and_change_the_others():
    args = qml.get_args_parser().parse_args(["--holdout", "0.5", "--repeat", "3"])
    qml.validate_args(args)
    assert (args.holdout_seed, args.seed, args.shuffle_seed) == (0, 45, 3)


@pytest.mark.parametrize("fraction", [0.01, 0.99])
def test_holdout_that_leaves_a_part_without_a_class_is_refused_naming_it(fraction):
    with pytest.raises(UsageError, match=r"class b has 4 validation image\(s\)") as refused:
        heldout.split_indices([0] * 100 + [1] * 4, fraction, 0, ["a", "b"])
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2", "x"])
def test_holdout_outside_0_to_1_is_refused(value, capsys):
    assert qml.main(["--holdout", value, "--check"]) == 2
    assert "--holdout" in one_stderr_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------
# A run with a test part


@pytest.fixture(scope="module")
def colour_runs(colours, tmp_path_factory):
    """The red/blue set: with --holdout 0.5 (11 val images: 6 test, 5 select); with a test/ folder (with_test_folder:
    3 test images, 8 select) and with that folder's labels swapped; and with the test/ folder on two ranks at one
    rank's global batch of 4, started first so that its ranks run beside the others."""
    folder = tmp_path_factory.mktemp("colour-runs")
    tested, swapped = with_test_folder(colours, folder / "tested"), with_test_folder(colours, folder / "swapped", True)
    two = folder / "two.json"
    ranks = start_ranks(2, ["--data-dir", str(tested), *RUN, "--global-batch-size", "4", "--metrics-json", str(two)])
    runs = {"holdout": trained(colours, folder, "holdout", "--holdout", "0.5"),
            "test folder": trained(tested, folder, "tested"), "swapped": trained(swapped, folder, "swapped")}
    for rank in ranks:
        assert rank.wait(timeout=600) == 0, rank.communicate()[1]
    return dict(runs, two=([], json.loads(two.read_text())))


def test_the_kept_head_is_scored_once_on_the_test_part_in_one_more_line(colour_runs):
    lines, metrics = colour_runs["holdout"]
    assert lines[-3].startswith("Training completed in") and lines[-2].startswith("Best average loss:")
    acc, images, epoch = TEST_LINE.match(lines[-1]).groups()
    assert (float(acc), int(images), int(epoch)) == (round(metrics["test_acc"], 4), 6, metrics["selected_epoch"])
    assert metrics["test_count"] == 6 and [epoch["val_count"] for epoch in metrics["epochs"]] == [5, 5]
    assert metrics["config"]["holdout"] == 0.5 and metrics["config"]["holdout_seed"] == 0


def test_the_selected_epoch_is_the_first_of_the_best_validation_accuracy(colour_runs):
    for _, metrics in colour_runs.values():  # the rank 0 of two too
        accs = [epoch["val_acc"] for epoch in metrics["epochs"]]
        assert metrics["selected_epoch"] == accs.index(max(accs)) + 1 and metrics["best_val_acc"] == max(accs)


def test_colours_a_random_backbone_separates_are_told_apart_on_the_test_part(colour_runs):
    _, metrics = colour_runs["holdout"]
    assert metrics["test_acc"] >= 5 / 6, metrics["test_acc"]


def test_without_a_test_part_the_data_are_left_alone_and_recorded_as_none():
    # (the last line of a run without one is "Best average ...": test_training's test_one_epoch_prints_...)
    args = qml.get_args_parser().parse_args([])
    data = {"train": object(), "val": object()}
    assert heldout.split_holdout(data, args) is data
    state = dict(qml.fresh_state(), history=[dict(epoch=1, val_acc=0.6)], best_acc=0.6)
    assert heldout.metrics_fields(state) == dict(selected_epoch=1, test_acc=None, test_loss=None, test_count=None)


def test_noise_nothing_can_separate_scores_near_chance_on_the_test_part(tmp_path):
    # 32 test images a head cannot tell apart: its correct answers are Binomial(32, 1/2), whose std 0.088 puts
    # 0.5 +- 3 std = 0.23..0.77 around chance (a head that learnt the noise of its training images is no better)
    data = make_colour_folder(tmp_path / "noise", {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2},
                                                   "test": {"a": 16, "b": 16}}, separable=False, seed=1)
    _, metrics = trained(data, tmp_path, "noise")
    assert metrics["test_count"] == 32 and abs(metrics["test_acc"] - 0.5) <= 3 * math.sqrt(0.25 / 32)


# ----------------------------------------------------------------------------
# Selection never reads the test part


def with_test_folder(source, target, swapped=False):
    """A copy of source whose val/ is split in two: the first 4 images of each class stay, the others make a test/
    folder (with its two class folders' names swapped: every test label changed). Of COLOURS' val/: 3 test images."""
    shutil.copytree(source / "train", target / "train")
    names = sorted(p.name for p in (source / "val").iterdir())
    for name, test_name in zip(names, reversed(names) if swapped else names, strict=True):
        files = sorted((source / "val" / name).iterdir())
        (target / "val" / name).mkdir(parents=True)
        (target / "test" / test_name).mkdir(parents=True)
        for index, path in enumerate(files):
            shutil.copy(path, target / ("val" if index < 4 else "test") / (name if index < 4 else test_name))
    return target


def printed(lines):
    """The lines of a run's training and its bests: its phases and the tutorial's last line."""
    return [line for line in lines if line.startswith(("Phase:", "Best average"))]


def test_changed_test_labels_change_nothing_but_the_test_score(colour_runs):
    lines, metrics = colour_runs["test folder"]
    flipped_lines, flipped = colour_runs["swapped"]
    assert printed(lines) == printed(flipped_lines) and len(printed(lines)) == 5
    assert flipped["selected_epoch"] == metrics["selected_epoch"]
    assert metrics["test_count"] == flipped["test_count"] == 3
    assert flipped["test_acc"] == pytest.approx(1 - metrics["test_acc"])  # two classes: every answer turned


def test_changed_holdout_images_change_nothing_but_the_test_score(colour_runs, colours, tmp_path):
    before, metrics = colour_runs["holdout"]
    data = tmp_path / "data"
    shutil.copytree(colours, data)
    val = datasets.ImageFolder(data / "val")
    _, test = heldout.split_indices(val.targets, 0.5, 0, val.classes)
    for index in test:  # each test image turned into the other class's colour, its label kept
        path = val.samples[index][0]
        Image.fromarray(np.asarray(Image.open(path))[..., ::-1]).save(path)
    after, changed = trained(data, tmp_path, "after", "--holdout", "0.5")
    assert printed(before) == printed(after) and changed["selected_epoch"] == metrics["selected_epoch"]
    assert changed["test_acc"] < metrics["test_acc"]  # the test part was read: by the test score alone


# ----------------------------------------------------------------------------
# Every test image once across ranks; refusals; resume


def test_every_test_image_is_scored_once_on_one_rank_and_on_two(colour_runs):
    # 3 test images, an odd number: rank 0 scores 2 and rank 1 scores 1. At one global batch (4) two ranks train the
    # head one rank trains, so the test score is the same too.
    _, one = colour_runs["test folder"]
    _, two = colour_runs["two"]
    assert (one["test_count"], two["test_count"], two["world_size"]) == (3, 3, 2)
    assert two["test_acc"] == pytest.approx(one["test_acc"]) and two["test_loss"] == pytest.approx(one["test_loss"])
    assert one["test_acc"] * 3 == pytest.approx(round(one["test_acc"] * 3))  # a whole number of images correct


def test_holdout_beside_a_test_folder_is_refused_in_one_line(colours, tmp_path, capsys):
    data = with_test_folder(colours, tmp_path / "data")
    assert qml.main(["--data-dir", str(data), *RUN, "--holdout", "0.5"]) == 2
    assert "has a test/ folder too" in one_stderr_line(capsys.readouterr().err)


@pytest.fixture(scope="module")
def resumed(colours, tmp_path_factory):
    """The --holdout 0.5 run of colour_runs in two parts: one epoch with a checkpoint, then --resume to two."""
    folder = tmp_path_factory.mktemp("resumed")
    checkpoint = str(folder / "run.pt")
    trained(colours, folder, "first", "--holdout", "0.5", "--epochs", "1", "--checkpoint", checkpoint)
    return checkpoint, trained(colours, folder, "resumed", "--holdout", "0.5", "--resume", checkpoint)[1]


def test_a_resumed_run_scores_the_same_kept_head_as_an_uninterrupted_one(colour_runs, resumed):
    _, straight = colour_runs["holdout"]
    _, metrics = resumed
    assert metrics["resumed"] == 1
    assert (metrics["test_acc"], metrics["selected_epoch"]) == (straight["test_acc"], straight["selected_epoch"])


def test_a_checkpoint_is_not_resumed_with_another_holdout(colours, resumed, capsys):
    checkpoint, _ = resumed
    assert qml.main(["--data-dir", str(colours), *RUN, "--holdout", "0.5", "--holdout-seed", "1",
                     "--resume", checkpoint]) == 2
    assert "holdout_seed=0" in one_stderr_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------
# --entangle off: quantum_net without its entangling layers


def circuit(entangle):
    return qml.DressedQuantumNet(n_qubits=3, q_depth=2, qdevice="torch", entangle=entangle).circuit


def test_entangle_off_removes_every_cnot_and_nothing_else():
    with_cnots, without = circuit(True).description(), circuit(False).description()
    assert sum(line.startswith("CNOT") for line in with_cnots) == 2 * 2  # (0,1) then (1,2), each layer
    assert [line for line in with_cnots if not line.startswith("CNOT")] == without


def test_without_entanglement_each_wire_measures_minus_sine_of_its_angles():
    # H then RY(x) RY(w1) RY(w2) on each wire alone: the Bloch vector (1, 0, 0) turned by x + w1 + w2 about y has
    # z = -sin(x + w1 + w2)
    torch.manual_seed(0)
    head = qml.DressedQuantumNet(n_qubits=3, q_depth=2, qdevice="torch", entangle=False)
    angles = torch.rand(5, 3, dtype=torch.float64)
    measured = torch.stack(head.quantum_net(angles, head.q_params.double()), dim=-1)
    expected = -torch.sin(angles + head.q_params.double().reshape(2, 3).sum(0))
    torch.testing.assert_close(measured, expected)


def test_a_checkpoint_of_one_circuit_is_not_resumed_as_the_other(tmp_path):
    args = qml.get_args_parser().parse_args([])
    configs = {entangle: checkpoints.run_config(args, ["a", "b"], circuit(entangle).digest()) for entangle in
               (True, False)}
    torch.save({"config": configs[True]}, tmp_path / "on.pt")
    with pytest.raises(UsageError, match="the checkpoint trained another circuit"):
        checkpoints.load_checkpoint(str(tmp_path / "on.pt"), configs[False])


def test_the_test_part_is_scored_with_the_kept_heads_batchnorm_statistics_and_the_last_ones_come_back():
    # --bn-mode train moves the statistics: the kept model is the kept head with those of its epoch, as --save keeps.
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
    model.fc = torch.nn.Linear(2, 2)
    kept = dict(best_head={k: torch.full_like(v, 1.0) for k, v in model.fc.state_dict().items()},
                best_buffers={"0.running_mean": torch.tensor([5.0, 6.0]), "0.running_var": torch.tensor([2.0, 3.0]),
                              "0.num_batches_tracked": torch.tensor(7)})
    last = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}

    def score():
        seen.update(mean=model[0].running_mean.tolist(), weight=model.fc.weight.tolist())
        return 0.5, 1.0, 3

    assert heldout.score_kept_head(model, kept, score) == dict(acc=1.0, loss=0.5, count=3)
    assert seen == dict(mean=[5.0, 6.0], weight=[[1.0, 1.0], [1.0, 1.0]])
    assert all(torch.equal(value, last[key]) for key, value in model.state_dict().items())
