"""The frozen ResNet18: its weights (ImageNet, none, or a file, each checked) and its --precision."""

import os
import pickle

import torch
import torch.nn as nn
import torchvision

from errors import UsageError
from process_group import broadcast_error

# --precision: the dtype the frozen backbone's forward is autocast to.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resnet18_weights_error():
    return (f"cannot load ImageNet ResNet18 weights (offline?): put resnet18-f37072fd.pth into "
            f"{os.path.join(torch.hub.get_dir(), 'checkpoints')} (or set TORCH_HOME), "
            f"pass --weights PATH to a ResNet18 state_dict, or use --weights none")


def load_backbone(weights):
    """ResNet18 with `weights` (imagenet | none | PATH). Every choice draws the same random init first."""
    if weights == "imagenet":
        try:
            return torchvision.models.resnet18(weights=torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:  # offline, or a bad cached file
            raise UsageError(f"{resnet18_weights_error()} [{err}]") from None
    model = torchvision.models.resnet18(weights=None)
    if weights != "none":
        model.load_state_dict(read_resnet18_state_dict(weights, model.state_dict()))
    return model


def read_resnet18_state_dict(path, expected):
    """The state_dict in `path`, checked to have the keys and shapes of `expected` (a fresh ResNet18's)."""
    if not os.path.isfile(path):
        raise UsageError(f"--weights {path}: no such file; give a ResNet18 state_dict file, 'imagenet' or 'none'")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for unreadable files
        raise UsageError(f"--weights {path}: cannot read it ({type(err).__name__}); "
                         f"save one with torch.save(model.state_dict(), PATH)") from None
    if not isinstance(state, dict) or tensor_shapes(state) != tensor_shapes(expected):
        raise UsageError(f"--weights {path}: not a ResNet18 state_dict (keys or shapes differ); "
                         f"save one with torch.save(torchvision.models.resnet18().state_dict(), PATH)")
    return state


def tensor_shapes(state):
    """{name: shape} of a state_dict; a value that is no tensor has the shape ()."""
    return {name: tuple(getattr(value, "shape", ())) for name, value in state.items()}


def fetch_weights_once(args, ctx):
    """With several ranks, rank 0 downloads the ImageNet weights into the torch hub cache before the others
    read them (one process simply loads them in build_model)."""
    message = None
    if args.weights == "imagenet" and ctx.world_size > 1 and ctx.is_main:
        try:
            load_backbone("imagenet")
        except UsageError as err:
            message = str(err)
    broadcast_error(ctx, message)


def check_precision(precision, device):
    """Refuse a --precision that this rank's device cannot compute in."""
    if precision == "fp16" and device.type == "cpu":
        raise UsageError("--precision fp16 needs a GPU: CPUs have no fast float16 convolutions; "
                         "use --precision bf16 (or fp32) on CPUs")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                         f"use --precision fp16 (or fp32)")


def backbone_autocast(precision, device):
    """The context of the backbone's forward: autocast to --precision (none for fp32)."""
    return torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")


def cast_frozen_convolutions(model, precision):
    """Store the backbone's convolution weights in --precision once. Autocast rounds them the same way, but at
    every batch: it keeps its casts only of weights that train."""
    if precision != "fp32":
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.to(PRECISIONS[precision])
