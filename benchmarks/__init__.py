"""normzoo's benchmarks, tuner and static compile report (``python -m benchmarks --help``)."""

import argparse
import json


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


# argparse types: sizes and counts (rows, widths, SMs), an int >= 1; counts that may be zero
# (worker processes), an int >= 0
positive_int = _int_at_least(1, "a positive integer")
nonnegative_int = _int_at_least(0, "an integer >= 0")


def seconds(text: str) -> float:
    """An argparse type for time budgets: a number of seconds >= 0 (0: stop before the first step)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (a number >= 0), got {text!r}") from None
    if not value >= 0:  # (NaN too)
        raise argparse.ArgumentTypeError(f"expected seconds (a number >= 0), got {text}")
    return value


def json_argument(parser: argparse.ArgumentParser, option: str, path, what: str, read=lambda data: data):
    """``read`` of the JSON file that ``option`` names, or an argparse error (exit 2) saying it is not
    ``what``: missing, not JSON, or one ``read`` refuses (a KeyError, TypeError or ValueError)."""
    try:
        return read(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        parser.error(f"{option} {path}: not {what} ({type(e).__name__}: {e})")
