"""`qml.py predict MODEL IMAGE_OR_FOLDER...`: a model trained on a generated three-class set, saved with --save and
--checkpoint, is rebuilt and predicts its own validation folder with exactly the accuracy and the loss the run
recorded for its kept head (quantum, classical and linear heads, random backbones); the refusals come in one line
before any image is read; a bad image is named and the others predicted; the CSV, the grid and the confusion
matrix say what the lines say."""

import csv
import json
import math
import os
import shutil

import numpy as np
import pennylane
import pytest
import torch
import torchvision
from conftest import one_stderr_line, run_main
from PIL import Image

import qml
from machinery import images

CLASSES = ("ants", "bees", "wasps")
COUNTS = {"train": 3, "val": 3}
COMMON = ["--weights", "none", "--print-freq", "0", "--workers", "0", "--device", "cpu", "--lr", "0.01"]
# How each model trains: the quantum head on the default simulator with BatchNorm's batch statistics (the default
# --bn-mode train, which changes them), the others on cached features.
RUNS = {"quantum": ["--head", "quantum", "--epochs", "2", "--step-size", "1", "--gamma", "10"],
        "classical": ["--head", "classical", "--epochs", "2", "--bn-mode", "eval", "--cache-features"],
        "linear": ["--head", "linear", "--epochs", "2", "--bn-mode", "eval", "--cache-features"]}


def tinted_three_classes(root):
    """Random JPEGs of three classes, each tinted in one colour channel."""
    rng = np.random.default_rng(0)
    for split, count in COUNTS.items():
        for tint, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 128, (40, 48, 3), dtype=np.uint8)
                pixels[..., tint] += 127
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{head: folder holding its model.pt (--save), run.pt (--checkpoint) and metrics.json}, and the data."""
    root = tmp_path_factory.mktemp("predict")
    data = tinted_three_classes(root / "data")
    models = {}
    for head, extra in RUNS.items():
        out = root / head
        result = run_main(qml, ["--data-dir", str(data), *COMMON, *extra, "--save", str(out / "model.pt"),
                                "--checkpoint", str(out / "run.pt"), "--metrics-json", str(out / "metrics.json")])
        assert result.returncode == 0, result.stderr
        models[head] = out
    return models, data


def predict(*argv):
    return run_main(qml, ["predict", *map(str, argv)])


def kept_epoch(metrics):
    accuracies = [epoch["val_acc"] for epoch in metrics["epochs"]]
    return accuracies.index(metrics["best_val_acc"]) + 1  # the first epoch to reach the best is kept


@pytest.fixture
def no_image_read(monkeypatch):
    """Fail the test if predict decodes any image."""
    def refuse(path):
        raise AssertionError(f"read {path}")
    monkeypatch.setattr(images, "load_rgb", refuse)


def refusal(result):
    """The one line of a refusal, after checking that nothing was predicted."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Model:" not in result.stdout  # torch's hub may say that it tries a download
    return one_stderr_line(result.stderr)


def edited_copy(source, target, edit):
    """A copy of a model file with edit(saved dict) applied."""
    saved = torch.load(source, map_location="cpu", weights_only=True)
    edit(saved)
    torch.save(saved, target)
    return target


# ----------------------------------------------------------------------------
# The run's own validation folder: its recorded accuracy and loss


@pytest.mark.parametrize("head, file", [("quantum", "model.pt"), ("quantum", "run.pt"), ("classical", "model.pt"),
                                        ("linear", "model.pt")],
                         ids=["quantum-save", "quantum-checkpoint", "classical-save", "linear-save"])
def test_predicting_the_validation_folder_gives_the_kept_heads_recorded_accuracy_and_loss(trained, head, file):
    models, data = trained
    metrics = json.loads((models[head] / "metrics.json").read_text())
    out = models[head] / f"{file}.csv"
    result = predict(models[head] / file, data / "val", "--out", out)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    correct = sum(row["predicted"] == row["true_class"] for row in rows)
    assert len(rows) == 9 and correct / len(rows) == metrics["best_val_acc"], (correct, metrics["best_val_acc"])
    assert f"Accuracy: {metrics['best_val_acc']:.4f} ({correct} of 9 images" in result.stdout
    # the loss too: a wrong backbone, BatchNorm statistic or head moves it far beyond the CSV's six decimals
    loss = -sum(math.log(float(row[f"p_{row['true_class']}"])) for row in rows) / len(rows)
    assert loss == pytest.approx(metrics["epochs"][kept_epoch(metrics) - 1]["val_loss"], abs=2e-5)


def test_the_quantum_run_keeps_a_head_before_its_last_epoch(trained):
    """So that the test above checks the kept epoch's BatchNorm statistics, not the last epoch's."""
    models, _ = trained
    metrics = json.loads((models["quantum"] / "metrics.json").read_text())
    assert kept_epoch(metrics) < len(metrics["epochs"]), metrics["epochs"]
    statistics = torch.load(models["quantum"] / "model.pt", weights_only=True)["buffers"]
    assert statistics["bn1.running_var"].ne(1).any()  # --bn-mode train moved them, and the file has them


def test_save_keeps_no_backbone_copy_and_no_statistics_that_training_left_unchanged(trained):
    models, _ = trained
    quantum, linear = (torch.load(models[head] / "model.pt", weights_only=True) for head in ("quantum", "linear"))
    assert linear["buffers"] is None and not any(name.startswith("layer") for name in linear["head"])
    assert os.path.getsize(models["quantum"] / "model.pt") < 100_000  # ResNet18's weights alone are 45 MB
    assert quantum["config"]["classes"] == list(CLASSES) and len(quantum["backbone_sha256"]) == 64


def test_each_image_gets_one_line_with_its_class_and_probability_and_the_matrix_counts_them(trained):
    models, data = trained
    result = predict(models["linear"] / "model.pt", data / "val")
    lines = result.stdout.splitlines()
    predictions = [line.split() for line in lines if line.startswith(str(data))]
    assert len(predictions) == 9
    for path, predicted, probability, *wrong in predictions:
        true = os.path.basename(os.path.dirname(path))
        assert predicted in CLASSES and 1 / 3 <= float(probability) <= 1
        assert wrong == ([] if predicted == true else ["wrong:", true])
    header = lines.index("Confusion matrix (rows: true class, its folder; columns: predicted class):")
    assert lines[header + 1].split() == list(CLASSES)
    matrix = {row.split()[0]: list(map(int, row.split()[1:])) for row in lines[header + 2:header + 5]}
    for true in CLASSES:
        assert matrix[true] == [sum(1 for p in predictions if os.path.basename(os.path.dirname(p[0])) == true
                                    and p[1] == name) for name in CLASSES]


def test_an_image_outside_class_folders_is_predicted_but_not_scored(trained, tmp_path):
    models, data = trained
    shutil.copy(data / "val" / "bees" / "0.jpg", tmp_path / "mine.jpg")
    result = predict(models["linear"] / "model.pt", tmp_path / "mine.jpg")
    assert result.returncode == 0, result.stderr
    line = result.stdout.splitlines()[1]
    assert line.startswith(f"{tmp_path / 'mine.jpg'}  ") and "wrong" not in line and "Accuracy" not in result.stdout


def test_a_bad_image_is_named_in_its_own_line_and_the_others_are_predicted(trained, tmp_path):
    models, data = trained
    shutil.copytree(data / "val", tmp_path / "val")
    (tmp_path / "val" / "bees" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    result = predict(models["linear"] / "model.pt", tmp_path / "val")
    assert result.returncode == 1
    named = [line for line in result.stderr.splitlines() if "broken.jpg" in line]
    assert len(named) == 1 and "not a readable image" in named[0]
    assert "1 of 10 images could not be read" in result.stderr and "Traceback" not in result.stderr
    assert sum(line.startswith(str(tmp_path)) for line in result.stdout.splitlines()) == 9


def test_grid_and_confusion_pictures_are_written(trained, tmp_path):
    models, data = trained
    result = predict(models["linear"] / "model.pt", data / "val", "--grid", tmp_path / "grid.png",
                     "--confusion", tmp_path / "confusion.png", "--grid-images", "5")
    assert result.returncode == 0, result.stderr
    for name in ("grid.png", "confusion.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Prediction grid: {tmp_path / 'grid.png'}" in result.stdout


# ----------------------------------------------------------------------------
# Refused in one line, status 2, before any image is read


def test_a_file_that_is_no_model_is_refused(trained, tmp_path, no_image_read):
    _, data = trained
    (tmp_path / "noise.pt").write_bytes(b"not a model at all")
    line = refusal(predict(tmp_path / "noise.pt", data / "val"))
    assert "is not a qml.py model" in line and "--save or --checkpoint" in line


class RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_file_carrying_code_is_refused_without_running_it(trained, tmp_path, no_image_read):
    _, data = trained
    torch.save(RunsCodeWhenUnpickled(tmp_path / "ran"), tmp_path / "evil.pt")
    assert "is not a qml.py model" in refusal(predict(tmp_path / "evil.pt", data / "val"))
    assert not (tmp_path / "ran").exists()


def test_an_old_save_file_of_the_head_alone_is_refused_saying_why(trained, tmp_path, no_image_read):
    models, data = trained
    saved = torch.load(models["quantum"] / "model.pt", weights_only=True)
    torch.save(saved["head"], tmp_path / "head.pt")  # what --save wrote before it recorded the model
    line = refusal(predict(tmp_path / "head.pt", data / "val"))
    assert "only a head's weights" in line and "classes" in line and "--checkpoint" in line


def ring(nqubits):
    """The tutorial's CNOT ladder closed into a ring: an edit of the circuit."""
    pennylane.CNOT(wires=[nqubits - 1, 0])
    for i in range(nqubits - 1):
        pennylane.CNOT(wires=[i, i + 1])


def test_a_model_of_a_circuit_edited_since_is_refused(trained, monkeypatch, no_image_read):
    models, data = trained
    monkeypatch.setattr(qml, "entangling_layer", ring)
    line = refusal(predict(models["quantum"] / "model.pt", data / "val"))
    assert "another circuit" in line and "restore that circuit" in line


def test_a_random_backbone_that_cannot_be_drawn_again_is_refused(trained, tmp_path, no_image_read):
    """Another seed draws another backbone: its digest differs from the file's."""
    models, data = trained
    path = edited_copy(models["linear"] / "model.pt", tmp_path / "seed.pt",
                       lambda saved: saved["config"].update(seed=7))
    line = refusal(predict(path, data / "val"))
    assert "random backbone (--weights none) drawn here from seed 7 differs" in line


def test_backbone_weights_moved_away_are_refused_naming_the_option_for_their_new_place(trained, tmp_path,
                                                                                      no_image_read):
    models, data = trained
    path = edited_copy(models["linear"] / "model.pt", tmp_path / "moved.pt",
                       lambda saved: saved["config"].update(weights=str(tmp_path / "gone.pth")))
    line = refusal(predict(path, data / "val"))
    assert f"{tmp_path / 'gone.pth'}, which is not there" in line and "--weights PATH" in line


def test_backbone_weights_other_than_those_it_trained_on_are_refused(trained, tmp_path, no_image_read):
    models, data = trained
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "other.pth")
    line = refusal(predict(models["linear"] / "model.pt", data / "val", "--weights", tmp_path / "other.pth"))
    assert "are not the ones it trained on" in line


def test_imagenet_weights_that_cannot_be_had_offline_are_refused_naming_the_fix(trained, tmp_path, monkeypatch,
                                                                                no_image_read):
    models, data = trained
    path = edited_copy(models["linear"] / "model.pt", tmp_path / "imagenet.pt",
                       lambda saved: saved["config"].update(weights="imagenet"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    for var in ("https_proxy", "HTTPS_PROXY"):  # a closed local port: the download fails, network or not
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    line = refusal(predict(path, data / "val"))
    assert "resnet18-f37072fd.pth" in line and str(tmp_path / "empty_torch_home") in line


def test_an_old_checkpoint_without_the_kept_heads_statistics_is_refused_saying_why(trained, tmp_path,
                                                                                   no_image_read):
    models, data = trained
    path = edited_copy(models["quantum"] / "run.pt", tmp_path / "old.pt", lambda saved: saved["state"].pop(
        "best_buffers"))
    line = refusal(predict(path, data / "val"))
    assert "BatchNorm statistics of the kept head (epoch 1 of 2" in line


def test_a_missing_input_is_refused(trained, tmp_path, no_image_read):
    models, _ = trained
    line = refusal(predict(models["linear"] / "model.pt", tmp_path / "nothing-here"))
    assert "no such file or folder" in line


def test_a_batch_of_images_is_one_circuit_call(trained, monkeypatch):
    models, data = trained
    calls, build_model = [], qml.build_model

    def build_counting(args, n_classes, device_id=None):
        model = build_model(args, n_classes, device_id)
        circuit = model.fc.quantum_net
        model.fc.quantum_net = lambda inputs, weights: calls.append(len(inputs)) or circuit(inputs, weights)
        model.fc.quantum_net.trace = circuit.trace
        return model

    monkeypatch.setattr(qml, "build_model", build_counting)
    result = predict(models["quantum"] / "model.pt", data / "val", "--batch-size", "4")
    assert result.returncode == 0, result.stderr
    assert calls == [4, 4, 1]  # 9 images


def test_imagenet_weights_other_than_those_it_trained_on_are_refused(trained, tmp_path, monkeypatch):
    """A run on (a stand-in for) the cached ImageNet weights predicts its recorded accuracy while the cache holds
    them, and is refused once the cache holds other weights."""
    _, data = trained
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(3)
    torch.save(torchvision.models.resnet18().state_dict(), cache / "resnet18-f37072fd.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    argv = ["--data-dir", str(data), *COMMON, *RUNS["linear"], "--weights", "imagenet"]  # the last --weights counts
    run = run_main(qml, [*argv, "--save", str(tmp_path / "model.pt"), "--metrics-json", str(tmp_path / "m.json")])
    assert run.returncode == 0, run.stderr
    accuracy = json.loads((tmp_path / "m.json").read_text())["best_val_acc"]
    assert f"Accuracy: {accuracy:.4f}" in predict(tmp_path / "model.pt", data / "val").stdout
    torch.manual_seed(4)
    torch.save(torchvision.models.resnet18().state_dict(), cache / "resnet18-f37072fd.pth")
    line = refusal(predict(tmp_path / "model.pt", data / "val"))
    assert "the ImageNet weights loaded here differ from those it trained on" in line
