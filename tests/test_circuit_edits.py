"""Edit quantum_net and every simulator follows.

Each circuit below is an edit a researcher makes after the tutorial, written here as they would write it in
qml.py (in place of quantum_net, or of entangling_layer). For each, every installed path (the torch simulator,
Lightning through the device API or a QNode, the tutorial's per-image QNode) gives default.qubit's QNode's
values and gradients, for 1 to 8 qubits and batches of 1 and 4. An edited copy of qml.py trains to the same
printed losses on every simulator, and its checkpoint is not resumed by the original.
"""

import importlib.util

import pennylane
import pytest
import torch
from conftest import copy_program, one_stderr_line, run_main

import qml
from machinery import simulators

DEPTH = 2
QUBITS = range(1, 9)
BATCHES = (1, 4)
ATOL = 1e-6  # float64 throughout


def ring(nqubits):
    """The tutorial's CNOT ladder closed into a ring."""
    for i in range(0, nqubits - 1, 2):
        pennylane.CNOT(wires=[i, i + 1])
    for i in range(1, nqubits - 1, 2):
        pennylane.CNOT(wires=[i, i + 1])
    if nqubits > 2:
        pennylane.CNOT(wires=[nqubits - 1, 0])


def other_axes_reused(q_input_features, q_weights_flat, nqubits, depth):
    """RX and RZ about other axes, each weight used twice, the layers' weights in reverse order."""
    q_weights = q_weights_flat.reshape(depth, nqubits)
    qml.H_layer(nqubits)
    qml.RY_layer(q_input_features)
    for k in range(depth):
        qml.entangling_layer(nqubits)
        for idx in range(nqubits):
            pennylane.RX(q_weights[depth - 1 - k][idx], wires=idx)
            pennylane.RZ(q_weights[depth - 1 - k][idx], wires=idx)
    return [pennylane.expval(pennylane.PauliZ(position)) for position in range(nqubits)]


def complex_embedding_cz(q_input_features, q_weights_flat, nqubits, depth):
    """Angles embedded as phases (complex amplitudes), CZ entanglers, <X> measured."""
    q_weights = q_weights_flat.reshape(depth, nqubits)
    for idx in range(nqubits):
        pennylane.Hadamard(wires=idx)
        pennylane.RZ(q_input_features[..., idx], wires=idx)
        pennylane.S(wires=idx)
    for k in range(depth):
        for i in range(nqubits - 1):
            pennylane.CZ(wires=[i, i + 1])
        for idx in range(nqubits):
            pennylane.PhaseShift(q_weights[k][idx], wires=idx)
            pennylane.RY(q_weights[k][idx], wires=idx)
    return [pennylane.expval(pennylane.PauliX(position)) for position in range(nqubits)]


def template(q_input_features, q_weights_flat, nqubits, depth):
    """PennyLane's templates: AngleEmbedding and StronglyEntanglingLayers (three weights a qubit and layer)."""
    pennylane.AngleEmbedding(q_input_features, wires=range(nqubits), rotation="Y")
    pennylane.StronglyEntanglingLayers(q_weights_flat.reshape(depth, nqubits, 3), wires=range(nqubits))
    return [pennylane.expval(pennylane.PauliZ(position)) for position in range(nqubits)]


def reuploading(q_input_features, q_weights_flat, nqubits, depth):
    """Data re-uploading with computed angles (2 w x), controlled rotations, a Pauli word and a sum measured."""
    q_weights = q_weights_flat.reshape(depth, nqubits)
    for k in range(depth):
        for idx in range(nqubits):
            pennylane.RY(2 * q_weights[k][idx] * q_input_features[..., idx], wires=idx)
        for idx in range(nqubits - 1):
            pennylane.CRX(q_weights[k][idx], wires=[idx, idx + 1])
    if nqubits == 1:
        return [pennylane.expval(pennylane.PauliX(0))]
    first = pennylane.expval(pennylane.PauliX(0) @ pennylane.PauliY(1))
    second = pennylane.expval(pennylane.PauliZ(0) + 0.5 * pennylane.PauliX(1))
    return [first, second] + [pennylane.expval(pennylane.PauliZ(position)) for position in range(2, nqubits)]


# name: (quantum_net or None for the tutorial's, entangling_layer or None, weights per qubit and layer)
CIRCUITS = {"tutorial": (None, None, 1), "ring": (None, ring, 1), "other-axes-reused": (other_axes_reused, None, 1),
            "complex-embedding-cz": (complex_embedding_cz, None, 1), "template": (template, None, 3),
            "reuploading": (reuploading, None, 1)}
# The paths each circuit takes on Lightning: the device API where every parameter is an input, a weight or a
# constant; a QNode where quantum_net computes them.
LIGHTNING_PATH = dict.fromkeys(CIRCUITS, simulators.AdjointCircuit) | {"reuploading": pennylane.QNode}
# (qdevice, qnode): what runs the circuit in qml.py
PATHS = {"torch": (simulators.TORCH_QDEVICE, False), "lightning.kokkos": ("lightning.kokkos", False),
         "lightning.qubit": ("lightning.qubit", False), "per-sample lightning.kokkos": ("lightning.kokkos", True)}


@pytest.fixture
def edited(monkeypatch, request):
    """Make the circuit named by the test's `circuit` parameter qml.py's own; returns weights per qubit and layer."""
    net, layer, per_qubit = CIRCUITS[request.node.callspec.params["circuit"]]
    if net:
        monkeypatch.setattr(qml, "quantum_net", net)
    if layer:
        monkeypatch.setattr(qml, "entangling_layer", layer)
    return per_qubit


def values_and_gradients(net, inputs, weights, per_sample=False):
    """Values (images, outputs) and the gradients of a fixed linear function of them w.r.t. inputs and weights."""
    x, w = inputs.clone().requires_grad_(), weights.clone().requires_grad_()
    rows = [torch.stack(list(net(image, w))) for image in x] if per_sample else None
    values = torch.stack(rows) if per_sample else torch.stack(list(net(x, w)), -1)
    cotangent = torch.linspace(-1, 1, values.numel(), dtype=torch.float64).reshape(values.shape)
    (values * cotangent).sum().backward()
    return values.detach(), x.grad, w.grad


@pytest.fixture
def float64_default():
    """torch's default dtype float64, so that a Lightning QNode returns its results unrounded (in float32 it
    rounds them to the default dtype)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("circuit", CIRCUITS)
def test_every_path_gives_default_qubits_values_and_gradients(edited, circuit, path):
    qdevice, qnode = PATHS[path]
    for nqubits in QUBITS:
        n_weights = edited * DEPTH * nqubits
        reference = qml.make_quantum_net(nqubits, DEPTH, n_weights, "default.qubit")
        net = qml.make_quantum_net(nqubits, DEPTH, n_weights, qdevice, qnode=qnode)
        for batch in BATCHES:
            gen = torch.Generator().manual_seed(100 * nqubits + batch)
            inputs = (torch.rand(batch, nqubits, generator=gen, dtype=torch.float64) * 2 - 1) * torch.pi
            weights = (torch.rand(n_weights, generator=gen, dtype=torch.float64) * 2 - 1) * torch.pi
            expected = values_and_gradients(reference, inputs, weights)
            mine = values_and_gradients(net, inputs, weights, per_sample=qnode)
            for name, ours, theirs in zip(("values", "input gradients", "weight gradients"), mine, expected,
                                          strict=True):
                where = f"{nqubits} qubits, batch {batch}, {name}"
                torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL, msg=lambda m, where=where: f"{where}: {m}")
            assert expected[2].abs().max() > 1e-3  # the weights really move the values


@pytest.mark.parametrize("circuit", CIRCUITS)
def test_lightning_runs_the_circuit_through_the_device_api_unless_quantum_net_computes_its_parameters(edited, circuit):
    net = qml.make_quantum_net(3, DEPTH, edited * DEPTH * 3, "lightning.kokkos")
    assert isinstance(net, LIGHTNING_PATH[circuit])
    if LIGHTNING_PATH[circuit] is pennylane.QNode:
        assert net.qnode_reason == "quantum_net computes gate parameters from its arguments"


def test_a_circuit_the_devices_adjoint_method_refuses_runs_through_a_qnode_saying_why(monkeypatch):
    def variance(q_input_features, q_weights_flat, nqubits, depth):
        qml.RY_layer(q_input_features)
        return [pennylane.var(pennylane.PauliZ(position)) for position in range(nqubits)]

    monkeypatch.setattr(qml, "quantum_net", variance)
    net = qml.make_quantum_net(2, DEPTH, 2 * DEPTH, "lightning.kokkos")
    assert isinstance(net, pennylane.QNode)
    assert net.qnode_reason.startswith("its adjoint method refuses quantum_net ("), net.qnode_reason
    inputs = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)
    torch.stack(list(net(inputs, torch.zeros(4)))).sum().backward()
    torch.testing.assert_close(inputs.grad, 2 * torch.sin(inputs.detach()) * torch.cos(inputs.detach()))  # d sin^2


@pytest.mark.parametrize("circuit", ["reuploading"])
def test_the_first_line_says_why_lightning_runs_a_qnode(edited, circuit):
    torch.manual_seed(0)
    head = qml.DressedQuantumNet(n_qubits=3, q_depth=DEPTH)
    summary = simulators.describe_qdevice(head, "lightning.kokkos")["summary"]
    assert summary.endswith("; a QNode, since quantum_net computes gate parameters from its arguments"), summary


def test_the_dressed_head_takes_as_many_inputs_as_the_circuit_measures(monkeypatch):
    def one_parity(q_input_features, q_weights_flat, nqubits, depth):
        qml.RY_layer(q_input_features)
        qml.RY_layer(q_weights_flat.reshape(depth, nqubits)[0])
        return [pennylane.expval(pennylane.PauliZ(0) @ pennylane.PauliZ(1))]

    monkeypatch.setattr(qml, "quantum_net", one_parity)
    torch.manual_seed(0)
    head = qml.DressedQuantumNet(n_qubits=3, q_depth=DEPTH, qdevice=simulators.TORCH_QDEVICE)
    assert head.post_net.in_features == 1
    assert head(torch.randn(2, 512)).shape == (2, 2)


@pytest.mark.parametrize("circuit", ["ring"])
def test_draw_shows_the_edited_circuit(edited, circuit, capsys):
    assert qml.main(["--draw", "--n-qubits", "4", "--q-depth", "3", "--qdevice", simulators.TORCH_QDEVICE]) == 0
    assert capsys.readouterr().out.count("●") == 4 * 3  # the tutorial's three CNOTs a layer, and the ring's


# ----------------------------------------------------------------------------
# What a checkpoint records: the circuit


def digest(nqubits=4, depth=DEPTH, qdevice=simulators.TORCH_QDEVICE):
    torch.manual_seed(0)
    return qml.DressedQuantumNet(n_qubits=nqubits, q_depth=depth, qdevice=qdevice).circuit.digest()


def test_the_circuits_digest_is_the_same_on_every_qdevice():
    assert len({digest(qdevice=qdevice) for qdevice in ("torch", "lightning.kokkos", "default.qubit")}) == 1


@pytest.mark.parametrize("circuit", ["ring", "other-axes-reused", "complex-embedding-cz"])
def test_an_edit_of_the_circuit_changes_its_digest(monkeypatch, circuit):
    tutorials = digest()
    net, layer, _ = CIRCUITS[circuit]
    monkeypatch.setattr(qml, "quantum_net", net or qml.quantum_net)
    monkeypatch.setattr(qml, "entangling_layer", layer or qml.entangling_layer)
    assert digest() != tutorials


def test_using_the_weights_in_another_order_changes_the_digest(monkeypatch):
    tutorials = digest()
    original = qml.quantum_net

    def reversed_layers(q_input_features, q_weights_flat, nqubits, depth):
        return original(q_input_features, q_weights_flat.reshape(depth, nqubits).flip(0).reshape(-1), nqubits, depth)

    monkeypatch.setattr(qml, "quantum_net", reversed_layers)
    assert digest() != tutorials


# ----------------------------------------------------------------------------
# What the torch simulator cannot run is refused at start-up, naming it and a --qdevice that can


class NoMatrixGate(pennylane.operation.Operation):
    """A gate with neither a matrix nor a decomposition."""

    num_wires = 1
    num_params = 0


def probabilities(q_input_features, q_weights_flat, nqubits, depth):
    qml.H_layer(nqubits)
    return pennylane.probs(wires=range(nqubits))


def unknown_gate(q_input_features, q_weights_flat, nqubits, depth):
    qml.H_layer(nqubits)
    NoMatrixGate(wires=0)
    return [pennylane.expval(pennylane.PauliZ(position)) for position in range(nqubits)]


@pytest.mark.parametrize("net,named", [(probabilities, "probs"), (unknown_gate, "NoMatrixGate")])
def test_what_the_torch_simulator_cannot_run_is_refused_in_one_line(monkeypatch, capsys, net, named):
    monkeypatch.setattr(qml, "quantum_net", net)
    status = qml.main(["--qdevice", simulators.TORCH_QDEVICE, "--data-dir", "/nonexistent", "--weights", "none"])
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert named in err and "--qdevice default.qubit" in err, err
    assert "/nonexistent" not in err  # refused before the data are looked at


# ----------------------------------------------------------------------------
# Training with an edited qml.py, as a researcher runs it


RING_AND_RZ = (("        qml.CNOT(wires=[i, i + 1])\n\n\ndef quantum_net",
                "        qml.CNOT(wires=[i, i + 1])\n    qml.CNOT(wires=[nqubits - 1, 0])  # closes the ring\n\n\n"
                "def quantum_net"),
               ("        qml.RY(w[..., idx], wires=idx)\n",
                "        qml.RY(w[..., idx], wires=idx)\n        qml.RZ(w[..., idx], wires=idx)  # the angle again\n"))


@pytest.fixture(scope="module")
def edited_program(tmp_path_factory):
    """A copy of the program whose qml.py closes the CNOT ladder into a ring and follows each RY by an RZ of the
    same angle (complex amplitudes, every weight and input used twice)."""
    folder = tmp_path_factory.mktemp("edited")
    copy_program(folder)
    source = (folder / "qml.py").read_text()
    for old, new in RING_AND_RZ:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    (folder / "qml.py").write_text(source)
    return folder


@pytest.fixture(scope="module")
def edited_qml(edited_program):
    """The edited qml.py, imported as a module of its own (the modules beside it are the same files)."""
    spec = importlib.util.spec_from_file_location("edited_qml", edited_program / "qml.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def edited_epochs(edited_program, edited_qml, tiny_data):
    """{qdevice: CompletedProcess}: one epoch of the edited program on each simulator, and ("original", its
    CompletedProcess): the same epoch of qml.py itself on the torch simulator."""
    common = ["--data-dir", tiny_data, "--weights", "none", "--epochs", "1", "--print-freq", "0"]
    runs = {qdevice: run_main(edited_qml, [*common, "--qdevice", qdevice,
                                           "--checkpoint", str(edited_program / f"{qdevice}.pt")])
            for qdevice in ("torch", "lightning.kokkos", "lightning.qubit", "default.qubit")}
    return dict(runs, original=run_main(qml, [*common, "--qdevice", "torch"]))


def printed_metrics(result):
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if "Ave. Loss" in line or line.startswith("Best")]


def test_an_edited_circuit_trains_to_the_same_printed_losses_on_every_simulator(edited_epochs):
    printed = {qdevice: printed_metrics(result) for qdevice, result in edited_epochs.items() if qdevice != "original"}
    assert len(printed["torch"]) == 3, printed["torch"]  # train, validation and the bests
    assert all(lines == printed["torch"] for lines in printed.values()), printed


def test_the_edited_circuit_is_what_trained(edited_epochs):
    assert printed_metrics(edited_epochs["original"]) != printed_metrics(edited_epochs["torch"])


def test_resuming_an_edited_circuits_checkpoint_with_the_original_is_refused_in_one_line(
        edited_epochs, edited_program, tiny_data, capsys):
    status = qml.main(["--data-dir", tiny_data, "--weights", "none", "--epochs", "2", "--qdevice", "torch",
                       "--resume", str(edited_program / "torch.pt")])
    assert status == 2
    assert "the checkpoint trained another circuit" in one_stderr_line(capsys.readouterr().err)
