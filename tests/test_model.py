"""DressedQuantumNet and the ResNet18 it heads: shapes, the tutorial's random draws, frozen backbone, weights."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from conftest import ROOT
from numpy_circuit import dressed_logits

from machinery import command_line, images
import qml
from machinery import simulators

IMAGENET_FILE = "resnet18-f37072fd.pth"  # the name torchvision caches ImageNet ResNet18 weights under


# ----------------------------------------------------------------------------
# DressedQuantumNet


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("nqubits", range(1, 11))
def test_head_output_is_batch_by_classes_float32(nqubits, batch):
    head = qml.DressedQuantumNet(n_qubits=nqubits, q_depth=2, qdevice=simulators.TORCH_QDEVICE)
    out = head(torch.randn(batch, 512))
    assert out.shape == (batch, 2)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("nqubits", [1, 4, 10])
def test_head_on_lightning_kokkos_outputs_batch_by_classes_float32(nqubits, batch):
    head = qml.DressedQuantumNet(n_qubits=nqubits, q_depth=2, qdevice="lightning.kokkos")
    out = head(torch.randn(batch, 512))
    assert out.shape == (batch, 2)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("n_classes", [2, 3, 7])
def test_head_has_one_output_per_class(n_classes):
    head = qml.DressedQuantumNet(n_qubits=3, q_depth=1, n_classes=n_classes, qdevice=simulators.TORCH_QDEVICE)
    assert head(torch.randn(5, 512)).shape == (5, n_classes)


def test_head_accepts_other_feature_widths():
    head = qml.DressedQuantumNet(n_qubits=2, q_depth=1, qdevice=simulators.TORCH_QDEVICE, in_features=64)
    assert head(torch.randn(3, 64)).shape == (3, 2)


@pytest.mark.parametrize("nqubits,depth,n_classes", [(1, 1, 2), (4, 6, 2), (5, 3, 4), (10, 2, 2)])
def test_head_parameters_are_pre_net_q_params_post_net(nqubits, depth, n_classes):
    head = qml.DressedQuantumNet(n_qubits=nqubits, q_depth=depth, n_classes=n_classes, qdevice=simulators.TORCH_QDEVICE)
    shapes = {name: tuple(p.shape) for name, p in head.named_parameters()}
    assert shapes == {"pre_net.weight": (nqubits, 512), "pre_net.bias": (nqubits,), "q_params": (depth * nqubits,),
                      "post_net.weight": (n_classes, nqubits), "post_net.bias": (n_classes,)}
    assert head.q_params.numel() == depth * nqubits


def tutorial_head_draws(seed, nqubits, depth, delta, n_classes=2):
    """The tutorial's DressedQuantumNet.__init__ written out: Linear, q_delta * randn, Linear."""
    torch.manual_seed(seed)
    pre_net = nn.Linear(512, nqubits)
    q_params = delta * torch.randn(depth * nqubits)
    post_net = nn.Linear(nqubits, n_classes)
    return {"pre_net.weight": pre_net.weight, "pre_net.bias": pre_net.bias, "q_params": q_params,
            "post_net.weight": post_net.weight, "post_net.bias": post_net.bias}


def assert_same_parameters(head, expected):
    got = dict(head.named_parameters())
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name].detach(), value.detach()), name


@pytest.mark.parametrize("qdevice", ["lightning.kokkos", simulators.TORCH_QDEVICE])
@pytest.mark.parametrize("seed,nqubits,depth,delta", [(0, 4, 6, 0.01), (42, 1, 3, 0.5), (7, 9, 2, 0.01)])
def test_head_init_draws_the_tutorials_numbers(qdevice, seed, nqubits, depth, delta):
    expected = tutorial_head_draws(seed, nqubits, depth, delta)
    torch.manual_seed(seed)
    head = qml.DressedQuantumNet(n_qubits=nqubits, q_depth=depth, q_delta=delta, qdevice=qdevice)
    assert_same_parameters(head, expected)


def test_default_head_is_the_tutorials_four_qubits_six_layers_delta_001():
    expected = tutorial_head_draws(123, nqubits=4, depth=6, delta=0.01)
    torch.manual_seed(123)
    head = qml.DressedQuantumNet()
    assert_same_parameters(head, expected)
    assert head(torch.randn(2, 512)).shape == (2, 2)


@pytest.mark.parametrize("qdevice", ["lightning.kokkos", simulators.TORCH_QDEVICE])
@pytest.mark.parametrize("per_sample", [False, True], ids=["broadcast", "per_sample"])
def test_head_forward_is_linear_tanh_circuit_linear(qdevice, per_sample):
    nqubits, depth = 3, 2
    torch.manual_seed(5)
    head = qml.DressedQuantumNet(n_qubits=nqubits, q_depth=depth, q_delta=0.8, qdevice=qdevice,
                                 per_sample=per_sample)
    features = torch.randn(3, 512)
    params = {name: p.detach().double().numpy() for name, p in head.named_parameters()}
    expected = dressed_logits(features.double().numpy(), params["pre_net.weight"], params["pre_net.bias"],
                              params["q_params"], params["post_net.weight"], params["post_net.bias"], nqubits, depth)
    np.testing.assert_allclose(head(features).detach().double().numpy(), expected, rtol=0, atol=2e-5)


def test_parsing_and_checking_the_options_never_load_pennylane():
    # PennyLane's import is about 2 s: a refused option answers without it (the choices of --qdevice come
    # from its entry points). Every circuit, the torch simulator's too, is traced with PennyLane.
    probe = ("import sys, qml; args = qml.get_args_parser().parse_args(['--qdevice', 'torch']); "
             "qml.validate_args(args); print(sorted(m for m in sys.modules if m.startswith('pennylane.')))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_qdevice_choices_are_pennylanes_devices_and_the_torch_simulator():
    import pennylane

    assert simulators.available_qdevices() == sorted(set(pennylane.plugin_devices) | {"torch"})


# ----------------------------------------------------------------------------
# build_model: the frozen backbone, and the tutorial's order of random draws


def model_args(*argv):
    return qml.get_args_parser().parse_args(["--qdevice", simulators.TORCH_QDEVICE, "--n-qubits", "3", *argv])


def distinctive_state_dict(seed=123):
    """A ResNet18 state_dict whose every entry differs from any freshly initialised one."""
    state = torchvision.models.resnet18().state_dict()
    gen = torch.Generator().manual_seed(seed)
    for value in state.values():
        if value.is_floating_point():
            value.copy_(torch.rand(value.shape, generator=gen) + 3.0)
        else:
            value.fill_(17)
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    state = distinctive_state_dict()
    torch.save(state, path)
    return str(path), state


@pytest.fixture
def cached_imagenet(tmp_path, monkeypatch, weights_file):
    """A TORCH_HOME whose hub cache already holds (our stand-in for) the ImageNet weights: no download."""
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    os.symlink(weights_file[0], checkpoints / IMAGENET_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return weights_file[1]


def test_backbone_is_frozen_and_only_the_head_requires_grad():
    model = qml.build_model(model_args("--weights", "none"), n_classes=2)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc." + name for name, _ in model.fc.named_parameters()}
    assert trainable == {"fc.pre_net.weight", "fc.pre_net.bias", "fc.q_params", "fc.post_net.weight",
                         "fc.post_net.bias"}
    assert isinstance(model.fc, qml.DressedQuantumNet)


def test_backward_pass_reaches_only_the_head():
    model = qml.build_model(model_args("--weights", "none"), n_classes=2)
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 2)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    for name, p in model.named_parameters():
        if name.startswith("fc."):
            assert p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert p.grad is None, name


def tutorial_model_draws(seed, nqubits, depth=qml.q_depth, delta=qml.q_delta):
    """The tutorial's order: torch.manual_seed, resnet18 (its random init), then the head's draws."""
    torch.manual_seed(seed)
    torchvision.models.resnet18()
    pre_net = nn.Linear(512, nqubits)
    q_params = delta * torch.randn(depth * nqubits)
    post_net = nn.Linear(nqubits, 2)
    return {"pre_net.weight": pre_net.weight, "pre_net.bias": pre_net.bias, "q_params": q_params,
            "post_net.weight": post_net.weight, "post_net.bias": post_net.bias}


def test_head_init_after_random_backbone_is_the_tutorials():
    expected = tutorial_model_draws(42, nqubits=3)
    torch.manual_seed(42)
    model = qml.build_model(model_args("--weights", "none"), n_classes=2)
    assert_same_parameters(model.fc, expected)


def test_head_init_after_backbone_from_file_is_the_tutorials(weights_file):
    # Loading weights must not draw extra random numbers: the head is the same whatever --weights says.
    expected = tutorial_model_draws(42, nqubits=3)
    torch.manual_seed(42)
    model = qml.build_model(model_args("--weights", weights_file[0]), n_classes=2)
    assert_same_parameters(model.fc, expected)


def test_head_init_after_cached_imagenet_backbone_is_the_tutorials(cached_imagenet):
    expected = tutorial_model_draws(42, nqubits=3)
    torch.manual_seed(42)
    model = qml.build_model(model_args("--weights", "imagenet"), n_classes=2)
    assert_same_parameters(model.fc, expected)


# ----------------------------------------------------------------------------
# load_backbone: imagenet | none | PATH


def assert_backbone_holds(model, state):
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name


def test_load_backbone_from_path_holds_the_files_weights(weights_file):
    path, state = weights_file
    assert_backbone_holds(images.load_backbone(path), state)


def test_build_model_backbone_holds_the_files_weights(weights_file):
    path, state = weights_file
    model = qml.build_model(model_args("--weights", path), n_classes=2)
    frozen = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    expected = {k: v for k, v in state.items() if not k.startswith("fc.")}
    assert set(frozen) == set(expected)
    assert all(torch.equal(frozen[k], expected[k]) for k in expected)


def test_load_backbone_none_is_a_fresh_random_resnet18():
    torch.manual_seed(9)
    expected = torchvision.models.resnet18().state_dict()
    torch.manual_seed(9)
    assert_backbone_holds(images.load_backbone("none"), expected)


def test_load_backbone_imagenet_reads_the_hub_cache(cached_imagenet):
    assert_backbone_holds(images.load_backbone("imagenet"), cached_imagenet)


def rename_key(state):
    state = dict(state)
    state["head.weight"] = state.pop("fc.weight")
    return state


def drop_key(state):
    state = dict(state)
    del state["layer4.1.bn2.running_var"]
    return state


def add_key(state):
    return dict(state, extra=torch.zeros(3))


def reshape_entry(state):
    return dict(state, **{"fc.weight": torch.zeros(10, 512)})


@pytest.mark.parametrize("corrupt", [rename_key, drop_key, add_key, reshape_entry,
                                     lambda state: list(state.values()),
                                     lambda state: torchvision.models.resnet34().state_dict()],
                         ids=["renamed-key", "missing-key", "extra-key", "wrong-shape", "a-list", "resnet34"])
def test_load_backbone_rejects_a_file_that_is_not_a_resnet18_state_dict(tmp_path, weights_file, corrupt):
    path = tmp_path / "bad.pth"
    torch.save(corrupt(weights_file[1]), path)
    with pytest.raises(command_line.UsageError, match="not a ResNet18 state_dict") as info:
        images.load_backbone(str(path))
    assert str(path) in str(info.value)


def test_load_backbone_imagenet_offline_fails_fast_naming_the_ways_out(tmp_path):
    # With an empty hub cache the download must fail (a proxy on a closed local port makes sure of it, network
    # or not), and the error says what to do instead.
    code = ("from machinery import command_line, images\n"
            "try:\n"
            "    images.load_backbone('imagenet')\n"
            "except command_line.UsageError as err:\n"
            "    print('UsageError:', err)\n")
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "empty_torch_home"), PYTHONPATH=ROOT,
               https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        env.pop(var, None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    messages = [line for line in result.stdout.splitlines() if line.startswith("UsageError:")]
    assert len(messages) == 1, (result.stdout, result.stderr)
    message = messages[0]
    assert "TORCH_HOME" in message
    assert "--weights none" in message
    assert str(tmp_path / "empty_torch_home") in message  # where to put the file
    assert not (tmp_path / "empty_torch_home" / "hub" / "checkpoints" / IMAGENET_FILE).exists()  # no partial file


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04truncated zip", None],
                         ids=["empty", "garbage", "bad-zip", "wrong-keys"])
def test_load_backbone_imagenet_with_a_broken_cached_file_raises_usage_error(tmp_path, monkeypatch, content):
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    if content is None:
        torch.save({"weight": torch.zeros(2)}, checkpoints / IMAGENET_FILE)
    else:
        (checkpoints / IMAGENET_FILE).write_bytes(content)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(command_line.UsageError, match="--weights none"):
        images.load_backbone("imagenet")
