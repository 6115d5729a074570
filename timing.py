"""Where an epoch's time goes (--time-split), what each epoch records beside its metrics, and how often the
progress line is printed."""

import sys
import time

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from images import ImageLoader, decoding_counts


class TimeSplit:
    """Seconds an epoch spends in each part of the work, for --time-split: data (waiting for the loader:
    decoding, transforms, the copy to the device), backbone (the frozen ResNet18's forward), head (the dressed
    head's forward and backward, mostly the circuit), allreduce (DDP's gradient all-reduce) and optimizer.
    Each boundary synchronises the GPU, which costs time: runs without --time-split skip it all."""

    PARTS = ("data", "backbone", "head", "allreduce", "optimizer")

    def __init__(self, device, enabled):
        self.enabled = enabled
        self.synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.restart()

    def restart(self):
        """A new epoch: every part at zero."""
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self.epoch_start = self.mark = time.perf_counter()

    def lap(self, part):
        """Charge the time since the last lap to `part`."""
        if self.enabled:
            self.synchronize()
            now = time.perf_counter()
            self.seconds[part] += now - self.mark
            self.mark = now


def time_split(device, enabled, run):
    """A TimeSplit whose laps, but for "data", are hooks: the backbone's part ends as the dressed head's forward
    begins and the head's as it ends; the backward pass ends at DDP's all-reduce (timed_allreduce) or at the
    optimizer's step, whose end closes the optimizer's part. Without --time-split no hook is set.

    run: qml.py's Training (its model, DDP-wrapped step_net and optimizer)."""
    timer = TimeSplit(device, enabled)
    if enabled:
        model, step_net, optimizer = run.model, run.step_net, run.optimizer
        model.fc.register_forward_pre_hook(lambda head, inputs: timer.lap("backbone"))
        model.fc.register_forward_hook(lambda head, inputs, outputs: timer.lap("head"))
        optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: timer.lap("head"))
        optimizer.register_step_post_hook(lambda optimizer, args, kwargs: timer.lap("optimizer"))
        if isinstance(step_net, DistributedDataParallel):
            step_net.register_comm_hook(timer, timed_allreduce)
    return timer


def timed_allreduce(timer, bucket):
    """DDP's default all-reduce hook, waited for so that its time is told apart from the backward pass."""
    timer.lap("head")
    future = allreduce_hook(None, bucket)
    future.wait()
    timer.lap("allreduce")
    return future


def close_epoch(record, timer, ctx, loaders):
    """An epoch's record, completed with what is not the experiment: the images decoded and kept (from image
    files; cached features decode none), the epoch's seconds and, with --time-split, its parts."""
    if isinstance(loaders["train"], ImageLoader):
        record.update(decoding_counts(ctx, loaders))
    record["seconds"] = time.perf_counter() - timer.epoch_start
    if timer.enabled:
        record["time_split"] = timer.seconds
    return record


def progress_every(print_freq):
    """Print the per-batch progress line every N batches (--print-freq): each batch on a terminal, else every 10."""
    if print_freq is not None:
        return print_freq
    return 1 if sys.stdout.isatty() else 10
