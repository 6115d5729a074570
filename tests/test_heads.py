"""--head: the quantum head, its classical control and a linear baseline, built, trained and resumed by the same
code; the run's first line and its metrics JSON name the head and its trainable parameters."""

import json

import numpy as np
import pytest
import torch
from conftest import assert_ranks_agree, run_main, start_ranks

import qml

TRAINABLE = {"quantum": 2086, "classical": 2082, "linear": 1026}  # 512 -> 4 -> 2 around 24 / 20 weights; 512 -> 2


def built(head, *argv):
    torch.manual_seed(0)
    args = qml.get_args_parser().parse_args(["--weights", "none", "--head", head, "--qdevice", "torch", *argv])
    return qml.build_model(args, 2)


@pytest.mark.parametrize("head", TRAINABLE)
def test_each_head_replaces_fc_and_is_all_that_trains(head):
    model = built(head)
    assert qml.trainable_parameters(model.fc) == TRAINABLE[head]
    assert qml.trainable_parameters(model) == TRAINABLE[head]  # the backbone stays frozen
    assert model(torch.randn(3, 3, 64, 64)).shape == (3, 2)


def test_the_classical_control_takes_the_circuits_inputs_and_gives_values_in_its_range():
    head = built("classical").fc
    features = torch.randn(5, 512)
    angles = torch.tanh(head.pre_net(features)) * np.pi / 2
    middle = torch.tanh(head.classical_net(angles))
    torch.testing.assert_close(head(features), head.post_net(middle))
    assert head.classical_net.in_features == head.classical_net.out_features == qml.n_qubits
    assert sum(p.numel() for p in head.classical_net.parameters()) == qml.n_qubits * (qml.n_qubits + 1)
    assert middle.abs().max() <= 1


def test_the_control_draws_its_random_numbers_in_the_quantum_heads_order():
    quantum, classical = built("quantum").fc, built("classical").fc
    for layer in ("pre_net",):  # drawn first by both: the same seed gives the same compression
        torch.testing.assert_close(getattr(classical, layer).weight, getattr(quantum, layer).weight)


def test_the_linear_head_is_mari_et_als_baseline():
    head = built("linear").fc
    assert isinstance(head, torch.nn.Linear) and (head.in_features, head.out_features) == (512, 2)


def test_a_head_without_a_circuit_builds_none_and_checks_no_circuit_memory(monkeypatch):
    monkeypatch.setattr(qml, "make_quantum_net", lambda *args, **kwargs: pytest.fail("a circuit was built"))
    args = qml.get_args_parser().parse_args(["--head", "classical", "--n-qubits", "30"])
    assert qml.check_circuit_memory(args, qml.DistContext()) is None
    built("classical")
    built("linear")


# ----------------------------------------------------------------------------
# Trained and resumed like the quantum head, on one rank and on two


EPOCHS = ["--epochs", "2", "--step-size", "1", "--gamma", "0.5"]  # the rate decays within the run


def finished(ranks, name):
    """Rank 0's stdout, once both ranks ended with status 0."""
    outputs = [rank.communicate(timeout=600) for rank in ranks]
    for rank, (_, stderr) in zip(ranks, outputs, strict=True):
        assert rank.returncode == 0, (name, stderr)
    return outputs[0][0]


@pytest.fixture(scope="module")
def head_runs(tiny_data, tmp_path_factory):
    """{(head, ranks): (uninterrupted metrics, resumed metrics, first line)}: two epochs straight, and one epoch then
    a resume to two, of the classical and linear heads on one rank (in this process) and of the classical head on
    two (start_ranks, its runs started beside the others)."""
    folder = tmp_path_factory.mktemp("heads")
    common = ["--data-dir", tiny_data, "--weights", "none", "--print-freq", "0", "--workers", "0", "--bn-mode", "eval",
              "--cache-features"]
    first_epoch = ["--epochs", "1", "--step-size", "1", "--gamma", "0.5"]

    def argv(head, ranks, name, schedule, *extra):
        stem = folder / f"{head}-{ranks}"
        return [*common, "--head", head, *schedule, "--metrics-json", f"{stem}-{name}.json", *extra]

    two_rank_runs = {name: start_ranks(2, argv("classical", 2, name, schedule, "--checkpoint",
                                                str(folder / f"{name}.pt")))
                     for name, schedule in (("straight", EPOCHS), ("first", first_epoch))}
    first_lines = {}
    for head in ("classical", "linear"):
        straight = run_main(qml, argv(head, 1, "straight", EPOCHS))
        assert straight.returncode == 0, straight.stderr
        first_lines[(head, 1)] = straight.stdout.splitlines()[0]
        checkpoint = str(folder / f"{head}-1.pt")
        for name, schedule, extra in (("first", first_epoch, ()), ("resumed", EPOCHS, ("--resume", checkpoint))):
            run = run_main(qml, argv(head, 1, name, schedule, *extra, "--checkpoint", checkpoint))
            assert run.returncode == 0, run.stderr
    first_lines[("classical", 2)] = finished(two_rank_runs["straight"], "straight").splitlines()[0]
    finished(two_rank_runs["first"], "first")
    finished(start_ranks(2, argv("classical", 2, "resumed", EPOCHS, "--resume", str(folder / "first.pt"))), "resumed")
    return {key: (json.loads((folder / f"{key[0]}-{key[1]}-straight.json").read_text()),
                  json.loads((folder / f"{key[0]}-{key[1]}-resumed.json").read_text()), first_lines[key])
            for key in CASES}


CASES = [("classical", 1), ("linear", 1), ("classical", 2)]


@pytest.mark.parametrize("head, ranks", CASES)
def test_a_resumed_head_ends_as_an_uninterrupted_one(head_runs, head, ranks):
    straight, resumed, _ = head_runs[(head, ranks)]
    assert resumed["resumed"] == 1 and straight["resumed"] == 0
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert [epoch.get(key) for epoch in resumed["epochs"]] == [epoch.get(key) for epoch in straight["epochs"]], key
    assert resumed["ranks"][0]["head_sha256"] == straight["ranks"][0]["head_sha256"]


@pytest.mark.parametrize("head, ranks", CASES)
def test_a_head_learns(head_runs, head, ranks):
    straight, _, _ = head_runs[(head, ranks)]
    first, second = straight["epochs"]
    assert second["train_loss"] != first["train_loss"]  # its weights moved between the epochs


def test_two_ranks_of_the_classical_head_end_alike(head_runs):
    straight, resumed, _ = head_runs[("classical", 2)]
    assert straight["world_size"] == 2
    assert_ranks_agree(straight)
    assert_ranks_agree(resumed)


@pytest.mark.parametrize("head, ranks", CASES)
def test_the_first_line_and_the_metrics_name_the_head_and_its_trainable_parameters(head_runs, head, ranks):
    straight, _, first_line = head_runs[(head, ranks)]
    assert f"| head: {head}, {TRAINABLE[head]} trainable parameters" in first_line
    assert "qdevice" not in first_line  # no circuit to simulate
    assert straight["config"]["head"] == head and straight["trainable_parameters"] == TRAINABLE[head]
    assert straight["provenance"]["head"] == {"name": head, "trainable_parameters": TRAINABLE[head]}
    assert straight["provenance"]["qdevice"] is None and straight["config"]["circuit"] is None


def test_a_finished_runs_metrics_written_from_its_checkpoint_name_the_head(head_runs, tiny_data, tmp_path):
    _, resumed, _ = head_runs[("linear", 1)]
    finished = tmp_path / "again.json"
    checkpoint = resumed["config"]["checkpoint"]  # holds both epochs
    assert qml.main(["--data-dir", tiny_data, "--weights", "none", "--print-freq", "0", "--bn-mode", "eval",
                     "--cache-features", "--head", "linear", *EPOCHS, "--resume", checkpoint,
                     "--metrics-json", str(finished)]) == 0
    written = json.loads(finished.read_text())
    assert written["trainable_parameters"] == TRAINABLE["linear"]
    assert written["provenance"]["head"]["name"] == "linear"
