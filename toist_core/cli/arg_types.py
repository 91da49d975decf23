"""Argument types and help the ``toist`` commands share: a bad value is refused by argparse in
the command's own words (``--duplicate-iou``), not by a config field the user never named."""

from __future__ import annotations

import argparse
import math


def duplicate_iou(text: str) -> float:
    """``--duplicate-iou``: an IoU in (0, 1], or 0 to keep duplicates (what the commands read as None)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], or 0 to keep duplicates, got {text}")
    return value


def image_side(text: str) -> int:
    """``--short-side`` / ``--max-size``: pixels, 1..MAX_INPUT_SIDE."""
    from ..config import MAX_INPUT_SIDE

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels, got {text!r}") from None
    if not 1 <= value <= MAX_INPUT_SIDE:
        raise argparse.ArgumentTypeError(f"pixels, 1..{MAX_INPUT_SIDE}, got {text}")
    return value


def score(text: str) -> float:
    """``--score-threshold``: a score in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a score in [0, 1], got {text}")
    return value


def count(text: str) -> int:
    """``--max-instances``: a whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a whole number >= 0, got {text}")
    return value


def resize_problem(short_side, max_size) -> str:
    """Why ``--short-side`` and ``--max-size`` do not go together ("" when they do), in the
    options' words (the config's refusal names fields the user never typed)."""
    if short_side is not None and max_size is not None and short_side > max_size:
        return (f"--short-side {short_side} is above --max-size {max_size}: the long side would have to be "
                "shorter than the short one; raise --max-size or leave it out (the model's cap)")
    return ""


# ``--text-encoder`` of the commands that load a checkpoint to run it (predict, evaluate). Its
# default differs by what is loaded: an official .pth records no tokenizer, a toist training
# checkpoint records its run's (load_official), a model directory carries its own folder.
TEXT_ENCODER_HELP = ("tokenizer / RoBERTa: hub name or local directory; default roberta-base for an official "
                     ".pth, the tokenizer its run recorded for a toist training checkpoint; a model directory "
                     "reads its own tokenizer folder: leave this out")


__all__ = ["TEXT_ENCODER_HELP", "count", "duplicate_iou", "image_side", "resize_problem", "score"]
