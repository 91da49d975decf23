"""The TOIST network: backbone, text encoder, transformer, detector and segmentation head.

``build_model(cfg)`` builds it from a :class:`toist_core.config.ModelConfig`.
"""

from .build import build_model, count_parameters
from .detector import TOIST
from .segmentation import TOISTSegm
from .text import TextFeatures, load_tokenizer

__all__ = ["TOIST", "TOISTSegm", "TextFeatures", "build_model", "count_parameters", "load_tokenizer"]
