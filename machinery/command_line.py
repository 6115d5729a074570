"""How qml.py, bench.py and sweep.py talk to their user: options read by argparse types that refuse a bad value in
one line, every failure that is not a bug here as one line on stderr, never a traceback, with its exit status, and
files written whole or not at all (atomic_write).

UsageError is bad input or environment (exit status 2, found before the long work starts); RunFailed is a
started run that cannot go on (exit status 1: a full disk, a rank gone, an image gone). RESUMABLE is the exit status
of a run stopped between batches on request (checkpoints.stop_between_batches), which the sweep driver (sweep.py)
requeues. Nothing here imports torch, so that sweep.py and the report start in a fraction of a second.
"""

import argparse
import contextlib
import math
import os
import re
import signal
import traceback

RESUMABLE = 75  # sysexits' EX_TEMPFAIL, "try again later": interrupted, continue with --resume


class UsageError(Exception):
    """Bad input or environment: main() prints the one-line message and exits with status 2."""


class RunFailed(Exception):
    """A started run cannot go on (a full disk, a rank gone, an image gone): one line, exit status 1."""


class ImageUnreadable(Exception):
    """An image that became unreadable after the start-up check. Raised in a DataLoader worker, it comes
    back with the worker's traceback as its message, whose last line holds the original message."""

    def __init__(self, message):
        last = message.rstrip().splitlines()[-1]
        super().__init__(last.split(f"{type(self).__name__}: ", 1)[-1])


def atomic_write(path, write):
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it over `path`.

    Whatever fails, `path` keeps its previous content and no temporary file stays; an OSError (a full
    disk, a read-only or vanished folder) becomes RunFailed, one line that names it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")  # open() keeps the umask
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):  # nothing to remove when open() failed
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise RunFailed(f"cannot write {path} ({err.strerror or err}); its previous version, if any, "
                            f"is unchanged; make room or choose another path") from err
        raise


PEER_GONE = re.compile(r"Connection (closed|reset) by peer|Broken pipe")  # gloo, when a peer process is gone


def failure_line(err, args, ctx):
    """The one line for an error that ends a run without being a bug here (an image or a rank gone), else None."""
    resume = (f"continue from the last --checkpoint, if one was written, with --resume {args.checkpoint}"
              if args.checkpoint else "run again (with --checkpoint PATH a run can be resumed)")
    if isinstance(err, ImageUnreadable):
        return f"{err}, though it was readable at start-up; replace it, then {resume}"
    several_ranks = ctx is not None and ctx.world_size > 1
    gone = PEER_GONE.search(str(err)) if several_ranks and isinstance(err, RuntimeError) else None
    if gone:
        peer = f"rank {1 - ctx.rank}" if ctx.world_size == 2 else "a peer rank"  # gloo names no rank
        return f"rank {ctx.rank}: {peer} is gone ({gone[0]}); its own output says why; fix that, then {resume}"
    return None


def drop_frames(err):
    """Clear the variables of the finished frames in the tracebacks of err and of the errors behind it.

    Lightning caches import tracebacks that keep frames alive; a frame holding DDP would then outlive the
    process group (see process_group.leave_process_group).
    """
    while err is not None:
        traceback.clear_frames(err.__traceback__)
        err = err.__cause__ or err.__context__


def raise_interrupt(signum, frame):
    """A signal handler: SIGTERM (Slurm's time limit, scancel) ends a run as Ctrl-C does."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


# ----------------------------------------------------------------------------
# Options

MAX_QUBITS = 30  # --n-qubits: the tutorial's "anywhere from 1-30"; the memory a count needs is checked apart
SEEDS = dict(low=0, high=2**32 - 1)  # what np.random.seed accepts
DIST_TIMEOUT_MAX = 2**31 // 1000  # 24.8 days, whose milliseconds fit 32 bits; far more overflows torch's timers


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad options as one line (no usage block) through UsageError."""

    def error(self, message):
        raise UsageError(f"{message} (see: python {self.prog} --help)")


def number(kind, low, high=math.inf, above_low=False):
    """argparse type: a finite `kind` in low..high (above low if above_low), else one line at once."""
    if high < math.inf:
        wanted = f"{low}..{high}"
    else:
        wanted = "positive" if above_low and low == 0 else f"{low} or more"
    if kind is float:
        wanted += " and finite"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        finite = kind is not float or math.isfinite(value)  # inf passes the comparisons below
        if not (finite and (value > low if above_low else value >= low) and value <= high):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def positive(kind):
    return number(kind, 0, above_low=True)


def cache_size(text):
    """--image-cache: auto, off, or a budget in MiB (0 keeps nothing)."""
    if text in ("auto", "off"):
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be auto, off or a number of MiB, got {text!r}")
    return value


def qubit_count(text):
    value = positive(int)(text)
    if value > MAX_QUBITS:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_QUBITS}, got {text}")
    return value


# ----------------------------------------------------------------------------
# Options resolved from others


def repeat_seeds(args):
    """--repeat R: the R-th repeat trains with --seed + R and --shuffle-seed + R (both kept in args)."""
    if args.repeat:
        args.seed, args.shuffle_seed = args.seed + args.repeat, args.shuffle_seed + args.repeat
        if max(args.seed, args.shuffle_seed) > SEEDS["high"]:
            raise UsageError(f"--repeat {args.repeat} gives --seed {args.seed} and --shuffle-seed {args.shuffle_seed}, "
                             f"beyond {SEEDS['high']}; give smaller seeds or fewer repeats")


def resolve_batch_and_lr(args, world_size, default_batch_size, reference_global_batch):
    """Set args.batch_size (per rank) and args.lr for this world size, which is known only after rank discovery:
    --global-batch-size split over the ranks, else --batch-size or the default; --lr-scaling linear multiplies --lr
    by the global batch / reference_global_batch. Kept in args, so that the checkpoint's config and --resume compare
    the values actually used."""
    if args.global_batch_size is not None:
        if args.global_batch_size % world_size:
            multiple = -(-args.global_batch_size // world_size) * world_size
            raise UsageError(f"--global-batch-size {args.global_batch_size} cannot be split evenly over "
                             f"{world_size} ranks; give a multiple of {world_size} (e.g. {multiple}) "
                             f"or a task count that divides {args.global_batch_size}")
        args.batch_size = args.global_batch_size // world_size
    elif args.batch_size is None:
        args.batch_size = default_batch_size
    if args.lr_scaling == "linear":
        args.lr *= args.batch_size * world_size / reference_global_batch
