"""Output paths of the commands, checked before anything slow runs: a folder that cannot be made
was found after the model had loaded (or after hours of inference) as "[Errno 17] File exists"."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union


def check_output_folder(option: str, path: Union[str, Path]) -> None:
    """``path`` (given as ``option``) is a folder, or one that can be made there: not a file, not a
    link to nothing, and under no file. Raises ``FileExistsError`` saying which."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{option} {path}: exists and is not a folder; give a folder")
    if folder.is_symlink() and not folder.exists():
        raise FileExistsError(f"{option} {path}: a link to {os.readlink(folder)}, which does not exist; create that "
                              f"folder or give another {option}")
    check_output_parent(option, folder)


def check_output_parent(option: str, path: Union[str, Path]) -> None:
    """What exists of ``path``'s parents is a folder (``a.json/out`` under the file ``a.json`` is not)."""
    path = Path(path)
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise FileExistsError(f"{option} {path}: {parent} is a file, not a folder; give another path")
