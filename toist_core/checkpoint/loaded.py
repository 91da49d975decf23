"""What loading a checkpoint gives: the model and everything that came with it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from ..config import InputSize, ModelConfig


@dataclass
class LoadedModel:
    """A model ready for inference and what came with it.

    tasks: the COCO-Tasks ids it was trained on (None: not recorded, e.g. a version-2 directory).
    """

    model: nn.Module
    config: ModelConfig
    memory_bank: Optional[nn.Module] = None
    pronoun: str = "something"
    source: str = ""
    input_size: InputSize = field(default_factory=InputSize)
    tasks: Optional[tuple[int, ...]] = None
