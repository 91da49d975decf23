"""Argument types and help the ``toist`` commands share: a bad value is refused by argparse in
the command's own words (``--duplicate-iou``), not by a config field the user never named."""

from __future__ import annotations

import argparse
import math

from ..config import MAX_INPUT_SIDE


def _ranged(kind: type, low: float, high: float, expected: str, allowed: str):
    """An argparse type: ``kind(text)`` within ``[low, high]`` (NaN refused), else an error
    saying ``expected`` (not a number) or ``allowed`` (out of range)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if math.isnan(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{allowed}, got {text}")
        return value
    return parse


# ``--duplicate-iou``: an IoU in (0, 1], or 0 to keep duplicates (what the commands read as None).
duplicate_iou = _ranged(float, 0.0, 1.0, "a number", "must be in (0, 1], or 0 to keep duplicates")
# ``--short-side`` / ``--max-size``: pixels, as InferenceConfig takes them.
image_side = _ranged(int, 1, MAX_INPUT_SIDE, "a whole number of pixels", f"pixels, 1..{MAX_INPUT_SIDE}")
# ``--score-threshold``.
score = _ranged(float, 0.0, 1.0, "a number", "a score in [0, 1]")
# ``--max-instances``.
count = _ranged(int, 0, math.inf, "a whole number", "a whole number >= 0")


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
