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


# ``--text-encoder`` of the commands that load a checkpoint to run it (predict, evaluate). Its
# default differs by what is loaded: an official .pth records no tokenizer, a toist training
# checkpoint records its run's (load_official), a model directory carries its own folder.
TEXT_ENCODER_HELP = ("tokenizer / RoBERTa: hub name or local directory; default roberta-base for an official "
                     ".pth, the tokenizer its run recorded for a toist training checkpoint; a model directory "
                     "reads its own tokenizer folder: leave this out")


__all__ = ["TEXT_ENCODER_HELP", "duplicate_iou"]
