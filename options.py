"""The command line's checks: argparse types that refuse a bad value in one line, at once, and validate_args,
which refuses impossible combinations before any work starts."""

import argparse
import math
import os

from errors import UsageError
from images import DEFAULT_DATA_DIR
from simulators import MAX_QUBITS, available_qdevices

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


def validate_args(args):
    """Resolve the defaults that depend on the environment and refuse impossible combinations."""
    args.data_dir_is_default = args.data_dir is None and "QML_DATA_DIR" not in os.environ
    args.data_dir = args.data_dir or os.environ.get("QML_DATA_DIR") or DEFAULT_DATA_DIR
    if args.repeat:  # the R-th repeat trains with its own seeds, recorded as such in the checkpoint and metrics
        args.seed, args.shuffle_seed = args.seed + args.repeat, args.shuffle_seed + args.repeat
        if max(args.seed, args.shuffle_seed) > SEEDS["high"]:
            raise UsageError(f"--repeat {args.repeat} gives --seed {args.seed} and --shuffle-seed {args.shuffle_seed}, "
                             f"beyond {SEEDS['high']}; give smaller seeds or fewer repeats")
    if args.cache_features and args.bn_mode == "train":
        raise UsageError("--cache-features needs --bn-mode eval: with batch statistics the backbone's "
                         "features change every batch and cannot be cached")
    if args.global_batch_size is not None and args.batch_size is not None:
        raise UsageError("--global-batch-size and --batch-size both set the batch size: give one of them "
                         "(--global-batch-size G gives each of N ranks G/N images)")
    if args.qdevice not in available_qdevices():
        raise UsageError(f"--qdevice {args.qdevice}: not installed; choose one of {', '.join(available_qdevices())}")
