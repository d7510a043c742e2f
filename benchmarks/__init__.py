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
