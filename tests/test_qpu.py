"""The QPU as it is in the lab (qpu.py): --shots, the parameter-shift rule, --noise, and what a run executed.

Statistical checks are seeded and stated as bounds: a sampled mean of N shots of a +-1 outcome of exact mean m has
standard error sqrt((1 - m^2) / N); every estimate here must lie within STANDARD_ERRORS of them (for a correct
sampler, each fails with probability 6e-5, and the seeds make every run draw the same numbers).
"""

import json
import math

import numpy as np
import pennylane
import pytest
import torch
from conftest import one_stderr_line, run_main

import qml
from machinery import qpu, report, simulators, sweep

STANDARD_ERRORS = 4
SHOTS = 2000
PENNYLANE_SHOTS_QDEVICES = ("default.qubit", "lightning.qubit")  # lightning.kokkos takes the same QNode path


def inputs_and_weights(nqubits, depth, batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = (torch.rand(batch, nqubits, generator=generator, dtype=torch.float64) * 3 - 1.5).requires_grad_()
    weights = (torch.rand(nqubits * depth, generator=generator, dtype=torch.float64) * 3 - 1.5).requires_grad_()
    return inputs, weights


def values_and_gradients(net, inputs, weights):
    values = torch.stack(list(net(inputs, weights)), -1)
    return (values.detach(), *torch.autograd.grad(values.sum(), (inputs, weights)))


@pytest.mark.parametrize("qdevice", [simulators.TORCH_QDEVICE, *PENNYLANE_SHOTS_QDEVICES])
def test_sampled_expectation_values_lie_within_a_few_standard_errors_of_the_exact_ones(qdevice):
    inputs, weights = inputs_and_weights(3, 2)
    exact = torch.stack(qml.make_quantum_net(3, 2, 6, "default.qubit")(inputs, weights), -1).detach()
    sampled = torch.stack(qml.make_quantum_net(3, 2, 6, qdevice, shots=SHOTS, seed=7)(inputs, weights), -1).detach()
    error = (1 - exact**2).clamp_min(1e-12).sqrt() / math.sqrt(SHOTS)
    assert (sampled - exact).abs().max() > 0  # sampled, not exact
    assert ((sampled - exact).abs() <= STANDARD_ERRORS * error).all(), (sampled - exact) / error
    assert torch.all((sampled * SHOTS - (sampled * SHOTS).round()).abs() < 1e-9)  # means of +-1 outcomes: k/N steps


def mixed_gates(q_input_features, q_weights_flat, nqubits, depth):
    """Gates of other shift rules: RX, RZ (complex amplitudes), CRY (four terms), a weight used twice."""
    q_weights = q_weights_flat.reshape(depth, nqubits)
    qml.H_layer(nqubits)
    qml.RY_layer(q_input_features)
    for k in range(depth):
        for idx in range(nqubits):
            pennylane.RX(q_weights[k][idx], wires=idx)
        pennylane.CRY(q_weights[k][0], wires=[0, 1])
        pennylane.RZ(q_weights[k][1], wires=1)
        qml.entangling_layer(nqubits)
    return [pennylane.expval(pennylane.PauliZ(position)) for position in range(nqubits)]


@pytest.mark.parametrize("circuit", ["tutorial", "mixed_gates"])
def test_parameter_shift_gradients_equal_autograds_without_shots(monkeypatch, circuit):
    if circuit == "mixed_gates":
        monkeypatch.setattr(qml, "quantum_net", mixed_gates)
    inputs, weights = inputs_and_weights(3, 2)
    exact = values_and_gradients(qml.make_quantum_net(3, 2, 6, simulators.TORCH_QDEVICE), inputs, weights)
    shifted_net = qpu.SampledCircuit(qml.make_quantum_net(3, 2, 6, simulators.TORCH_QDEVICE).func, 3, 6, None, 0)
    shifted = values_and_gradients(shifted_net, inputs, weights)
    for got, expected in zip(shifted, exact, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # Two circuits per RY, RX, RZ parameter (3 inputs, then per layer), four per CRY's.
    layer = 3 * 2 if circuit == "tutorial" else 3 * 2 + 4 + 2
    assert shifted_net.shifts.shape[0] == 3 * 2 + 2 * layer


@pytest.mark.parametrize("qdevice", [simulators.TORCH_QDEVICE, "default.qubit"])
def test_sampled_parameter_shift_gradients_are_unbiased(qdevice):
    inputs, weights = inputs_and_weights(2, 1, batch=1)
    _, exact_inputs, exact_weights = values_and_gradients(qml.make_quantum_net(2, 1, 2, "default.qubit"), inputs,
                                                          weights)
    exact = torch.cat((exact_inputs.flatten(), exact_weights))
    draws = 60 if qdevice == simulators.TORCH_QDEVICE else 12
    net = qml.make_quantum_net(2, 1, 2, qdevice, shots=200, seed=3)
    samples = torch.stack([torch.cat([grad.flatten() for grad in values_and_gradients(net, inputs, weights)[1:]])
                           for _ in range(draws)])
    error = samples.std(0) / math.sqrt(draws)
    assert (samples.std(0) > 0).all()  # each draw differs
    assert ((samples.mean(0) - exact).abs() <= STANDARD_ERRORS * error).all(), (samples.mean(0) - exact) / error


def test_draws_repeat_with_the_seed_and_differ_with_it():
    inputs, weights = inputs_and_weights(2, 1)

    def draw(seed):
        return torch.stack(qml.make_quantum_net(2, 1, 2, simulators.TORCH_QDEVICE, shots=100, seed=seed)(
            inputs, weights), -1)

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    assert qpu.draw_seed(42, 0) == qpu.draw_seed(42, 0) != qpu.draw_seed(42, 1)


def bloch_z(angles, depolarizing=0.0, damping=0.0, readout=0.0):
    """<Z> of one qubit after H, then RY(angle) for each angle, the noise after each gate, from its Bloch vector
    (x, z) (the y component stays 0): depolarizing p scales it by 1 - 4p/3; amplitude damping g takes x to
    sqrt(1 - g) x and z to g + (1 - g) z; a readout bit flip r scales <Z> by 1 - 2r."""
    def noise(x, z):
        x, z = (1 - 4 * depolarizing / 3) * x, (1 - 4 * depolarizing / 3) * z
        return math.sqrt(1 - damping) * x, damping + (1 - damping) * z

    x, z = noise(1.0, 0.0)  # H|0> = |+>
    for angle in angles:  # RY(a) turns (x, z) about Y: x' = x cos a + z sin a, z' = z cos a - x sin a
        x, z = noise(x * math.cos(angle) + z * math.sin(angle), z * math.cos(angle) - x * math.sin(angle))
    return (1 - 2 * readout) * z


@pytest.mark.parametrize("noise", [{"depolarizing": 0.1}, {"damping": 0.2}, {"readout": 0.05},
                                   {"depolarizing": 0.05, "damping": 0.1, "readout": 0.02}])
def test_a_noisy_circuits_expectation_value_equals_its_closed_form(noise):
    spec = qpu.noise_spec("+".join(f"{kind}={strength}" for kind, strength in noise.items()))
    net = qml.make_quantum_net(1, 1, 1, qpu.MIXED_QDEVICE, noise=spec)  # H, RY(x), RY(w) on one wire
    inputs = torch.tensor([[0.4], [-1.1]], dtype=torch.float64)
    weights = torch.tensor([0.7], dtype=torch.float64)
    values = net(inputs, weights)[0].detach().numpy()
    expected = [bloch_z([x, 0.7], **noise) for x in (0.4, -1.1)]
    np.testing.assert_allclose(values, expected, atol=1e-10)
    assert abs(expected[0] - bloch_z([0.4, 0.7])) > 0.01  # the noise changes the value


def test_noise_and_shots_together_give_the_noisy_value_within_its_standard_error():
    spec = qpu.noise_spec("depolarizing=0.1")
    net = qml.make_quantum_net(1, 1, 1, qpu.MIXED_QDEVICE, noise=spec, shots=SHOTS, seed=5)
    value = float(net(torch.tensor([[0.4]], dtype=torch.float64), torch.tensor([0.7], dtype=torch.float64))[0][0])
    expected = bloch_z([0.4, 0.7], depolarizing=0.1)
    assert value != expected and abs(value - expected) <= STANDARD_ERRORS * math.sqrt((1 - expected**2) / SHOTS)


def test_shots_set_on_the_device_are_sampled_not_dropped(monkeypatch):
    device = pennylane.device
    monkeypatch.setattr(pennylane, "device", lambda name, **options: device(name, shots=50, **options))
    net = qml.make_quantum_net(2, 1, 2, "lightning.kokkos", seed=1)
    assert net.qnode_reason == "shots need the parameter-shift rule, which the adjoint method cannot take"
    inputs, weights = inputs_and_weights(2, 1)
    values = torch.stack(net(inputs, weights), -1)
    values.sum().backward()  # a batch through parameter-shift: no traceback
    assert torch.all((values * 50 - (values * 50).round()).abs() < 1e-9)  # means of 50 outcomes
    assert qpu.gradient_circuits(net) == 2 * 4


def depolarized(q_input_features, q_weights_flat, nqubits, depth):
    qml.H_layer(nqubits)
    qml.RY_layer(q_input_features)
    pennylane.DepolarizingChannel(0.1, wires=0)
    qml.RY_layer(q_weights_flat.reshape(depth, nqubits)[0])
    return [pennylane.expval(pennylane.PauliZ(position)) for position in range(nqubits)]


@pytest.mark.parametrize("qdevice", [simulators.TORCH_QDEVICE, "lightning.kokkos", "default.qubit"])
def test_a_channel_in_quantum_net_is_refused_naming_a_device_that_runs_it(monkeypatch, qdevice):
    monkeypatch.setattr(qml, "quantum_net", depolarized)
    with pytest.raises(qml.UsageError, match="use --qdevice default.mixed"):
        qml.make_quantum_net(2, 1, 2, qdevice)
    net = qml.make_quantum_net(2, 1, 2, qpu.MIXED_QDEVICE)
    value = net(torch.tensor([0.0, 0.0]), torch.zeros(2))[0]
    assert abs(float(value)) < 1e-12  # H then RY(0): <Z> = 0, depolarized or not


@pytest.mark.parametrize("argv, says", [
    (["--head", "classical", "--shots", "100"], "--head quantum"),
    (["--head", "linear", "--noise", "readout=0.1"], "--head quantum"),
    (["--noise", "depolarizing=0.01"], "use --qdevice default.mixed"),
    (["--noise", "damping=0.01", "--qdevice", "torch"], "use --qdevice default.mixed"),
    (["--noise", "depolarizing=2"], "not a noise model"),
    (["--noise", "depolarizing=0.1,readout=0.1"], "not a noise model"),
    (["--shots", "0"], "--shots"),
])
def test_what_a_path_cannot_run_is_refused_in_one_line_before_the_data_are_read(tmp_path, argv, says):
    result = run_main(qml, ["--data-dir", str(tmp_path / "never-read"), "--weights", "none", *argv])
    assert result.returncode == 2
    assert says in one_stderr_line(result.stderr) and "never-read" not in result.stderr


def test_noise_specs_are_written_one_way():
    assert qpu.noise_spec("readout=0.02+depolarizing=0.01") == "depolarizing=0.01+readout=0.02"
    assert qpu.noise_strengths("depolarizing=0.01+readout=0.02") == {"depolarizing": 0.01, "readout": 0.02}
    assert qpu.noise_model("none") is None


# ----------------------------------------------------------------------------
# One training epoch with shots


@pytest.fixture(scope="module")
def shot_epochs(tiny_data, tmp_path_factory):
    """{name: metrics} of one cached-features epoch (lr 0.05, so that the head moves): exact on torch, with 400 shots
    on torch under four draw seeds, and with 400 shots on default.qubit."""
    folder = tmp_path_factory.mktemp("shots")
    common = ["--data-dir", tiny_data, "--weights", "none", "--print-freq", "0", "--bn-mode", "eval",
              "--cache-features", "--epochs", "1", "--lr", "0.05", "--n-qubits", "2", "--q-depth", "2"]
    runs = {"exact": ["--qdevice", "torch"], "default.qubit": ["--qdevice", "default.qubit", "--shots", "400"]}
    runs.update({f"torch-{seed}": ["--qdevice", "torch", "--shots", "400"] for seed in range(4)})
    metrics = {}
    draw_seed = qpu.draw_seed
    for name, argv in runs.items():
        seed = int(name.split("-")[1]) if name.startswith("torch-") else 0
        qpu.draw_seed = lambda run_seed, rank, seed=seed: draw_seed(run_seed + 1000 * seed, rank)
        try:
            result = run_main(qml, [*common, *argv, "--metrics-json", str(folder / f"{name}.json")])
        finally:
            qpu.draw_seed = draw_seed
        assert result.returncode == 0, result.stderr
        metrics[name] = json.loads((folder / f"{name}.json").read_text())
    return metrics


def test_one_epoch_with_shots_on_torch_and_on_a_pennylane_device_agree_within_their_statistical_error(shot_epochs):
    torch_losses = [shot_epochs[f"torch-{seed}"]["epochs"][0]["train_loss"] for seed in range(4)]
    mean, spread = np.mean(torch_losses), np.std(torch_losses, ddof=1)
    assert spread > 0  # the draws differ
    bound = STANDARD_ERRORS * spread * math.sqrt(1 + 1 / len(torch_losses))  # one more run beside their mean
    for other in ("default.qubit", "exact"):
        loss = shot_epochs[other]["epochs"][0]["train_loss"]
        assert abs(loss - mean) <= bound, (other, loss, torch_losses)


def test_the_metrics_record_the_circuits_and_shots_each_epoch_executed(shot_epochs):
    images = {"train": 12, "val": 9}  # the tiny set; 2 qubits, depth 2: 6 parameters of 2 shifted circuits each
    for name in ("default.qubit", "torch-0"):
        epoch = shot_epochs[name]["epochs"][0]
        assert (epoch["circuits_forward"], epoch["circuits_gradient"]) == (21, images["train"] * 12)
        assert (epoch["shots_forward"], epoch["shots_gradient"]) == (21 * 400, images["train"] * 12 * 400)
    exact = shot_epochs["exact"]["epochs"][0]
    assert (exact["circuits_forward"], exact["circuits_gradient"], exact["shots_forward"]) == (21, 0, 0)
    assert shot_epochs["exact"]["config"]["shots"] is None


def test_the_shifted_circuits_counted_are_those_pennylane_executes():
    net = qml.make_quantum_net(2, 2, 4, "default.qubit", shots=10)
    inputs, weights = inputs_and_weights(2, 2, batch=3)
    with pennylane.Tracker(net.device) as tracker:
        torch.stack(net(inputs, weights), -1).sum().backward()
    assert tracker.totals["executions"] == 3 * (1 + qpu.gradient_circuits(net))


def test_the_first_line_says_the_circuit_is_sampled(shot_epochs):
    assert shot_epochs["torch-0"]["provenance"]["qdevice"]["summary"] == (
        "qml.py's torch simulator, not a PennyLane device, on cpu, 400 shots a circuit, parameter-shift gradients")
    assert shot_epochs["default.qubit"]["provenance"]["qdevice"]["shots"] == 400


def test_the_report_sums_what_each_run_executed(shot_epochs, tmp_path, capsys):
    for name, metrics in shot_epochs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(metrics))
    assert report.main([str(tmp_path), "--by", "shots"]) == 0
    out = capsys.readouterr().out
    # One epoch of 12 training and 9 validation images: 21 forward circuits, 12 x 12 shifted ones, 400 shots each.
    assert "  1 task(s), shots=400: 165 circuits, 66,000 shots (5 run(s))" in out.splitlines(), out
    assert "  1 task(s), shots=None: 21 circuits, 0 shots (1 run(s))" in out.splitlines(), out


@pytest.mark.parametrize("vary, value, passed", [
    ("shots=100,1000,10000", "1000", ["--shots", "1000"]),
    ("noise=none,depolarizing=0.01+readout=0.02", "depolarizing=0.01+readout=0.02",
     ["--noise", "depolarizing=0.01+readout=0.02"]),
])
def test_the_sweep_varies_shots_and_noise(tmp_path, vary, value, passed):
    planned = sweep.plan_runs(sweep.parse_sweep(["1", "--vary", vary, "--repeats", "2", "--qdevice", "default.mixed"]),
                              str(tmp_path))
    run = next(run for run in planned if value in run.stem)
    assert list(run.args[:2]) == passed
    args = qml.get_args_parser().parse_args([*run.args, "--qdevice", "default.mixed"])
    assert (args.shots, args.noise) == ((1000, None) if "shots" in vary else (None, value))


def test_fewer_shots_than_outcomes_are_drawn_one_by_one_and_average_to_the_exact_value():
    inputs, weights = inputs_and_weights(3, 1, batch=1)
    exact = torch.stack(qml.make_quantum_net(3, 1, 3, "default.qubit")(inputs, weights), -1).detach()
    net = qml.make_quantum_net(3, 1, 3, simulators.TORCH_QDEVICE, shots=4, seed=2)  # 8 outcomes > 4 shots
    with torch.no_grad():
        draws = torch.stack([torch.stack(net(inputs, weights), -1) for _ in range(400)])
    assert torch.all((draws * 4 - (draws * 4).round()).abs() < 1e-9)  # means of 4 outcomes of +-1
    error = (1 - exact**2).clamp_min(1e-12).sqrt() / math.sqrt(4 * 400)
    assert ((draws.mean(0) - exact).abs() <= STANDARD_ERRORS * error).all(), (draws.mean(0) - exact) / error
