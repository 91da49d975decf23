"""Reading a ``.pth`` file safely: what it is, whether it is intact, and nothing but tensors.

Checked before unpickling anything: the file exists, starts like a file ``torch.save``
writes (a zip archive, or a legacy pickle) and, for zip archives, every record passes its
CRC-32 (:func:`~toist_core.checkpoint.integrity.verify_zip`). Then ``torch.load`` with
``weights_only=True`` and one extra allowed class, ``argparse.Namespace`` (the official files'
``args``): any other pickled object is refused, by name.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, PathLike
from .integrity import ZIP_MAGIC, verify_zip

# Non-tensor classes an official checkpoint may contain (its `args`).
SAFE_GLOBALS = [argparse.Namespace]
_PICKLE_PROTO = b"\x80"  # legacy torch.save files start with a pickle (protocol >= 2)


def check_torch_file(path: PathLike) -> Path:
    """Refuse a missing file, one that is not a ``torch.save`` file, or a damaged archive."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder without config.yaml, so not a model directory; {_folder_hint(path)}")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not (head == ZIP_MAGIC or head[:1] == _PICKLE_PROTO):
        hint = (f"; it is a model directory's weights file: give its folder, {path.parent}"
                if path.suffix == ".safetensors" else "")
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (it starts with bytes {head!r}; a file "
                              f"written by torch.save is a zip archive starting with b'PK\\x03\\x04'){hint}")
    verify_zip(path)
    return path


def _folder_hint(folder: Path) -> str:
    """What the folder given as a checkpoint probably is: a copy that lost its config.yaml, a
    copy nested one level down (``cp -r model /models/model/`` onto an existing folder), or an
    unzipped download with the .pth inside."""
    entries = sorted(folder.iterdir())
    if any(entry.name == "model.safetensors" for entry in entries):
        return "it holds model.safetensors: an incomplete copy of a model directory (config.yaml is missing); copy it again"
    nested = [entry for entry in entries if (entry / "config.yaml").is_file()]
    if nested:
        return f"it holds the model directory {nested[0]} (a copy nested one level down?): give that folder"
    files = [entry.name for entry in entries if entry.suffix == ".pth"]
    if files:
        return f"give the checkpoint file inside it ({', '.join(files[:3])})"
    return "give a model directory (config.yaml, model.safetensors, tokenizer/) or a checkpoint file (.pth)"


def safe_torch_load(path: PathLike) -> Any:
    """``torch.load`` (``weights_only=True``, ``argparse.Namespace`` allowed) of a checked file."""
    path = check_torch_file(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc)) or re.search(r"Unsupported global: ([\w.]+)", str(exc))
        if found is None:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
        raise CheckpointError(
            f"{path}: refused: the file contains a pickled object ({found.group(1)}) other "
            f"than tensors and argparse.Namespace; only those are loaded (torch.load weights_only=True)") from None
    except Exception as exc:  # truncated archives, foreign pickles (KeyError, EOFError, RuntimeError ...)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
