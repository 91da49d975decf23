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
    if path.is_dir():  # e.g. an unzipped download: the .pth file is inside
        raise CheckpointError(f"{path}: a folder without config.yaml, so not a model directory; give the checkpoint "
                              "file (.pth) inside it")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not (head == ZIP_MAGIC or head[:1] == _PICKLE_PROTO):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (it starts with bytes {head!r}; a file "
                              "written by torch.save is a zip archive starting with b'PK\\x03\\x04')")
    verify_zip(path)
    return path


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
