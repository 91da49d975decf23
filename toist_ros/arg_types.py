"""argparse types of the package's commands (demo, camera stand-in, dev client): a bad number is
refused by name before anything starts (a zero rate divided by zero, a NaN timeout spun for ever,
a negative frame count ran for minutes first)."""

from __future__ import annotations

import argparse
import math


MIN_RATE = 0.001   # frames per second: one in about 17 minutes (1e-10 overflowed rclpy's timer period)


def positive_rate(text: str) -> float:
    """Frames per second: at least MIN_RATE and finite (a negative rate reached rclpy as an
    RCLError, a tiny one as a TypeError of its timer)."""
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: frames per second, a number above 0") from None
    if not rate > 0 or rate == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: frames per second, above 0")
    if rate < MIN_RATE:
        raise argparse.ArgumentTypeError(f"{text!r}: frames per second, at least {MIN_RATE:g}")
    return rate


def at_least(minimum: int):
    """An integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: an integer >= {minimum}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: an integer >= {minimum}")
        return value
    return parse


def seconds(text: str) -> float:
    """A time limit in seconds: above 0 (``inf``: no limit); NaN never ends a wait."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds, a number above 0") from None
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds, a number above 0 (inf: no limit)")
    return value


__all__ = ["at_least", "positive_rate", "seconds"]
