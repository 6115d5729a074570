"""The fast ways to simulate qml.py's quantum_net, and the settings of Lightning-Kokkos.

- AdjointCircuit: quantum_net on a Lightning device through PennyLane's device API, a batch per call.
- TorchCircuit: qdevice "torch", an exact batched simulator of quantum_net in plain torch (not PennyLane).
- qdevice_options, start_kokkos, describe_qdevice: Kokkos' GPU, threads and execution space.
PennyLane itself loads on first use (lazy_import): a --qdevice torch run never imports it.
"""

import functools
import importlib.util
import math
import re
import sys
from importlib import metadata

import numpy as np
import torch


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


def start_kokkos(net, nqubits, depth):
    """Run the circuit once, so that Kokkos starts now, then give torch back its threads: Kokkos shares torch's
    OpenMP runtime, and starting it with one thread (qdevice_options) left torch one thread too (its backbone
    then ran at half speed). Kokkos keeps the threads it started with."""
    threads = torch.get_num_threads()
    with torch.no_grad():
        net(torch.zeros(nqubits), torch.zeros(depth * nqubits))
    torch.set_num_threads(threads)


def describe_qdevice(head, qdevice):
    """Where the circuit really runs; `summary` says it in a few words.

    lightning.kokkos tells its Kokkos execution space (OpenMP on CPUs; HIP or Cuda on GPUs): make_quantum_net
    has started Kokkos.
    """
    if qdevice == TORCH_QDEVICE:
        runs_on = str(head.q_params.device)
        return dict(name=qdevice, runs_on=runs_on,
                    summary=f"qml.py's exact torch simulator, not a PennyLane device, on {runs_on}")
    if qdevice != KOKKOS_QDEVICE:
        runs_on = "gpu" if "gpu" in qdevice else "cpu"
        return dict(name=qdevice, runs_on=runs_on, summary=f"PennyLane device on the {runs_on}")
    from pennylane_lightning.lightning_kokkos_ops import print_configuration

    config = print_configuration()
    version = re.search(r"Kokkos Version: (\S+)", config)
    space = re.search(r"Default Device: (\S+)", config)
    space = space.group(1) if space else "unknown"
    runs_on = "gpu" if space in ("Cuda", "HIP", "SYCL") else "cpu"
    return dict(name=qdevice, runs_on=runs_on, kokkos_version=version and version.group(1), kokkos_device=space,
                summary=f"Kokkos {space}, on the {runs_on}")


class AdjointCircuit:
    """quantum_net on a Lightning device through PennyLane's device API: per batch one call of the device's
    execute_and_compute_derivatives (execute without gradients), one tape per image, adjoint Jacobians computed
    with the values. A QNode's workflow around each call (tape construction, transforms, interface) costs more
    than simulating this small circuit; the device's work is the same. Values come back in float64 (a QNode
    rounds them to its float32 inputs' dtype; the dressed head rounds them the same way).
    """

    def __init__(self, circuit, dev):
        """circuit: quantum_net with its sizes bound (a QNode's `func`, so named here too)."""
        self.func, self.device = circuit, dev
        self.nqubits, depth = circuit.keywords["nqubits"], circuit.keywords["depth"]
        self.config = dev.setup_execution_config(qml.devices.ExecutionConfig(gradient_method="adjoint"))
        # Built once; its parameters are the inputs' angles, then the weights.
        self.template = qml.tape.make_qscript(circuit)(np.zeros(self.nqubits), np.zeros(depth * self.nqubits))
        self.inputs, self.weights = range(self.nqubits), range(self.nqubits, self.template.num_params)

    def tapes(self, q_input_features, q_weights_flat):
        """One tape per image. The weights are bound once per batch: binding all of a tape's parameters
        anew for every image took 9x longer (0.5 ms a tape, most of a batch's call)."""
        shared = self.template.bind_new_parameters(q_weights_flat.detach().cpu().double().numpy(), self.weights)
        angles = q_input_features.detach().cpu().double().numpy().reshape(-1, self.nqubits)
        return [shared.bind_new_parameters(image, self.inputs) for image in angles]

    def __call__(self, q_input_features, q_weights_flat):
        tapes = self.tapes(q_input_features, q_weights_flat)
        if torch.is_grad_enabled() and (q_input_features.requires_grad or q_weights_flat.requires_grad):
            expvals = AdjointExpvals.apply(q_input_features, q_weights_flat, self, tapes)
        else:
            expvals = torch.from_numpy(np.array(self.device.execute(tapes, self.config)))
        expvals = expvals.reshape(*q_input_features.shape[:-1], self.nqubits).to(q_input_features.device)
        return list(expvals.unbind(-1))


class AdjointExpvals(torch.autograd.Function):
    """<Z> of an AdjointCircuit's tapes, (images, wires); backward contracts the Jacobians computed with them."""

    @staticmethod
    def forward(ctx, q_input_features, q_weights_flat, net, tapes):
        values, jacobians = net.device.execute_and_compute_derivatives(tapes, net.config)
        ctx.jacobians = torch.from_numpy(np.array(jacobians)).reshape(len(tapes), net.nqubits, -1)
        ctx.input_shape = q_input_features.shape
        ctx.like = (q_input_features.device, q_input_features.dtype), (q_weights_flat.device, q_weights_flat.dtype)
        return torch.from_numpy(np.array(values)).reshape(len(tapes), net.nqubits)

    @staticmethod
    def backward(ctx, grad_expvals):
        grads = torch.einsum("iw,iwp->ip", grad_expvals.cpu().double(), ctx.jacobians)  # (images, parameters)
        nqubits, (inputs_like, weights_like) = ctx.input_shape[-1], ctx.like
        grad_inputs = grads[:, :nqubits].reshape(ctx.input_shape).to(*inputs_like)
        return grad_inputs, grads[:, nqubits:].sum(0).to(*weights_like), None, None


class TorchCircuit:
    """Exact statevector simulation of `quantum_net` in plain torch, batched and autograd-differentiable.

    H, RY and CNOT are real, so the state is a real vector of 2^n amplitudes (wire 0 most significant).
    PennyLane's per-call overhead (tens of ms) dominates this tiny circuit; this avoids it.
    """

    def __init__(self, nqubits, depth):
        self.nqubits, self.depth = nqubits, depth
        bits = (np.arange(2**nqubits)[:, None] >> np.arange(nqubits - 1, -1, -1)) & 1  # bits[j, wire]
        self.z_signs = torch.tensor(1 - 2 * bits, dtype=torch.float64)  # <Z_wire> = probs @ z_signs
        after = bits.copy()  # where the entangling layer's CNOTs send each basis state
        for first in (0, 1):
            for i in range(first, nqubits - 1, 2):
                after[:, i + 1] ^= after[:, i]
        target = after @ (1 << np.arange(nqubits - 1, -1, -1))
        self.entangle_source = torch.from_numpy(np.argsort(target))  # new[j] = old[source[j]]

    @staticmethod
    def _ry_matrices(angles):
        cos, sin = torch.cos(angles / 2), torch.sin(angles / 2)
        return torch.stack((torch.stack((cos, -sin), -1), torch.stack((sin, cos), -1)), -2)

    def __call__(self, q_input_features, q_weights_flat):
        x = q_input_features.to(torch.float64)
        weights = q_weights_flat.to(torch.float64).reshape(self.depth, self.nqubits)
        # H then RY(x) on |0> leaves each wire in (cos - sin, sin + cos)(x/2) / sqrt(2): a product state.
        cos, sin = torch.cos(x / 2), torch.sin(x / 2)
        wires = torch.stack((cos - sin, sin + cos), -1) / math.sqrt(2)
        state = wires[..., 0, :]
        for wire in range(1, self.nqubits):
            state = (state[..., :, None] * wires[..., wire, None, :]).flatten(-2)
        source = self.entangle_source.to(x.device)
        for layer in weights:
            rotations = functools.reduce(torch.kron, self._ry_matrices(layer))
            state = state[..., source] @ rotations.T
        expvals = (state * state) @ self.z_signs.to(x.device)
        return list(expvals.to(q_input_features.dtype).unbind(-1))
