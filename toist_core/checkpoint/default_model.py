"""The embedded default model: a model directory packaged with toist_core.

`make default-model` trains it on *synthetic* COCO-Tasks scenes only (its MODEL_CARD.md says
how and what it scores); it stands in when no checkpoint is given, so that the node and
``toist predict`` run out of the box, and says so, because its output on real images means
nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .errors import CheckpointError
from .model_dir import CONFIG_FILE

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_model"
MODEL_CARD = "MODEL_CARD.md"


def default_model_dir() -> Optional[Path]:
    """The packaged default model directory, or None when this installation lacks it."""
    return DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / CONFIG_FILE).is_file() else None


def require_default_model_dir() -> Path:
    """The packaged default model directory, or an error saying how to get one or what to pass instead."""
    found = default_model_dir()
    if found is None:
        raise CheckpointError(f"the embedded default model is missing ({DEFAULT_MODEL_DIR / CONFIG_FILE} not found): "
                              f"run `make default-model`, or pass a checkpoint (an official TOIST .pth or a model "
                              f"directory)")
    return found


def default_model_note(directory: Path) -> str:
    """One line saying that the default model is in use and what it is (synthetic scenes only)."""
    return (f"using the embedded default model {directory}: trained on SYNTHETIC COCO-Tasks scenes only "
            f"(see {directory / MODEL_CARD}); on real images its instances look confident but mean nothing; "
            f"pass a checkpoint (an official TOIST .pth or a model directory) for those")
