"""How a run of qml.py fails: one line on stderr, never a traceback, for what is not a bug here.

UsageError is bad input or environment (exit status 2, found before the long work starts); RunFailed is a
started run that cannot go on (exit status 1: a full disk, a rank gone, an image gone). RESUMABLE is the exit status
of a run stopped between batches on request (interruption.py), which the sweep driver (sweep.py) requeues.
"""

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
