"""The variational circuit (make_quantum_net, quantum_net, --draw) against an independent numpy statevector."""

import re

import numpy as np
import pytest
import torch
from numpy_circuit import batched_expvals, expvals

import qml
from machinery import simulators

# lightning.kokkos is the tutorial's (and the default) device; "torch" is qml.py's own simulator.
QDEVICES = ["lightning.kokkos", simulators.TORCH_QDEVICE]
# Lightning devices round their torch results to torch's default dtype (float32), so about 1e-7.
VALUE_ATOL = 1e-6


@pytest.fixture
def float64_default():
    """Make torch's default dtype float64, so that lightning returns full-precision results."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def random_angles(seed, *shape):
    return np.random.default_rng(seed).uniform(-np.pi, np.pi, shape)


def run_circuit(net, inputs, weights):
    """Call a circuit with float64 tensors; returns its <Z> values as a numpy array of shape (..., n)."""
    out = net(torch.tensor(inputs, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64))
    return torch.stack([torch.as_tensor(z) for z in out], dim=-1).detach().double().numpy()


@pytest.mark.parametrize("qdevice", QDEVICES)
@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("nqubits", [1, 2, 3, 4, 5, 6])
def test_circuit_matches_numpy_statevector(qdevice, nqubits, depth):
    net = qml.make_quantum_net(nqubits, depth, nqubits * depth, qdevice)
    inputs = random_angles(nqubits * 10 + depth, nqubits)
    weights = random_angles(nqubits * 100 + depth, depth * nqubits)
    np.testing.assert_allclose(run_circuit(net, inputs, weights), expvals(inputs, weights, nqubits, depth),
                               rtol=0, atol=VALUE_ATOL)


@pytest.mark.parametrize("qdevice", QDEVICES)
@pytest.mark.parametrize("nqubits", [1, 3, 4])
def test_batched_circuit_matches_numpy_row_by_row(qdevice, nqubits):
    depth = 2
    net = qml.make_quantum_net(nqubits, depth, nqubits * depth, qdevice)
    inputs = random_angles(7, 5, nqubits)
    weights = random_angles(8, depth * nqubits)
    np.testing.assert_allclose(run_circuit(net, inputs, weights), batched_expvals(inputs, weights, nqubits, depth),
                               rtol=0, atol=VALUE_ATOL)


@pytest.mark.parametrize("qdevice", QDEVICES)
@pytest.mark.parametrize("batch_shape", [(), (3,)])
def test_circuit_returns_one_expectation_per_wire(qdevice, batch_shape):
    nqubits, depth = 3, 2
    net = qml.make_quantum_net(nqubits, depth, nqubits * depth, qdevice)
    out = net(torch.zeros(*batch_shape, nqubits, dtype=torch.float64), torch.zeros(depth * nqubits))
    assert len(out) == nqubits
    assert all(tuple(z.shape) == batch_shape for z in out)


@pytest.mark.parametrize("qdevice", QDEVICES)
def test_single_qubit_circuit_is_minus_sine_of_total_rotation(qdevice):
    # |+> rotated about Y by x + w_1 + ... + w_depth: <Z> = cos(pi/2 + total) = -sin(total).
    x, weights = 0.7, [0.3, -1.1, 0.25]
    net = qml.make_quantum_net(1, len(weights), len(weights), qdevice)
    value = run_circuit(net, [x], weights)
    np.testing.assert_allclose(value, [-np.sin(x + sum(weights))], rtol=0, atol=VALUE_ATOL)


def test_default_quantum_net_is_the_tutorials_four_qubits_depth_six():
    assert (qml.n_qubits, qml.q_depth) == (4, 6)
    inputs = random_angles(1, 4)
    weights = random_angles(2, 24)
    np.testing.assert_allclose(run_circuit(qml.make_quantum_net(4, 6, 24), inputs, weights),
                               expvals(inputs, weights, 4, 6),
                               rtol=0, atol=VALUE_ATOL)


def test_default_quantum_net_accepts_a_batch():
    inputs = random_angles(3, 2, 4)
    weights = random_angles(4, 24)
    np.testing.assert_allclose(run_circuit(qml.make_quantum_net(4, 6, 24), inputs, weights),
                               batched_expvals(inputs, weights, 4, 6), rtol=0, atol=VALUE_ATOL)


@pytest.mark.parametrize("per_sample", [False, True], ids=["batched", "per-sample"])
def test_the_dressed_head_runs_the_tutorials_quantum_net(per_sample):
    head = qml.DressedQuantumNet(per_sample=per_sample)
    assert head.quantum_net.func.func is qml.quantum_net  # the circuit the head calls, with the sizes bound


def test_make_quantum_net_defaults_to_the_tutorials_circuit_on_lightning_kokkos():
    net = qml.make_quantum_net(4, 6, 24)
    assert net.device.name == "lightning.kokkos"
    inputs, weights = random_angles(5, 4), random_angles(6, 24)
    np.testing.assert_allclose(run_circuit(net, inputs, weights), expvals(inputs, weights, 4, 6),
                               rtol=0, atol=VALUE_ATOL)


# ----------------------------------------------------------------------------
# Gradients


def central_differences(f, params, eps):
    """d f / d params[i] for every element of every tensor in params, by central differences."""
    grads = []
    for p in params:
        g = torch.zeros_like(p)
        flat, gflat = p.data.view(-1), g.view(-1)
        for i in range(flat.numel()):
            saved = flat[i].item()
            flat[i] = saved + eps
            up = f().item()
            flat[i] = saved - eps
            down = f().item()
            flat[i] = saved
            gflat[i] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("qdevice", QDEVICES)
@pytest.mark.parametrize("batch_shape", [(), (2,)], ids=["single", "batch2"])
@pytest.mark.parametrize("nqubits", [1, 2, 3, 4])
def test_circuit_gradients_match_central_finite_differences(qdevice, nqubits, batch_shape):
    depth = 2
    net = qml.make_quantum_net(nqubits, depth, nqubits * depth, qdevice)
    inputs = torch.tensor(random_angles(11 + nqubits, *batch_shape, nqubits), requires_grad=True)
    weights = torch.tensor(random_angles(12 + nqubits, depth * nqubits), requires_grad=True)
    # A random linear functional of all outputs, so every <Z_i> contributes to the gradient.
    cotangent = torch.tensor(random_angles(13, *batch_shape, nqubits))

    def objective():
        return (torch.stack(list(net(inputs, weights)), dim=-1) * cotangent).sum()

    objective().backward()
    with torch.no_grad():
        fd_inputs, fd_weights = central_differences(objective, [inputs, weights], eps=1e-4)
    torch.testing.assert_close(inputs.grad, fd_inputs, rtol=0, atol=1e-5)
    torch.testing.assert_close(weights.grad, fd_weights, rtol=0, atol=1e-5)
    assert weights.grad.abs().max() > 1e-3  # the comparison is not trivially between zeros


# ----------------------------------------------------------------------------
# --draw


def wire_labels(drawing):
    return {int(m) for m in re.findall(r"^\s*(\d+): ", drawing, flags=re.MULTILINE)}


@pytest.mark.parametrize("qdevice", QDEVICES)
@pytest.mark.parametrize("nqubits,depth", [(1, 2), (3, 2), (5, 3)])
def test_draw_prints_the_circuit_with_one_wire_per_qubit(capsys, qdevice, nqubits, depth):
    assert qml.main(["--draw", "--n-qubits", str(nqubits), "--q-depth", str(depth), "--qdevice", qdevice]) == 0
    drawing = capsys.readouterr().out
    assert wire_labels(drawing) == set(range(nqubits))
    assert drawing.count("<Z>") == nqubits
    assert drawing.count("H") == nqubits
    assert drawing.count("RY(") == nqubits * (depth + 1)


def test_draw_defaults_to_the_tutorials_four_wires_and_six_layers(capsys):
    assert qml.main(["--draw"]) == 0
    drawing = capsys.readouterr().out
    assert wire_labels(drawing) == {0, 1, 2, 3}
    assert drawing.count("<Z>") == 4
    assert drawing.count("RY(") == 4 * 7
    # Each layer's entangler holds CNOT(0,1), CNOT(2,3) and CNOT(1,2): three controls per layer.
    assert drawing.count("●") == 3 * 6


def test_draw_prints_the_circuit_of_the_options_from_any_folder(tmp_path, monkeypatch):
    from conftest import run_main

    monkeypatch.chdir(tmp_path)
    result = run_main(qml, ["--draw", "--n-qubits", "2", "--q-depth", "1"])
    assert result.returncode == 0, result.stderr
    assert wire_labels(result.stdout) == {0, 1}
    assert result.stdout.count("<Z>") == 2
