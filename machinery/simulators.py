"""Every way qml.py simulates its quantum_net, each derived from what quantum_net records when it is traced.

- CircuitTrace: quantum_net's gates and measurements, recorded with probe tensors, and where each gate
  parameter comes from (an input angle, a weight, a constant, or something computed from them).
- TorchCircuit: qdevice "torch", a batched statevector simulator in plain torch (autograd, CPU or GPU).
- AdjointCircuit: a Lightning device through PennyLane's device API, a batch per call, adjoint Jacobians.
- memory_needed, check_memory: what a simulator needs for the circuit, against what the rank has.
- qdevice_options, start_kokkos, describe_qdevice: Kokkos' GPU, threads and execution space.
PennyLane itself loads on first use (lazy_import).
"""

import dataclasses
import functools
import hashlib
import importlib.util
import math
import re
import string
import sys
from importlib import metadata

import numpy as np
import torch

from .command_line import MAX_QUBITS, UsageError


def lazy_import(name):
    """The module `name`, loaded on the first use of one of its attributes (importlib's LazyLoader)."""
    if name in sys.modules:  # one module object, however many modules ask
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None:  # as `import name` would say
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


qml = lazy_import("pennylane")

KOKKOS_QDEVICE = "lightning.kokkos"  # PennyLane's Kokkos simulator: OpenMP on CPUs, HIP or CUDA on GPUs
TORCH_QDEVICE = "torch"  # TorchCircuit
REFERENCE_QDEVICE = "default.qubit"  # PennyLane's reference simulator: every operation and measurement
# PennyLane devices whose circuits run through the device API (AdjointCircuit) instead of a QNode.
ADJOINT_QDEVICES = (KOKKOS_QDEVICE, "lightning.qubit")
# Up to this many qubits lightning.kokkos simulates on one CPU thread: a gate on 2^13 amplitudes takes
# microseconds, less than an OpenMP team's barrier, and Kokkos' threads waiting beside torch's for the same
# cores made a 4-qubit batch take 170-450 ms instead of 13 ms on a busy 2-core machine.
KOKKOS_ONE_THREAD_QUBITS = 13


def available_qdevices():
    """Names accepted by --qdevice: every installed PennyLane device (the entry points that qml.device reads,
    found without importing PennyLane), plus our torch simulator."""
    return sorted({entry.name for entry in metadata.entry_points(group="pennylane.plugins")} | {TORCH_QDEVICE})


# ----------------------------------------------------------------------------
# What quantum_net records


class CircuitTrace:
    """quantum_net(inputs, weights) recorded once as a tape, with probe tensors that tell where each gate
    parameter comes from; `expand` (a function of a tape) decomposes what a simulator cannot run as it is.

    sources[i], for the tape's i-th parameter: ("input", j) or ("weight", j), when it is that element itself
    (a view: any indexing or reshaping of the argument); ("constant", value) when it needs no argument;
    ("computed", value) when it is calculated from them (2 * w, x * w, a template's arithmetic). A simulator
    maps the first three once; a computed one means tracing again at every call.
    """

    def __init__(self, circuit, nqubits, n_weights, expand=None):
        self.circuit, self.nqubits, self.n_weights, self.expand = circuit, nqubits, n_weights, expand
        # Distinct, unremarkable angles: a computed parameter's value then tells its formula apart.
        self.inputs = (0.11 * torch.arange(1, nqubits + 1, dtype=torch.float64)).requires_grad_()
        self.weights = (0.013 * torch.arange(1, n_weights + 1, dtype=torch.float64)).requires_grad_()
        self.tape = self.record(self.inputs, self.weights)
        self.sources = [self.source(value) for value in self.tape.get_parameters(trainable_only=False)]
        self.outputs = len(self.tape.measurements)

    def record(self, inputs, weights):
        """The (expanded) tape of quantum_net called with these tensors."""
        tape = qml.tape.make_qscript(self.circuit)(inputs, weights)
        return self.expand(tape) if self.expand else tape

    def source(self, value):
        if not isinstance(value, torch.Tensor) or not value.requires_grad:
            return "constant", value
        for kind, probe in (("input", self.inputs), ("weight", self.weights)):
            if value._base is probe and value.dim() == 0:  # torch's _base is the root of a chain of views
                return kind, value.storage_offset()
        return "computed", value

    @property
    def static(self):
        """Whether every parameter is an input, a weight or a constant (no tracing at every call)."""
        return all(kind != "computed" for kind, _ in self.sources)

    def depends_on_inputs(self, index):
        """Whether the tape's index-th parameter changes with the inputs (then it differs between images)."""
        kind, value = self.sources[index]
        if kind != "computed":
            return kind == "input"
        return torch.autograd.grad(value.sum(), self.inputs, retain_graph=True, allow_unused=True)[0] is not None

    def slots(self, kind):
        """(tape parameter index, element) of every parameter of this kind."""
        return [(i, where) for i, (k, where) in enumerate(self.sources) if k == kind]

    def description(self):
        """One line per gate and measurement: its name, wires and parameters (x3: input 3, w7: weight 7,
        values otherwise), templates decomposed into gates. A checkpoint keeps its digest."""
        names = iter(self.parameter_names())
        lines = [f"{op.name}{list(op.wires)}({', '.join(next(names) for _ in op.data)})"
                 for op in self.tape.operations]
        return lines + [str(measurement) for measurement in self.tape.measurements]

    def parameter_names(self):
        for kind, where in self.sources:
            if kind in ("input", "weight"):
                yield f"{kind[0] if kind == 'weight' else 'x'}{where}"
            else:
                yield np.array2string(np.round(qml.math.toarray(qml.math.detach(where)), 9), separator=",")

    def digest(self):
        return hashlib.sha256("\n".join(self.description()).encode()).hexdigest()

    def draw(self, inputs, weights):
        """quantum_net as PennyLane draws a QNode, with these arguments."""
        return qml.drawer.tape_text(qml.tape.make_qscript(self.circuit)(inputs, weights), decimals=2)


def decomposed_templates(tape):
    """The tape with every operation that has no matrix (a template) replaced by its decomposition."""
    (tape,), _ = qml.devices.preprocess.decompose(
        tape, stopping_condition=lambda op: op.has_matrix or not op.has_decomposition, skip_initial_state_prep=False)
    return tape


# ----------------------------------------------------------------------------
# TorchCircuit: gates on a batched state, one block of gates at a time


FUSED_WIRES = 4  # gates are fused into blocks of at most this many wires: a 16 x 16 matrix at most
MATRIX_WIRES = 6  # an operation on more wires (and without a decomposition) is refused
LETTERS = string.ascii_letters


def ry_matrices(theta):
    """RY(theta) = exp(-i theta Y / 2), real: (..., 2, 2). Its entries cos(theta/2 + 0, pi/2, -pi/2, 0) =
    (cos, -sin, sin, cos) come from one cosine: fewer operations for autograd to record than four."""
    return torch.cos(torch.add(ry_offsets(theta.device), theta.unsqueeze(-1), alpha=0.5)).unflatten(-1, (2, 2))


@functools.cache
def ry_offsets(device):
    return torch.tensor([0.0, math.pi / 2, -math.pi / 2, 0.0], dtype=torch.float64, device=device)


def rz_matrices(theta):
    phase = torch.exp(0.5j * theta)
    zero = torch.zeros_like(phase)
    return torch.stack((phase.conj(), zero, zero, phase), -1).unflatten(-1, (2, 2))


def rx_matrices(theta):
    cos, sin = torch.cos(theta / 2).to(torch.complex128), -1j * torch.sin(theta / 2)
    return torch.stack((cos, sin, sin, cos), -1).unflatten(-1, (2, 2))


def phase_shift_matrices(phi):
    phase = torch.exp(1j * phi)
    one, zero = torch.ones_like(phase), torch.zeros_like(phase)
    return torch.stack((one, zero, zero, phase), -1).unflatten(-1, (2, 2))


# One-parameter gates whose matrices are written here for speed (PennyLane's compute_matrix builds them the
# same way but with more dispatch); every other gate's matrix comes from PennyLane.
KERNELS = {"RY": ry_matrices, "RZ": rz_matrices, "RX": rx_matrices, "PhaseShift": phase_shift_matrices}
REAL_KERNELS = ("RY",)


def kron(factors):
    """Kronecker product of (batch, k, 2, 2) one-wire matrices (batch 1 broadcasts): entry (i, j) is the product
    over wires w of factor w's entry (bit w of i, bit w of j), gathered in one index and multiplied in one
    product, which autograd records as two operations instead of 3 (k - 1)."""
    batch, k = factors.shape[:2]
    entries = factors.reshape(batch, 4 * k).index_select(1, kron_index(k, factors.device))
    return entries.reshape(batch, k, 2**k, 2**k).prod(1)


@functools.cache
def kron_index(k, device):
    """(k x 2^k x 2^k,): where factor w's entry for (i, j) is in a (k x 2 x 2) flattening."""
    bits = (np.arange(2**k)[:, None] >> np.arange(k - 1, -1, -1)) & 1  # bits[i, w], wire 0 the most significant
    index = 4 * np.arange(k)[:, None, None] + 2 * bits.T[:, :, None] + bits.T[:, None, :]
    return torch.tensor(index.reshape(-1), device=device)


@dataclasses.dataclass
class Gate:
    op: object  # the traced operation
    slots: list  # per parameter, its column in a call's values, or None for a constant
    batched: bool  # whether a parameter depends on the inputs (one matrix per image), else one for the batch
    matrix: torch.Tensor = None  # a gate without parameters'


@dataclasses.dataclass
class Block:
    """Consecutive gates applied to the state as one matrix on `wires` (sorted, but a "gate" block's).

    kind "fixed": gates without parameters, multiplied once; "product": one-wire gates on distinct wires,
    their Kronecker product at every call; "gate": one gate with parameters on more wires.
    """

    kind: str
    wires: list
    gates: list = dataclasses.field(default_factory=list)  # Gates
    matrix: torch.Tensor = None  # a fixed block's
    layer: tuple = None  # a product block of gates of one kernel: (its name, their columns)
    batched: bool = False  # one matrix per image (else one for the batch)
    contiguous: bool = False

    def takes(self, op, variable):
        if self.kind == "fixed" and not variable:
            return len(set(self.wires) | set(op.wires)) <= FUSED_WIRES
        if self.kind == "product" and len(op.wires) == 1:
            return op.wires[0] not in self.wires and len(self.wires) < FUSED_WIRES
        return False

    def finish(self):
        """Sort a product block's gates by wire (its Kronecker product's order) and settle what calls read."""
        if self.kind == "product":
            self.gates.sort(key=lambda gate: gate.op.wires[0])
        self.batched = self.kind != "fixed" and any(gate.batched for gate in self.gates)
        # Wires w, w+1, ...: the state then takes the matrix as one matmul.
        self.contiguous = self.wires == list(range(self.wires[0], self.wires[0] + len(self.wires)))


class TorchCircuit:
    """quantum_net simulated in torch on a batch of states of 2^n amplitudes (wire 0 most significant).

    Gates are fused into blocks of at most FUSED_WIRES wires (Block), each applied as one matrix product, so
    memory grows as batch x 2^n; amplitudes are real when every gate is (H, RY, CNOT, CZ, ...), complex
    otherwise. Gradients come from autograd. Measurements: expectation values of Pauli words and their sums.
    """

    def __init__(self, circuit, nqubits, n_weights):
        self.func, self.nqubits = circuit, nqubits
        self.trace = CircuitTrace(circuit, nqubits, n_weights, expand=expanded_for_torch)
        check_measurements(self.trace.tape)
        self.variable = [i for i, (kind, _) in enumerate(self.trace.sources) if kind != "constant"]
        self.blocks = fuse(self.trace, self.variable)
        gates = [gate for block in self.blocks for gate in block.gates]
        self.real = all(not gate.matrix.is_complex() if gate.matrix is not None else gate.op.name in REAL_KERNELS
                        for gate in gates)
        self.dtype = torch.float64 if self.real else torch.complex128
        for block in self.blocks:
            block.matrix = block.matrix.to(self.dtype) if block.matrix is not None else None
            for gate in block.gates:
                gate.matrix = gate.matrix.to(self.dtype) if gate.matrix is not None else None
        self.measurements = [pauli_terms(m.obs) for m in self.trace.tape.measurements]
        self.z_table = z_table(self.measurements, nqubits)
        # The fixed blocks before the first parameter prepare the same state for every image: prepared once, on
        # the device of the first call (move_to), not here, where a state of 30 qubits would take 8 GiB.
        self.preparation, self.start, self.device = [], None, torch.device("cpu")
        while self.blocks and self.blocks[0].kind == "fixed":
            self.preparation.append(self.blocks.pop(0))
        # Where each variable parameter is in cat(inputs, weights); None: traced again at every call.
        self.gather = (torch.tensor([where + (nqubits if kind == "weight" else 0)
                                     for kind, where in (self.trace.sources[i] for i in self.variable)])
                       if self.trace.static else None)

    def parameters(self, inputs, weights):
        """(batch, variable parameters) of this call: gathered once, or from a new trace."""
        if self.gather is not None:
            source = torch.cat((inputs, weights.expand(len(inputs), -1)), -1)
            return source.index_select(1, self.gather)  # (index_select: fancy indexing ran threads here)
        tape = self.trace.record(inputs, weights)
        gates = [(op.name, op.wires) for op in tape.operations]
        if gates != [(op.name, op.wires) for op in self.trace.tape.operations]:
            raise RuntimeError("quantum_net's gates changed with its arguments' values; TorchCircuit needs the "
                               "same gates at every call")
        values = tape.get_parameters(trainable_only=False)
        return torch.stack([torch.as_tensor(values[i], device=inputs.device).double().expand(len(inputs))
                            for i in self.variable], -1)

    def __call__(self, q_input_features, q_weights_flat):
        values = self.gate_values(q_input_features, q_weights_flat)
        shared = values[:1]  # a gate that depends on no input takes one matrix for the batch
        state = self.start.expand(len(values), -1)
        for block in self.blocks:
            state = self.apply(block, self.block_matrix(block, values if block.batched else shared), state)
        return outputs(self.expvals(state), q_input_features)

    def gate_values(self, q_input_features, q_weights_flat):
        """(images, parameters): each image's values of the circuit's gate parameters, float64, on the inputs'
        device (where the simulator moves on first use)."""
        inputs = q_input_features.to(torch.float64).reshape(-1, self.nqubits)
        if self.start is None or inputs.device != self.device:
            self.move_to(inputs.device)
        return self.parameters(inputs, q_weights_flat.to(torch.float64))

    def block_matrix(self, block, values):
        """(batch or 1, 2^k, 2^k), or (2^k, 2^k) for a fixed block."""
        if block.kind == "fixed":
            return block.matrix
        if block.kind == "gate":
            return gate_matrix(block.gates[0], values, self.dtype)
        if block.layer is not None:  # one kernel for all its gates (a layer of RY, say)
            kernel, columns = block.layer
            return kron(KERNELS[kernel](values.index_select(1, columns)).to(self.dtype))
        return kron(torch.stack([gate_matrix(gate, values, self.dtype).expand(len(values), 2, 2)
                                 for gate in block.gates], 1))

    def apply(self, block, matrix, state):
        """matrix ((batch or 1,) 2^k, 2^k) on the block's wires of the (batch, 2^n) state, never broadcasting the
        matrix over the other wires' amplitudes (a matmul would materialise it that many times)."""
        k, n = len(block.wires), self.nqubits
        if matrix.dim() == 3 and len(matrix) == 1:
            matrix = matrix[0]  # one matrix for the batch
        if k == n:  # the block spans the state
            return state @ matrix.mT if matrix.dim() == 2 else (state.unsqueeze(1) @ matrix.mT).squeeze(1)
        if block.contiguous and block.wires[-1] == n - 1:  # (batch, 2^first, 2^k): rows times the matrix
            rows = state.reshape(len(state), -1, 2**k)
            return (rows @ matrix.transpose(-1, -2)).reshape(len(state), -1)
        if block.contiguous and block.wires[0] == 0:  # (batch, 2^k, 2^rest): the matrix times columns
            return (matrix @ state.reshape(len(state), 2**k, -1)).reshape(len(state), -1)
        matrix = matrix.reshape(*matrix.shape[:-2], *[2] * (2 * k))
        equation = apply_equation(block.wires, n, matrix.dim() > 2 * k)
        return torch.einsum(equation, matrix, state.reshape(len(state), *[2] * n)).reshape(len(state), -1)

    def expvals(self, state):
        """(batch, measurements)."""
        probs = state * state if not state.is_complex() else state.real**2 + state.imag**2
        if self.z_table is not None:
            return probs @ self.z_table
        probs, state = (tensor.reshape(len(state), *[2] * self.nqubits) for tensor in (probs, state))
        return torch.stack([expectation(state, probs, terms) for terms in self.measurements], -1)

    def move_to(self, device):
        """Keep the circuit's constant tensors, and the prepared state, on the device of the inputs (the rank's)."""
        self.device, self.gather = device, self.gather.to(device) if self.gather is not None else None
        self.z_table = self.z_table.to(device) if self.z_table is not None else None
        for block in self.blocks:
            block.matrix = block.matrix.to(device) if block.matrix is not None else None
            block.layer = (block.layer[0], block.layer[1].to(device)) if block.layer else None
            for gate in block.gates:
                gate.matrix = gate.matrix.to(device) if gate.matrix is not None else None
        self.start = torch.zeros(1, 2**self.nqubits, dtype=self.dtype, device=device)
        self.start[0, 0] = 1
        for block in self.preparation:
            self.start = self.apply(block, block.matrix.to(device), self.start)

    def memory_bytes(self, batch, nqubits=None):
        """About what a batch's forward and backward pass keep at once: the states autograd saves (one per
        block with parameters), the states being computed and their gradients (5, measured), for nqubits (default:
        the circuit's;
        another count scales the blocks with the width, as layered circuits grow)."""
        nqubits = nqubits or self.nqubits
        saved = sum(block.kind != "fixed" for block in self.blocks) * nqubits / self.nqubits
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return int((math.ceil(saved) + 5) * batch * 2**nqubits * itemsize)


Z_TABLE_ENTRIES = 2**16  # up to this size a table of signs measures every <Z word> in one matmul


def outputs(expvals, q_input_features):
    """(images, measurements) expectation values as the list a QNode returns, shaped and typed as its inputs."""
    return list(expvals.to(q_input_features.dtype).reshape(*q_input_features.shape[:-1], -1).unbind(-1))


def z_table(measurements, nqubits):
    """(2^n, measurements) of coefficient x (-1)^(bits on the word's wires), when every measurement is one
    coefficient times a word of Z only and the table is small; else None."""
    if 2**nqubits * len(measurements) > Z_TABLE_ENTRIES:
        return None
    if not all(len(terms) == 1 and set(terms[0][1].values()) <= {"Z"} for terms in measurements):
        return None
    bits = (np.arange(2**nqubits)[:, None] >> np.arange(nqubits - 1, -1, -1)) & 1  # bits[j, wire]
    columns = [coeff * (-1.0) ** bits[:, list(word)].sum(1) for ((coeff, word),) in measurements]
    return torch.tensor(np.stack(columns, 1), dtype=torch.float64)


def torch_can_run(op):
    return op.has_matrix and len(op.wires) <= MATRIX_WIRES and op.name != "GlobalPhase"


def expanded_for_torch(tape):
    """The tape decomposed into gates TorchCircuit runs; what it cannot is refused in one line."""
    try:
        (tape,), _ = qml.devices.preprocess.decompose(tape, stopping_condition=torch_can_run,
                                                      skip_initial_state_prep=False, name="--qdevice torch")
    except qml.exceptions.DeviceError as err:
        if any(isinstance(op, qml.operation.Channel) for op in tape.operations):  # noise: a mixed state
            raise UsageError(f"{err} (in quantum_net): --qdevice torch simulates pure states; use --qdevice "
                             f"default.mixed, which simulates channels") from None
        raise UsageError(f"{err} (in quantum_net); use --qdevice {REFERENCE_QDEVICE}, which simulates every "
                         f"PennyLane operation") from None
    return tape


def check_measurements(tape):
    for measurement in tape.measurements:
        if not (isinstance(measurement, qml.measurements.ExpectationMP) and measurement.obs is not None
                and measurement.obs.pauli_rep is not None):
            raise UsageError(f"--qdevice torch measures expectation values of Pauli words, not {measurement} "
                             f"(in quantum_net); use --qdevice {REFERENCE_QDEVICE}")


def fuse(trace, variable):
    """The tape's gates as Blocks; `variable`: the tape parameter indices that are a call's values' columns."""
    column = {index: position for position, index in enumerate(variable)}
    blocks, index = [], 0
    for op in trace.tape.operations:
        params = range(index, index + len(op.data))
        index += len(op.data)
        slots = [column.get(i) for i in params]  # None: a constant
        gate = Gate(op, slots, any(trace.depends_on_inputs(i) for i in params))
        variable_gate = any(slot is not None for slot in slots)
        if not variable_gate:
            gate.matrix = constant_matrix([op], op.wires)
        if not blocks or not blocks[-1].takes(op, variable_gate):
            blocks.append(Block("fixed" if not variable_gate else "product" if len(op.wires) == 1 else "gate", []))
        block = blocks[-1]
        block.gates.append(gate)
        block.wires = sorted(set(block.wires) | set(op.wires)) if block.kind != "gate" else list(op.wires)
    for block in blocks:
        block.finish()
        if block.kind == "fixed":
            block.matrix = constant_matrix([gate.op for gate in block.gates], block.wires)
        names = {gate.op.name for gate in block.gates}
        if block.kind == "product" and len(names) == 1 and names <= set(KERNELS) and all(
                gate.slots[0] is not None for gate in block.gates):
            block.layer = names.pop(), torch.tensor([gate.slots[0] for gate in block.gates])
    return blocks


def constant_matrix(ops, wires):
    """The product of these gates without parameters on `wires`: real when it is."""
    matrix = torch.as_tensor(np.asarray(qml.matrix(qml.tape.QuantumScript(ops), wire_order=wires)),
                             dtype=torch.complex128)
    return matrix.real.clone() if not matrix.imag.any() else matrix


def gate_matrix(gate, values, dtype):
    """The gate's matrix at this call's parameter values ((batch, variable parameters)): (batch, 2^k, 2^k)."""
    if gate.matrix is not None:
        return gate.matrix
    params = [values[:, slot] if slot is not None else value
              for slot, value in zip(gate.slots, gate.op.data, strict=True)]
    if gate.op.name in KERNELS:
        return KERNELS[gate.op.name](params[0]).to(dtype)
    bound = qml.ops.functions.bind_new_parameters(gate.op, params)
    return torch.as_tensor(qml.matrix(bound)).to(dtype).expand(len(values), -1, -1)


def apply_equation(wires, nqubits, batched_matrix):
    """torch.einsum's equation applying a (batched) matrix on `wires` to a (batch, 2, ..., 2) state."""
    axes = LETTERS[1:nqubits + 1]
    new = LETTERS[nqubits + 1:nqubits + 1 + len(wires)]
    old = "".join(axes[w] for w in wires)
    out = axes
    for wire, letter in zip(wires, new, strict=True):
        out = out.replace(axes[wire], letter)
    matrix = ("a" if batched_matrix else "") + new + old
    return f"{matrix},a{axes}->a{out}"


def pauli_terms(observable):
    """[(coefficient, {wire: "X" | "Y" | "Z"})] of an observable that is a sum of Pauli words."""
    return [(float(np.real(coeff)), dict(word)) for word, coeff in observable.pauli_rep.items()]


def expectation(state, probs, terms):
    """<state| sum of coefficient x Pauli word |state> per batch element; probs: |state|^2, as state's shape."""
    total = 0
    for coeff, word in terms:
        value = z_expectation(probs, word) if set(word.values()) <= {"Z"} else word_expectation(state, word)
        total = total + coeff * value
    return total


def z_expectation(probs, word):
    """<Z...Z> on the word's wires: the marginal probabilities of those wires (autograd keeps no state for a
    sum) against their parities."""
    wires = sorted(word)
    marginal = probs.sum([1 + wire for wire in range(probs.dim() - 1) if wire not in word]).reshape(len(probs), -1)
    parity = (np.arange(2 ** len(wires))[:, None] >> np.arange(len(wires) - 1, -1, -1)) & 1
    signs = torch.tensor((-1.0) ** parity.sum(1), dtype=probs.dtype, device=probs.device)
    return marginal @ signs


def word_expectation(state, word):
    """<P> = i^(Ys) sum_j conj(psi[j ^ flips]) psi[j] (-1)^(j's bits on Y and Z wires): X and Y flip a wire,
    Y and Z give a sign to its 1."""
    flips = [1 + wire for wire, pauli in word.items() if pauli in "XY"]
    signed = state
    for wire, pauli in word.items():
        if pauli in "YZ":
            sign = torch.tensor([1.0, -1.0], dtype=torch.float64, device=state.device)
            signed = signed * sign.reshape(2, *[1] * (state.dim() - 2 - wire))
    other = state.flip(flips) if flips else state
    value = (other.conj() * signed).flatten(1).sum(1)
    ys = sum(pauli == "Y" for pauli in word.values())
    return (value * 1j**ys).real if ys or value.is_complex() else value


# ----------------------------------------------------------------------------
# AdjointCircuit: a Lightning device, a batch per call


class NoAdjoint(Exception):
    """Why a device's adjoint method cannot take this circuit as AdjointCircuit runs it (a QNode then does)."""


class AdjointCircuit:
    """quantum_net on a Lightning device through PennyLane's device API: per batch one call of the device's
    execute_and_compute_derivatives (execute without gradients), one tape per image, adjoint Jacobians computed
    with the values. A QNode's workflow around each call (tape construction, transforms, interface) costs more
    than simulating this small circuit; the device's work is the same. Values come back in float64 (a QNode
    rounds them to its float32 inputs' dtype; the dressed head rounds them the same way).

    The tape is quantum_net traced once and prepared by the device's own transforms (its decompositions and
    checks); each call binds the batch's values where the trace found them. Raises NoAdjoint when the device
    refuses the circuit or a parameter is computed (the QNode traces it at every call instead).
    """

    def __init__(self, circuit, nqubits, n_weights, dev):
        self.func, self.device, self.nqubits = circuit, dev, nqubits
        self.config = dev.setup_execution_config(qml.devices.ExecutionConfig(gradient_method="adjoint"))
        program = dev.preprocess_transforms(self.config)
        try:
            self.trace = CircuitTrace(circuit, nqubits, n_weights, expand=lambda tape: one_tape(program, tape))
        except (qml.exceptions.DeviceError, qml.exceptions.DecompositionUndefinedError, ValueError) as err:
            raise NoAdjoint(f"its adjoint method refuses quantum_net ({' '.join(str(err).split())})") from None
        if not self.trace.static:
            raise NoAdjoint("quantum_net computes gate parameters from its arguments")
        inputs, weights = self.trace.slots("input"), self.trace.slots("weight")
        self.input_slots, self.inputs = [i for i, _ in inputs], [j for _, j in inputs]
        self.weight_slots, self.weights = [i for i, _ in weights], [j for _, j in weights]
        self.template = self.trace.tape.bind_new_parameters(
            [qml.math.toarray(qml.math.detach(value)) for value in self.trace.tape.get_parameters(False)],
            range(self.trace.tape.num_params))
        self.template.trainable_params = sorted(self.input_slots + self.weight_slots)
        self.gather = torch.tensor([self.inputs[self.input_slots.index(i)] if i in self.input_slots
                                    else nqubits + self.weights[self.weight_slots.index(i)]
                                    for i in self.template.trainable_params])

    def tapes(self, inputs, weights):
        """One tape per image. The weights are bound once per batch: binding all of a tape's parameters
        anew for every image took 9x longer (0.5 ms a tape, most of a batch's call)."""
        shared = self.template.bind_new_parameters(weights.detach().cpu().double().numpy()[self.weights],
                                                   self.weight_slots)
        angles = inputs.detach().cpu().double().numpy()[:, self.inputs]
        return [shared.bind_new_parameters(image, self.input_slots) for image in angles]

    def __call__(self, q_input_features, q_weights_flat):
        inputs = q_input_features.reshape(-1, self.nqubits)
        tapes = self.tapes(inputs, q_weights_flat)
        if torch.is_grad_enabled() and (q_input_features.requires_grad or q_weights_flat.requires_grad):
            # The tapes' trainable parameters, from the arguments: autograd sums a reused one's gradients.
            source = torch.cat((inputs.double(), q_weights_flat.double().expand(len(inputs), -1)), -1)
            values = source.index_select(1, self.gather.to(source.device))
            expvals = AdjointExpvals.apply(values, self, tapes)
        else:
            expvals = torch.from_numpy(np.array(self.device.execute(tapes, self.config))).reshape(len(tapes), -1)
        expvals = expvals.reshape(*q_input_features.shape[:-1], -1).to(q_input_features.device)
        return list(expvals.unbind(-1))


def one_tape(program, tape):
    tapes, _ = program((tape,))
    if len(tapes) != 1 or len(tapes[0].measurements) != len(tape.measurements):
        raise ValueError("the device splits quantum_net into several circuits")
    return tapes[0]


class AdjointExpvals(torch.autograd.Function):
    """Expectation values of an AdjointCircuit's tapes, (images, measurements), from their trainable
    parameters (images, parameters); backward contracts the Jacobians computed with them."""

    @staticmethod
    def forward(ctx, values, net, tapes):
        results, jacobians = net.device.execute_and_compute_derivatives(tapes, net.config)
        ctx.jacobians = torch.from_numpy(np.array(jacobians)).reshape(len(tapes), net.trace.outputs, -1)
        ctx.like = values.device, values.dtype
        return torch.from_numpy(np.array(results)).reshape(len(tapes), net.trace.outputs)

    @staticmethod
    def backward(ctx, grad_expvals):
        grads = torch.einsum("iw,iwp->ip", grad_expvals.cpu().double(), ctx.jacobians)
        return grads.to(*ctx.like), None, None


# ----------------------------------------------------------------------------
# Memory: what a simulator needs, against what the rank has


def memory_needed(net, qdevice, batch, nqubits=None):
    """(bytes, what they hold) for one training batch of `net` (make_quantum_net's) at nqubits qubits."""
    n = nqubits or net.trace.nqubits
    state = 2**n * 16  # complex128 amplitudes
    scale = n / net.trace.nqubits
    if isinstance(net, TorchCircuit):
        return net.memory_bytes(batch, n), f"a batch of {batch} states and those autograd keeps for the backward pass"
    if qdevice.startswith("lightning."):  # adjoint: the state, its adjoint, one per measured observable and work
        copies = math.ceil(net.trace.outputs * scale) + 4
        return copies * state, f"{copies} states of the adjoint method"
    gates = math.ceil(len(net.trace.tape.operations) * scale) + 3
    if qdevice == "default.mixed":  # density matrices: 4^n entries (--noise)
        return gates * batch * state * 2**n, f"a batch of {batch} density matrices for each of {gates} gates"
    return gates * batch * state, f"a batch of {batch} states for each of {gates} gates (backpropagation)"


def fits(net, qdevice, batch, available):
    """The largest qubit count (1..MAX_QUBITS) whose estimate fits in `available` bytes, or 0."""
    return max((n for n in range(1, MAX_QUBITS + 1) if memory_needed(net, qdevice, batch, n)[0] <= available),
               default=0)


def check_memory(net, qdevice, batch, available, where):
    """Refuse, in one line, a circuit whose estimated memory exceeds what the rank has."""
    needed, what = memory_needed(net, qdevice, batch)
    if needed <= available:
        return
    largest = fits(net, qdevice, batch, available)
    advice = f"the largest that fits is --n-qubits {largest}" if largest else "no qubit count fits"
    raise UsageError(f"--n-qubits {net.trace.nqubits} on --qdevice {qdevice} needs about {size(needed)} "
                     f"({what}) but {where} has {size(available)}; {advice} (or give the rank more memory)")


def size(nbytes):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        nbytes /= 1024


# ----------------------------------------------------------------------------
# Lightning-Kokkos: its GPU, threads and execution space


def qdevice_options(qdevice, device_id, nqubits):
    """lightning.kokkos' settings: no OMP_PROC_BIND warning (binding threads would shrink the rank's CPU mask);
    this rank's GPU (device_id), since Kokkos does not read LOCAL_RANK; one thread for a small state (see
    KOKKOS_ONE_THREAD_QUBITS). Which build is installed is known only once Kokkos has started, so a GPU rank
    gets both: a HIP or CUDA build simulates on the GPU (the thread count is its host space's), an OpenMP-only
    build (the registry's wheel) ignores the GPU and keeps to one thread. Only a process's first
    lightning.kokkos device initialises Kokkos, so these hold for the whole run."""
    if qdevice != KOKKOS_QDEVICE:
        return {}
    from pennylane_lightning.lightning_kokkos_ops import InitializationSettings

    settings = InitializationSettings().set_disable_warnings(True)
    if device_id is not None:
        settings = settings.set_device_id(device_id)
    if nqubits <= KOKKOS_ONE_THREAD_QUBITS:
        settings = settings.set_num_threads(1)
    return {"kokkos_args": settings}


def start_kokkos(settings):
    """Start Kokkos now with these settings (qdevice_options'), on a one-qubit circuit, then give torch back its
    threads: Kokkos shares torch's OpenMP runtime, and starting it with one thread left torch one thread too (its
    backbone then ran at half speed). Kokkos keeps the threads it started with."""
    threads = torch.get_num_threads()
    dev = qml.device(KOKKOS_QDEVICE, wires=1, **settings)
    dev.execute(qml.tape.QuantumScript([qml.Hadamard(0)], [qml.expval(qml.PauliZ(0))]))
    torch.set_num_threads(threads)


def describe_qdevice(head, qdevice):
    """Where the circuit really runs; `summary` says it in a few words.

    lightning.kokkos tells its Kokkos execution space (OpenMP on CPUs; HIP or Cuda on GPUs): make_quantum_net
    has started Kokkos.
    """
    shots = getattr(head.quantum_net, "shot_count", None)  # qpu.py's: sampled, parameter-shift gradients
    noise = getattr(head.quantum_net, "noise", None)
    sampled = (f", {shots} shots a circuit, parameter-shift gradients" if shots else "") + (
        f", noise {noise}" if noise else "")
    if qdevice == TORCH_QDEVICE:
        runs_on = str(head.q_params.device)
        kind = "exact torch simulator" if not shots else "torch simulator"
        return dict(name=qdevice, runs_on=runs_on, shots=shots,
                    summary=f"qml.py's {kind}, not a PennyLane device, on {runs_on}{sampled}")
    via = getattr(head.quantum_net, "qnode_reason", None)
    via = f"; a QNode, since {via}{sampled}" if via else sampled
    if qdevice != KOKKOS_QDEVICE:
        runs_on = "gpu" if "gpu" in qdevice else "cpu"
        return dict(name=qdevice, runs_on=runs_on, shots=shots, noise=noise,
                    summary=f"PennyLane device on the {runs_on}{via}")
    space = kokkos_space()
    runs_on = "gpu" if space["kokkos_device"] in ("Cuda", "HIP", "SYCL") else "cpu"
    summary = f"Kokkos {space['kokkos_device']}, on the {runs_on}{via}"
    return dict(name=qdevice, runs_on=runs_on, **space, shots=shots, noise=noise, summary=summary)


def kokkos_space():
    """The started Kokkos' version and default execution space (OpenMP, HIP, Cuda, ...)."""
    from pennylane_lightning.lightning_kokkos_ops import print_configuration

    config = print_configuration()
    version = re.search(r"Kokkos Version: (\S+)", config)
    space = re.search(r"Default Device: (\S+)", config)
    return dict(kokkos_version=version and version.group(1), kokkos_device=space.group(1) if space else "unknown")
