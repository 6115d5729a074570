"""The QPU as it is in the lab: finite shots, noise, the gradients hardware can compute, and what a run executed.

Everything here is applied to what quantum_net records, never to a copy of the circuit:
- --shots N: every expectation value is the mean of N samples and gradients come from the parameter-shift rule.
  On a PennyLane device, the QNode of quantum_net with qml.set_shots and diff_method="parameter-shift", its batch
  split into one tape per image (qml.transforms.broadcast_expand: PennyLane's parameter-shift rule does not take
  broadcast tapes); on qdevice "torch", SampledCircuit: the torch simulator's exact probabilities sampled, the
  shifted circuits of a batch run as one broadcast batch.
- --noise SPEC: a qml.noise.NoiseModel added to the QNode (qml.noise.add_noise), on a device that simulates
  channels (default.mixed); the torch simulator has no density matrices and refuses it in one line.
- check_runs: the QNode's circuit prepared for its device once at start-up, so that an operation, a channel or a
  measurement the device cannot run is refused in one line naming one that can, before any data are read.
- executed: the circuits and shots an epoch's images cost, for the metrics JSON.
"""

import argparse

import numpy as np
import torch

from .command_line import UsageError
from .simulators import KERNELS, REFERENCE_QDEVICE, NoAdjoint, TorchCircuit, gate_matrix, lazy_import, outputs

qml = lazy_import("pennylane")

MIXED_QDEVICE = "default.mixed"  # PennyLane's density-matrix simulator: every channel
# --noise KIND=P: the channel each kind adds, and where. Depolarizing and amplitude damping follow every gate on each
# of its wires; readout flips each measured wire's bit with probability P (a bit flip just before the measurement).
NOISE_KINDS = {"depolarizing": "DepolarizingChannel", "damping": "AmplitudeDamping", "readout": "BitFlip"}
NOISE_HELP = ("none, or KIND=P joined by '+' (no commas, so that a sweep's --vary can list several), KIND one of "
              "depolarizing (a depolarizing channel of probability P on every wire of every gate, after it), damping "
              "(amplitude damping of strength P, likewise) and readout (each measured bit flipped with probability P), "
              "e.g. depolarizing=0.01+readout=0.02; needs a mixed-state --qdevice (default.mixed)")


def noise_spec(text):
    """argparse type of --noise: the text, checked, in a canonical order ('none' for no noise) so that equal models
    compare equal in a report; noise_model builds the model."""
    if text == "none":
        return text
    terms = {}
    for term in text.split("+"):
        kind, equals, strength = term.partition("=")
        try:
            value = float(strength)
        except ValueError:
            value = None
        if not equals or kind not in NOISE_KINDS or value is None or not 0 <= value <= 1 or kind in terms:
            raise argparse.ArgumentTypeError(f"'{text}' is not a noise model: give {NOISE_HELP}")
        terms[kind] = strength
    return "+".join(f"{kind}={terms[kind]}" for kind in NOISE_KINDS if kind in terms)


def noise_strengths(spec):
    """{kind: strength} of a noise_spec ({} for none or None)."""
    if not spec or spec == "none":
        return {}
    return {kind: float(strength) for kind, _, strength in (term.partition("=") for term in spec.split("+"))}


def check_head(args):
    """Refuse --shots and --noise for a head without a circuit, in one line."""
    if args.head != "quantum" and (args.shots or noise_strengths(args.noise)):
        raise UsageError(f"--shots and --noise apply to the circuit, and --head {args.head} has none; "
                         f"use --head quantum")


def noise_model(spec):
    """The qml.noise.NoiseModel of a noise_spec, or None for no noise."""
    strengths = noise_strengths(spec)
    gates, readout = {}, {}
    for kind in ("depolarizing", "damping"):  # after every gate (a condition that always holds), on each of its wires
        if kind in strengths:
            gates[qml.BooleanFn(lambda op: True)] = on_every_wire(getattr(qml, NOISE_KINDS[kind]), strengths[kind])
    if "readout" in strengths:
        readout[qml.noise.meas_eq(qml.expval)] = qml.noise.partial_wires(qml.BitFlip, strengths["readout"])
    return qml.NoiseModel(gates, meas_map=readout) if gates or readout else None


def on_every_wire(channel, strength):
    def noise(op, **kwargs):
        for wire in op.wires:
            channel(strength, wires=wire)
    return noise


def draw_seed(seed, rank):
    """The seed of a rank's samples: the run's --seed and the rank, so that each rank draws its own."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


# ----------------------------------------------------------------------------
# A PennyLane device: the QNode of quantum_net with shots, parameter-shift and noise


def refuse_adjoint(dev, shots, noise):
    """Raise NoAdjoint, saying why, when a Lightning device's adjoint batch path (AdjointCircuit: exact values, adjoint
    Jacobians) cannot take shots (--shots, or set on the device) or --noise: a QNode runs them instead."""
    if shots or dev.shots:
        raise NoAdjoint("shots need the parameter-shift rule, which the adjoint method cannot take")
    if noise_strengths(noise):
        raise NoAdjoint("--noise adds channels, which the adjoint method cannot take")


def make_qnode(circuit, dev, shots=None, noise=None):
    """quantum_net's QNode on dev: with N shots (--shots, or shots set on the device) gradients by the
    parameter-shift rule, a batch split into one tape per image; with --noise, its noise model added."""
    finite = bool(shots or dev.shots)
    node = qml.QNode(circuit, dev, interface="torch", diff_method="parameter-shift" if finite else "best")
    if shots:
        node = qml.set_shots(node, shots)
    model = noise_model(noise)
    if model is not None:
        node = qml.noise.add_noise(node, model)
    if finite:  # after add_noise: each image's tape takes the noise
        node = qml.transforms.broadcast_expand(node)
    node.shot_count, node.noise = shots or dev.shots.total_shots, noise if noise_strengths(noise) else None
    return node


def check_runs(net, qdevice, nqubits, n_weights, noise):
    """Refuse in one line, naming a device that can, a QNode whose device cannot run quantum_net as given (an
    operation or channel it lacks, --noise on a pure-state device): prepared for the device on probe arguments."""
    inputs = torch.full((2, nqubits), 0.1, dtype=torch.float64)
    try:
        qml.workflow.construct_batch(net, level="device")(inputs, torch.full((n_weights,), 0.1, dtype=torch.float64))
    except (qml.exceptions.DeviceError, qml.exceptions.DecompositionUndefinedError, NotImplementedError,
            ValueError) as err:
        channels = noise_strengths(noise) or has_channels(net.trace.tape)
        able = MIXED_QDEVICE if channels else REFERENCE_QDEVICE
        what = f" with --noise {noise}" if noise_strengths(noise) else ""
        raise UsageError(f"--qdevice {qdevice} cannot run quantum_net{what}: {' '.join(str(err).split())}; use "
                         f"--qdevice {able}, which can") from None


def has_channels(tape):
    return any(isinstance(op, qml.operation.Channel) for op in tape.operations)


# ----------------------------------------------------------------------------
# qdevice "torch" with shots: exact probabilities sampled, parameter-shift as one broadcast batch


def torch_circuit(circuit, nqubits, n_weights, shots, noise, seed):
    """qdevice "torch": TorchCircuit (exact), or SampledCircuit with shots; --noise is refused (pure states only)."""
    if noise_strengths(noise):
        raise UsageError(f"--qdevice torch simulates pure states, not --noise {noise}; use --qdevice {MIXED_QDEVICE} "
                         f"(a density-matrix simulator)")
    return SampledCircuit(circuit, nqubits, n_weights, shots, seed) if shots else TorchCircuit(circuit, nqubits,
                                                                                               n_weights)


class SampledCircuit(TorchCircuit):
    """TorchCircuit measured as a QPU measures: each expectation value the mean of `shots` samples of the circuit's
    exact probabilities (all measured Z words from the same samples, as one execution measures every wire), and,
    under autograd, gradients by the parameter-shift rule: per image 1 + the shifted circuits (2 per parameter of
    RY, RX, RZ, ...; PennyLane's shift rule of each gate's frequencies), all run as one broadcast batch on the
    inputs' device, each sampled. Draws come from a torch.Generator seeded with `seed` on that device."""

    def __init__(self, circuit, nqubits, n_weights, shots, seed):
        super().__init__(circuit, nqubits, n_weights)
        if not all(set(word.values()) <= {"Z"} for terms in self.measurements for _, word in terms):
            raise UsageError(f"--qdevice torch with --shots samples Z words only, not {self.trace.tape.measurements} "
                             f"(in quantum_net); use --qdevice {REFERENCE_QDEVICE}")
        self.shot_count, self.seed, self.generator = shots, seed, None
        self.shifts, self.coefficients = shift_rules(self.trace, self.variable)

    def __call__(self, q_input_features, q_weights_flat):
        values = self.gate_values(q_input_features, q_weights_flat)
        if torch.is_grad_enabled() and values.requires_grad:
            expvals = ParameterShift.apply(values, self)
        else:
            expvals = self.sampled(values.detach())
        return outputs(expvals, q_input_features)

    def move_to(self, device):
        super().move_to(device)
        self.shifts, self.coefficients = self.shifts.to(device), self.coefficients.to(device)
        self.generator = torch.Generator(device=device).manual_seed(self.seed or 0)

    def sampled(self, values):
        """(rows, measurements): each row's circuit run at its values, measured with `shots` samples (exactly when
        shots is None: the parameter-shift rule on exact values, for the tests)."""
        probs = self.probabilities(values)
        return self.expvals_of(probs if self.shot_count is None else self.counts(probs) / self.shot_count)

    def probabilities(self, values):
        """(rows, 2^n): the exact outcome probabilities of each row's circuit at its values, as one batch."""
        state = self.start.expand(len(values), -1)
        for block in self.blocks:
            state = (self.apply_product(block, values, state) if block.kind == "product" else
                     self.apply(block, self.block_matrix(block, values), state))
        return (state * state if not state.is_complex() else state.real**2 + state.imag**2).clamp_min(0)

    def counts(self, probs):
        """(rows, 2^n) outcome counts of `shots` draws from each row's probabilities. With fewer outcomes than shots,
        wire by wire: each node's count split between its two values of the next wire by one binomial draw (the
        multinomial distribution in n vectorised draws instead of `shots`); else `shots` draws counted."""
        rows = len(probs)
        if probs.shape[1] > self.shot_count:
            draws = torch.multinomial(probs, self.shot_count, replacement=True, generator=self.generator)
            return torch.zeros_like(probs).scatter_add_(1, draws, torch.ones_like(draws, dtype=probs.dtype))
        counts = torch.full((rows, 1), float(self.shot_count), dtype=probs.dtype, device=probs.device)
        for wire in range(self.nqubits):
            halves = probs.reshape(rows, 2 ** (wire + 1), -1).sum(-1)  # (rows, nodes of this wire, its 0 and 1)
            zeros, ones = halves[:, 0::2], halves[:, 1::2]
            drawn = torch.binomial(counts, (zeros / (zeros + ones).clamp_min(1e-300)).clamp(0, 1),
                                   generator=self.generator)
            counts = torch.stack((drawn, counts - drawn), -1).reshape(rows, -1)
        return counts

    def apply_product(self, block, values, state):
        """A product block's one-wire gates on the (rows, 2^n) state one wire at a time: with a matrix per row, 2 x 2
        products cost a third of TorchCircuit's Kronecker product of the block (built for autograd, unused here)."""
        if block.layer is not None:
            kernel, columns = block.layer
            matrices = KERNELS[kernel](values[:, columns]).to(self.dtype)
        else:
            matrices = torch.stack([gate_matrix(gate, values, self.dtype).expand(len(values), 2, 2)
                                    for gate in block.gates], 1)
        for position, wire in enumerate(block.wires):
            split = state.reshape(len(state), 2**wire, 2, -1)
            state = (matrices[:, position, None] @ split).reshape(len(state), -1)
        return state

    def expvals_of(self, probs):
        if self.z_table is not None:
            return probs @ self.z_table
        from .simulators import expectation

        shaped = probs.reshape(len(probs), *[2] * self.nqubits)
        return torch.stack([expectation(None, shaped, terms) for terms in self.measurements], -1)

    def memory_bytes(self, batch, nqubits=None):
        """A batch and its shifted circuits as one batch, without autograd's saved states."""
        rows = batch * (1 + len(self.shifts))
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return int(4 * rows * 2 ** (nqubits or self.nqubits) * itemsize)


def shift_rules(trace, variable):
    """(shifts, coefficients) of the parameter-shift rule over a call's value columns (the tape parameters in
    `variable`): shifts (terms, columns), each row one shifted circuit's offsets; coefficients (terms, columns),
    each gradient the sum of its terms' coefficients times their circuits' values. From PennyLane's
    generate_shift_rule of each gate's parameter frequencies (two terms of +-pi/2 and 1/2 for RY)."""
    from pennylane.gradients.general_shift_rules import generate_shift_rule

    frequencies = [frequency for op in trace.tape.operations for frequency in parameter_frequencies(op)]
    rows_shift, rows_coeff = [], []
    for column, index in enumerate(variable):
        for coefficient, shift in generate_shift_rule(frequencies[index]):
            shifts, coefficients = np.zeros(len(variable)), np.zeros(len(variable))
            shifts[column], coefficients[column] = shift, coefficient
            rows_shift.append(shifts)
            rows_coeff.append(coefficients)
    return (torch.tensor(np.array(rows_shift).reshape(-1, len(variable))),
            torch.tensor(np.array(rows_coeff).reshape(-1, len(variable))))


def parameter_frequencies(op):
    if not op.data:
        return []
    try:
        return op.parameter_frequencies
    except qml.operation.ParameterFrequenciesUndefinedError:
        raise UsageError(f"--qdevice torch with --shots needs a parameter-shift rule for {op.name}, which has none; "
                         f"use --qdevice {REFERENCE_QDEVICE}") from None


class ParameterShift(torch.autograd.Function):
    """Sampled expectation values (images, measurements) of a SampledCircuit at values (images, columns); their
    gradient by the parameter-shift rule from the same broadcast batch, each shifted circuit sampled anew."""

    @staticmethod
    def forward(ctx, values, net):
        shifted = values.unsqueeze(0) + net.shifts.unsqueeze(1).to(values.dtype)  # (terms, images, columns)
        rows = torch.cat((values.unsqueeze(0), shifted)).reshape(-1, values.shape[1])
        expvals = net.sampled(rows).reshape(1 + len(net.shifts), len(values), -1)  # (1 + terms, images, outputs)
        ctx.jacobian = torch.einsum("tc,tio->ioc", net.coefficients.to(expvals.dtype), expvals[1:])
        return expvals[0]

    @staticmethod
    def backward(ctx, grad_expvals):
        return torch.einsum("io,ioc->ic", grad_expvals.to(ctx.jacobian.dtype), ctx.jacobian), None


# ----------------------------------------------------------------------------
# What a run executed


def gradient_circuits(net):
    """The shifted circuits per training image of a parameter-shift gradient, or 0 when the gradient needs none
    (adjoint, backpropagation: exact simulation)."""
    if isinstance(net, SampledCircuit):
        return len(net.shifts)
    if not getattr(net, "shot_count", None):
        return 0
    trace = net.trace
    frequencies = [frequency for op in trace.tape.operations for frequency in parameter_frequencies(op)]
    from pennylane.gradients.general_shift_rules import generate_shift_rule

    return sum(len(generate_shift_rule(frequencies[index]))
               for index, (kind, _) in enumerate(trace.sources) if kind != "constant")


def executed(head, record):
    """What an epoch's record (its train_count and val_count images, summed over ranks) executed on the circuit:
    circuits_forward (one circuit per image and phase), circuits_gradient (per training image the shifted circuits of
    its gradient), and shots_forward, shots_gradient (those circuits x --shots; 0 for exact expectation values).
    {} for a head without a circuit. Flat keys, so that pytest.approx and a CSV take a record as it is."""
    net = getattr(head, "quantum_net", None)
    if net is None:
        return {}
    circuits = dict(forward=record["train_count"] + record["val_count"],
                    gradient=record["train_count"] * gradient_circuits(net))
    shots = getattr(net, "shot_count", None) or 0
    return {**{f"circuits_{part}": count for part, count in circuits.items()},
            **{f"shots_{part}": count * shots for part, count in circuits.items()}}
