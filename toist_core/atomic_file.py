"""Replacing a file as a whole: a reader, or a process killed mid-write, finds the old file or the
new one, never a truncated mix.

The new content is written to a temporary file beside the target (``.<name>.<random><suffix>``:
same folder, so the rename cannot cross file systems), flushed to disk, renamed over the target,
and the folder is synced so that the rename itself survives a power loss. Used for everything
toist writes that a later run reads: ``config.yaml``, training checkpoints, predictions, the
evaluation tables, plots and logs. (Whole directories: ``toist_core.checkpoint.atomic_dir``.)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

PathLike = Union[str, Path]


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None], suffix: str = ".tmp") -> Path:
    """Call ``write(handle)`` on a fresh file beside ``path``, then make it ``path``. If ``write``
    fails, ``path`` is untouched and the temporary file removed. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)
    return path


def write_text_atomic(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """``Path(path).write_text(text)`` through :func:`atomic_write`."""
    data = text.encode(encoding)
    return atomic_write(path, lambda handle: handle.write(data))


def fsync_dir(folder: PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["atomic_write", "fsync_dir", "write_text_atomic"]
