"""An independent reference for the tutorial's circuit: dense numpy matrices, Kronecker products.

Wire 0 is the leftmost Kronecker factor, i.e. the most significant bit of a basis-state index,
as in PennyLane. Nothing here is taken from qml.py.
"""

from functools import reduce

import numpy as np

I2 = np.eye(2)
HADAMARD = np.array([[1.0, 1.0], [1.0, -1.0]]) / np.sqrt(2.0)
PAULI_X = np.array([[0.0, 1.0], [1.0, 0.0]])
PAULI_Z = np.diag([1.0, -1.0])
PROJ_0 = np.diag([1.0, 0.0])
PROJ_1 = np.diag([0.0, 1.0])


def ry(theta):
    """RY(theta) = exp(-i theta Y / 2), a real matrix."""
    c, s = np.cos(theta / 2.0), np.sin(theta / 2.0)
    return np.array([[c, -s], [s, c]])


def on_wire(gate, wire, n):
    """The 2^n x 2^n matrix of a single-qubit gate acting on `wire`."""
    return reduce(np.kron, [gate if w == wire else I2 for w in range(n)])


def cnot(control, target, n):
    """The 2^n x 2^n CNOT: |0><0| on control (x) 1  +  |1><1| on control (x) X on target."""
    keep = reduce(np.kron, [PROJ_0 if w == control else I2 for w in range(n)])
    flip = reduce(np.kron, [PROJ_1 if w == control else PAULI_X if w == target else I2 for w in range(n)])
    return keep + flip


def expvals(inputs, weights, n, depth):
    """<Z_i> for i = 0..n-1 after H layer, RY(inputs), depth x [CNOT even pairs, CNOT odd pairs, RY(weights[k])]."""
    inputs = np.asarray(inputs, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64).reshape(depth, n)
    state = np.zeros(2**n)
    state[0] = 1.0
    for w in range(n):
        state = on_wire(HADAMARD, w, n) @ state
    for w in range(n):
        state = on_wire(ry(inputs[w]), w, n) @ state
    for k in range(depth):
        for i in range(0, n - 1, 2):
            state = cnot(i, i + 1, n) @ state
        for i in range(1, n - 1, 2):
            state = cnot(i, i + 1, n) @ state
        for w in range(n):
            state = on_wire(ry(weights[k, w]), w, n) @ state
    return np.array([state @ on_wire(PAULI_Z, w, n) @ state for w in range(n)])


def batched_expvals(inputs, weights, n, depth):
    """expvals for inputs of shape (..., n): returns shape (..., n)."""
    inputs = np.asarray(inputs, dtype=np.float64)
    rows = inputs.reshape(-1, n)
    out = np.stack([expvals(row, weights, n, depth) for row in rows])
    return out.reshape(inputs.shape)


def dressed_logits(features, pre_weight, pre_bias, q_params, post_weight, post_bias, n, depth):
    """The dressed head in numpy: Linear, tanh * pi/2, circuit, Linear."""
    q_in = np.tanh(features @ pre_weight.T + pre_bias) * np.pi / 2.0
    return batched_expvals(q_in, q_params, n, depth) @ post_weight.T + post_bias
