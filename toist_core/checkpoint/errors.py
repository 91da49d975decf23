"""The one error every checkpoint reader raises."""

from __future__ import annotations

from pathlib import Path
from typing import Union

PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A checkpoint cannot be read, is corrupted, or does not match the model it is loaded into."""
