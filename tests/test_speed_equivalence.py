"""The fast paths compute the same thing as the slow ones.

qml.py's own torch simulator and its device-API path for Lightning (AdjointCircuit) against PennyLane's QNode,
and the dressed head's one broadcast circuit call per batch against the tutorial's one call per image
(--per-sample).
"""

import numpy as np
import pytest
import torch

import qml
from machinery import simulators

# Every device named in the spec that is installed here; all but "torch" are PennyLane's.
HEAD_QDEVICES = [d for d in ("lightning.kokkos", "lightning.qubit", "default.qubit", simulators.TORCH_QDEVICE)
                 if d in simulators.available_qdevices()]


def test_every_specified_qdevice_is_installed():
    assert HEAD_QDEVICES == ["lightning.kokkos", "lightning.qubit", "default.qubit", simulators.TORCH_QDEVICE]


# ----------------------------------------------------------------------------
# TorchCircuit vs PennyLane's default.qubit (float64 throughout)


def values_and_gradients(net, inputs, weights, cotangent):
    """<Z> values (..., n) and the gradients of sum(cotangent * <Z>) w.r.t. inputs and weights."""
    x = inputs.clone().requires_grad_(True)
    w = weights.clone().requires_grad_(True)
    values = torch.stack(list(net(x, w)), dim=-1)
    (values * cotangent).sum().backward()
    return values.detach(), x.grad, w.grad


@pytest.mark.parametrize("batch_shape", [(), (3,)], ids=["single", "batch3"])
@pytest.mark.parametrize("nqubits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_torch_simulator_matches_pennylane_values_and_gradients(nqubits, batch_shape):
    depth = 3
    gen = torch.Generator().manual_seed(nqubits)
    inputs = (torch.rand(*batch_shape, nqubits, generator=gen, dtype=torch.float64) * 2 - 1) * np.pi
    weights = (torch.rand(depth * nqubits, generator=gen, dtype=torch.float64) * 2 - 1) * np.pi
    cotangent = torch.randn(*batch_shape, nqubits, generator=gen, dtype=torch.float64)

    torch_net = qml.make_quantum_net(nqubits, depth, nqubits * depth, simulators.TORCH_QDEVICE)
    ours = values_and_gradients(torch_net, inputs, weights, cotangent)
    reference = qml.make_quantum_net(nqubits, depth, nqubits * depth, "default.qubit")
    pennylane = values_and_gradients(reference, inputs, weights, cotangent)
    for name, mine, theirs in zip(("values", "input gradients", "weight gradients"), ours, pennylane, strict=True):
        assert mine.shape == theirs.shape, name
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("qdevice", simulators.ADJOINT_QDEVICES)
@pytest.mark.parametrize("batch_shape", [(), (3,)], ids=["single", "batch3"])
@pytest.mark.parametrize("nqubits", [1, 2, 4])
def test_device_api_circuit_matches_pennylanes_qnode_values_and_gradients(qdevice, nqubits, batch_shape):
    depth = 3
    gen = torch.Generator().manual_seed(10 + nqubits)
    inputs = (torch.rand(*batch_shape, nqubits, generator=gen, dtype=torch.float64) * 2 - 1) * np.pi
    weights = (torch.rand(depth * nqubits, generator=gen, dtype=torch.float64) * 2 - 1) * np.pi
    cotangent = torch.randn(*batch_shape, nqubits, generator=gen, dtype=torch.float64)

    net = qml.make_quantum_net(nqubits, depth, nqubits * depth, qdevice)
    assert isinstance(net, simulators.AdjointCircuit)
    ours = values_and_gradients(net, inputs, weights, cotangent)
    reference = qml.make_quantum_net(nqubits, depth, nqubits * depth, "default.qubit")
    pennylane = values_and_gradients(reference, inputs, weights, cotangent)
    for name, mine, theirs in zip(("values", "input gradients", "weight gradients"), ours, pennylane, strict=True):
        assert mine.shape == theirs.shape, name
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


def test_device_api_circuit_gives_float32_inputs_float32_gradients():
    inputs = torch.rand(3, 4, requires_grad=True)
    weights = torch.rand(24, requires_grad=True)
    torch.stack(qml.make_quantum_net(4, 6, 24)(inputs, weights), dim=-1).sum().backward()
    assert (inputs.grad.dtype, weights.grad.dtype) == (torch.float32, torch.float32)


def test_per_sample_head_calls_the_circuit_through_a_qnode_as_the_tutorial():
    import pennylane

    assert isinstance(make_head("lightning.kokkos", per_sample=True).quantum_net, pennylane.QNode)


def test_torch_simulator_accepts_several_batch_dimensions():
    nqubits, depth = 3, 2
    gen = torch.Generator().manual_seed(0)
    inputs = torch.rand(2, 3, nqubits, generator=gen, dtype=torch.float64) * np.pi
    weights = torch.rand(depth * nqubits, generator=gen, dtype=torch.float64) * np.pi
    ours = torch.stack(qml.make_quantum_net(nqubits, depth, nqubits * depth, simulators.TORCH_QDEVICE)(inputs, weights),
                       dim=-1)
    pennylane = qml.make_quantum_net(nqubits, depth, nqubits * depth, "default.qubit")
    expected = torch.stack([torch.stack(list(pennylane(row, weights)), dim=-1) for row in inputs.reshape(-1, nqubits)])
    torch.testing.assert_close(ours, expected.reshape(2, 3, nqubits), rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_simulator_returns_the_inputs_dtype(dtype):
    out = qml.make_quantum_net(2, 1, 2, simulators.TORCH_QDEVICE)(torch.zeros(4, 2, dtype=dtype), torch.zeros(2))
    assert all(z.dtype == dtype for z in out)


# ----------------------------------------------------------------------------
# DressedQuantumNet: one broadcast call per batch == the tutorial's loop over images


def make_head(qdevice, per_sample, seed=3):
    torch.manual_seed(seed)
    return qml.DressedQuantumNet(qdevice=qdevice, per_sample=per_sample)


def logits_and_gradients(head, features, labels):
    logits = head(features)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    return logits.detach(), {name: p.grad for name, p in head.named_parameters()}


@pytest.mark.parametrize("qdevice", HEAD_QDEVICES)
def test_broadcast_head_matches_per_sample_loop(qdevice):
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(4, 512, generator=gen)
    labels = torch.tensor([0, 1, 1, 0])
    loop_logits, loop_grads = logits_and_gradients(make_head(qdevice, per_sample=True), features, labels)
    batch_logits, batch_grads = logits_and_gradients(make_head(qdevice, per_sample=False), features, labels)

    assert batch_logits.shape == loop_logits.shape == (4, 2)
    assert (batch_logits - loop_logits).abs().max() < 1e-6
    assert set(batch_grads) == set(loop_grads) == {"pre_net.weight", "pre_net.bias", "q_params",
                                                   "post_net.weight", "post_net.bias"}
    for name in loop_grads:
        assert loop_grads[name].abs().max() > 0, name  # every parameter really gets a gradient
        assert (batch_grads[name] - loop_grads[name]).abs().max() < 1e-6, name


@pytest.mark.parametrize("qdevice", HEAD_QDEVICES)
def test_broadcast_head_of_one_image_matches_per_sample(qdevice):
    features = torch.randn(1, 512, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([1])
    loop_logits, loop_grads = logits_and_gradients(make_head(qdevice, per_sample=True), features, labels)
    batch_logits, batch_grads = logits_and_gradients(make_head(qdevice, per_sample=False), features, labels)
    assert (batch_logits - loop_logits).abs().max() < 1e-6
    for name in loop_grads:
        assert (batch_grads[name] - loop_grads[name]).abs().max() < 1e-6, name


@pytest.mark.parametrize("qdevice", ["lightning.qubit", "default.qubit", simulators.TORCH_QDEVICE])
def test_head_logits_agree_across_qdevices(qdevice):
    # All simulators are exact: the same head on another device gives the default device's logits.
    features = torch.randn(3, 512, generator=torch.Generator().manual_seed(4))
    reference = make_head("lightning.kokkos", per_sample=False)(features)
    other = make_head(qdevice, per_sample=False)(features)
    assert (other - reference).abs().max() < 1e-6
