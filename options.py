"""The command line's value checks: argparse types that refuse a bad value in one line, at once."""

import argparse
import math

from errors import UsageError

SEEDS = dict(low=0, high=2**32 - 1)  # what np.random.seed accepts
DIST_TIMEOUT_MAX = 2**31 // 1000  # 24.8 days, whose milliseconds fit 32 bits; far more overflows torch's timers
MAX_QUBITS = 20  # a larger state is too large to simulate here


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad options as one line (no usage block) through UsageError."""

    def error(self, message):
        raise UsageError(f"{message} (see: python qml.py --help)")


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
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_QUBITS} (a state of {text} qubits is too large to "
                                         f"simulate here)")
    return value
