"""Replacing a file as a whole: a reader, or a process killed mid-write, finds the old file or the
new one, never a truncated mix.

The new content is written to a temporary file beside the target (``.<name>.<random><suffix>``:
same folder, so the rename cannot cross file systems), flushed to disk, renamed over the target,
and the folder is synced so that the rename itself survives a power loss. Used for everything
toist writes that a later run reads: ``config.yaml``, training checkpoints, predictions, the
evaluation tables, plots and logs. (Whole directories: ``toist_core.checkpoint.atomic_dir``;
files that belong together: written into a :func:`staging_folder`, then renamed into place.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Union

PathLike = Union[str, Path]


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None], suffix: str = ".tmp") -> Path:
    """Call ``write(handle)`` on a fresh file beside ``path``, then make it ``path``. If ``write``
    fails, ``path`` is untouched and the temporary file removed. Returns ``path``.

    The file gets the replaced file's permissions, or a new file's (``0o666`` less the umask):
    ``mkstemp`` makes it owner-only, and a model or checkpoint that only its writer can read is
    no use to a node running as another user."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _mode_of(path, default_mode(directory=False))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
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


def default_mode(directory: bool) -> int:
    """What ``open`` / ``mkdir`` would give a new file or folder: ``0o666`` / ``0o777`` less the
    umask (read from ``/proc``: setting the umask to read it would race with other threads)."""
    umask = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
                break
    except (OSError, ValueError):
        pass
    if umask is None:
        umask = os.umask(0o022)
        os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _mode_of(path: Path, default: int) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return default


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


__all__ = ["atomic_write", "default_mode", "fsync_dir", "write_text_atomic"]


@contextlib.contextmanager
def staging_folder(directory: PathLike, prefix: str) -> Iterator[Path]:
    """A fresh folder inside ``directory`` (the same file system, so renames from it are atomic,
    and only the directory need be writable), removed afterwards whatever happens (Ctrl-C
    included); one a killed process left is a hidden entry named ``prefix...``."""
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=directory))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
