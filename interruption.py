"""Stopping before the wall-time limit without losing work.

Slurm's wall-time warning (`sbatch --signal=B:USR1@120`, which sweep.py forwards to its step as SIGUSR1) asks
every rank to stop at the next boundary between batches, all ranks together, so that none is left waiting in
a collective. The epoch under way is dropped: the checkpoint of the last complete epoch stays as it is (it is
written only between epochs, atomically), and the exit status errors.RESUMABLE tells the launcher to requeue the
job or to say how to continue it. A second SIGUSR1 stops at once, as SIGTERM and Ctrl-C do (errors.raise_interrupt).
"""

import signal

import torch

from errors import raise_interrupt
from process_group import reduce_sums

STOP_SIGNAL = signal.SIGUSR1

requested = None  # the name of the signal that asked this rank to stop, once one has


class Interrupted(Exception):
    """The run stopped between batches when asked to; main() prints its line and exits with errors.RESUMABLE."""


def request_stop(signum, frame):
    """The stop signal's handler: the first asks for a stop at the next batch boundary, a second stops now."""
    global requested
    if requested is not None:
        raise_interrupt(signum, frame)
    requested = signal.Signals(signum).name


def catch_wall_time_warning():
    """From now on the stop signal asks this process to stop between batches (no request yet)."""
    global requested
    requested = None
    signal.signal(STOP_SIGNAL, request_stop)


def stop_between_batches(ctx, epoch, checkpoint):
    """Raise Interrupted on every rank when any rank was asked to stop: one all-reduce of the ranks' requests (on
    the CPU, so gloo carries it beside NCCL). Every rank must call this at the same points: after each training
    batch, which DistributedSampler makes equal in number on every rank (validation's shards may differ by one)."""
    (asked,) = reduce_sums(ctx, torch.tensor([requested is not None], dtype=torch.int32))
    if asked:
        kept = (f"--checkpoint {checkpoint} holds every complete epoch: continue with --resume {checkpoint}"
                if checkpoint else "nothing was saved: give --checkpoint PATH to make a run resumable")
        raise Interrupted(f"stopped by {requested or 'another rank'}'s request in epoch {epoch + 1}, between "
                          f"batches (Slurm's wall-time warning); {kept}")
