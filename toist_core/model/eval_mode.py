"""Eval mode for a span of code, every module's own train/eval flag restored afterwards.

``module.train(was_training)`` would restore only the top flag and force it onto every
submodule; a trainer whose frozen parts sit in eval mode would see them flipped. This
records which modules were training and gives exactly those their flag back.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``with eval_mode(model):`` runs in eval mode; a model already in eval mode is not touched
    (so concurrent callers never race on the flags)."""
    training = [module for module in model.modules() if module.training]
    for module in training:
        module.training = False
    try:
        yield model
    finally:
        for module in training:
            module.training = True
