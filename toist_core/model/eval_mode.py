"""Eval mode for a span of code, every module's own train/eval flag restored afterwards.

``module.train(was_training)`` would restore only the top flag and force it onto every
submodule; a trainer whose frozen parts sit in eval mode would see them flipped. This
records which modules were training and gives exactly those their flag back.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Iterator

from torch import nn

# Per model: how many spans are open (in any thread) and the modules they switched to eval mode.
# A span that ended while another still ran gave the training flags back under it: a set_task
# beside a predict on a model handed over in training mode encoded its task with dropout on.
_open_spans: "weakref.WeakKeyDictionary[nn.Module, tuple[int, list[nn.Module]]]" = weakref.WeakKeyDictionary()
_spans_lock = threading.Lock()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``with eval_mode(model):`` runs in eval mode; the modules that were training get their
    flag back when the last span open on ``model`` (in any thread) ends, so overlapping callers
    never run part of a forward in training mode. A model already in eval mode is not touched."""
    with _spans_lock:
        count, switched = _open_spans.get(model, (0, []))
        # (in an open span too: a model put back into training mode meanwhile is switched again)
        training = [module for module in model.modules() if module.training]
        for module in training:
            module.training = False
        known = {id(module) for module in switched}
        _open_spans[model] = (count + 1, switched + [m for m in training if id(m) not in known])
    try:
        yield model
    finally:
        with _spans_lock:
            count, switched = _open_spans.pop(model)
            if count > 1:
                _open_spans[model] = (count - 1, switched)
            else:
                for module in switched:
                    module.training = True
