"""normzoo's benchmarks, tuner and static compile report (``python -m benchmarks --help``)."""

import argparse


def positive_int(text: str) -> int:
    """An argparse type for sizes and counts (rows, widths, SMs): an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An argparse type for counts that may be zero (worker processes): an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def seconds(text: str) -> float:
    """An argparse type for time budgets: a number of seconds >= 0 (0: stop before the first step)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (a number >= 0), got {text!r}") from None
    if not value >= 0:  # (NaN too)
        raise argparse.ArgumentTypeError(f"expected seconds (a number >= 0), got {text}")
    return value
