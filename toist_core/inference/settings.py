"""What a segmenter's ``InferenceConfig`` becomes when applied: :class:`AppliedSettings`, one
immutable object that ``TaskSegmenter`` swaps in whole and each call reads once, and the
checks of the per-call overrides."""

from __future__ import annotations

import dataclasses
from numbers import Integral, Real
from typing import Optional

import torch
from torch import Tensor

from ..config import InferenceConfig, InputSize
from .device import autocast_dtype
from .processing import Processing, processing_of


@dataclasses.dataclass(frozen=True)
class AppliedSettings:
    """Everything a call derives from the segmenter's ``InferenceConfig``."""

    config: InferenceConfig    # with the model's own input size where the config leaves it None
    processing: Processing     # resize method, padding, box clipping, duplicate removal
    autocast: Optional[torch.dtype]
    mean: Tensor               # [3, 1, 1] on the device
    std: Tensor                # [3, 1, 1]
    pronoun: str

    @classmethod
    def of(cls, config: InferenceConfig, device: torch.device, own_input_size: InputSize,
           own_pronoun: str) -> "AppliedSettings":
        """``config`` applied on ``device`` to a model trained at ``own_input_size`` with
        ``own_pronoun`` (what the config leaves None)."""
        config = config.with_input_size(own_input_size)
        return cls(config, processing_of(config), autocast_dtype(config.precision, device),
                   torch.tensor(config.mean, device=device).view(3, 1, 1),
                   torch.tensor(config.std, device=device).view(3, 1, 1), config.pronoun or own_pronoun)


def check_call_limits(score_threshold, max_instances) -> None:
    """Per-call overrides of ``predict`` / ``predict_batch`` (None: the config's), checked as the
    config's own fields are: a negative cap would slice off the last instances instead."""
    if score_threshold is not None and (isinstance(score_threshold, bool) or not isinstance(score_threshold, Real)
                                        or not 0.0 <= score_threshold <= 1.0):
        raise ValueError(f"score_threshold must be a number in [0, 1] (None: inference.score_threshold), "
                         f"got {score_threshold!r}")
    if max_instances is not None and (isinstance(max_instances, bool) or not isinstance(max_instances, Integral)
                                      or max_instances < 0):
        raise ValueError(f"max_instances must be an integer >= 0 (0: no instances; None: inference.max_instances), "
                         f"got {max_instances!r}")


__all__ = ["AppliedSettings", "check_call_limits"]
