"""Replacing a directory as a whole: a reader finds the old one or the new one, never a mix.

The new directory is written beside the target (``.<name>.staging-<random>``, same file
system), flushed, then swapped in with one ``renameat2(RENAME_EXCHANGE)`` (Linux >= 3.15,
glibc >= 2.28): the target path points at the old tree until that call and at the new one
after it. Where the exchange is unavailable the old tree is renamed away and the new one
renamed in: a crash between the two renames leaves no target (but both trees beside it).
Staging and displaced trees a crash left behind are removed by the next replacement. A writer
holds an advisory lock (``flock``) on its staging tree while it works, and the lock ends with its
process: a replacement running beside another (two exports to one folder) leaves the other's
tree alone, and the last one to finish is the directory. A tree is made under a name the
clean-up does not take (``.<name>.new-*``), locked, then renamed to its staging name, so no
writer's tree is ever unlocked under that name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import contextlib
import errno
import fcntl
import glob
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from ..atomic_file import default_mode, fsync_dir
from .errors import PathLike

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
STAGING_MARK = ".staging-"


def write_directory(target: PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(staging)`` to fill a fresh directory, then make it ``target`` atomically
    (replacing an existing ``target``). Nothing at ``target`` changes if ``write`` fails.

    A symlinked ``target`` (``current -> models_v1``) stays a link: the folder it points to is
    what gets replaced, as writing through the link would. Returns ``target`` as given.
    """
    given = Path(target)
    # Exchanging the link itself would put a real folder in its place and leave the link in the
    # staging entry; resolving first swaps the trees beside the folder the link points at.
    target = given.resolve() if given.is_symlink() else given
    target.parent.mkdir(parents=True, exist_ok=True)
    problem = mount_point_problem(target)
    if problem:
        raise OSError(errno.EBUSY, problem)
    if target != given:
        remove_stale(given)  # what an exchange of the link itself left behind (older toist versions)
    remove_stale(target)
    with _locked_tree(target) as staging:
        try:
            write(staging)
            _open_up(staging, target)
            _fsync_tree(staging)
            if target.exists():
                _exchange(staging, target)      # staging now holds the old tree
                _remove(staging)
            else:
                os.rename(staging, target)
            fsync_dir(target.parent)
        except BaseException:
            _remove(staging)
            raise
    return given


def mount_point_problem(target: PathLike, remedy: str = "") -> str:
    """What is wrong with replacing ``target`` (followed through a link) as a whole when it is a
    mount point ("" when it is not): neither an exchange nor a rename can move one. ``remedy``:
    what to do instead (default: give a folder inside it)."""
    given = Path(target)
    target = given.resolve() if given.is_symlink() else given
    if not (target.is_dir() and os.path.ismount(target)):
        return ""
    inside = given / "model"
    return (f"{given}: a mount point: a directory cannot be swapped in there as a whole; "
            f"{remedy or f'give a folder inside it (e.g. {inside})'}")


def remove_stale(target: PathLike) -> list[Path]:
    """Delete staging / displaced trees of ``target`` left by an interrupted replacement: those
    whose writer is no longer running (or that do not say, older toist versions). Another
    export to the same folder lost its staging tree mid-write and failed with a bare
    FileNotFoundError."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    # (escaped: "model[1]" is a name, not a pattern that matches ".model1.staging-*")
    def named(mark: str) -> list[Path]:
        return sorted(target.parent.glob(glob.escape(f".{target.name}{mark}") + "*"))

    stale = [path for path in named(STAGING_MARK) if not _being_written(path)]
    # A new tree is unlocked for the microseconds before its writer locks it: one of those
    # names is a crash's leftover only once it is older than that could last.
    stale += [path for path in named(_NEW_MARK) if not _being_written(path) and _age_s(path) > _NEW_GRACE_S]
    for path in stale:
        _remove(path)
    return stale


_NEW_MARK = ".new-"
_NEW_GRACE_S = 60.0


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.lstat().st_mtime
    except OSError:
        return float("inf")


@contextlib.contextmanager
def _locked_tree(beside: Path):
    """A fresh empty folder beside ``beside`` (``.<name>.staging-<random>``), locked (an
    exclusive ``flock`` on its inode, which holds through the renames that swap it in) for the
    block; made under a name the clean-up leaves alone until it is locked."""
    new = Path(tempfile.mkdtemp(prefix=f".{beside.name}{_NEW_MARK}", dir=beside.parent))
    handle = os.open(new, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:   # a file system without locks (ENOLCK): unguarded, as before there was a lock
            pass
        tree = new.with_name(new.name.replace(_NEW_MARK, STAGING_MARK, 1))
        os.rename(new, tree)
        yield tree
    except BaseException:
        _remove(new)
        raise
    finally:
        os.close(handle)   # (the lock goes with it, and with the process however it ends)


def _being_written(path: Path) -> bool:
    """Whether a writer (any process, this one included) holds ``path``'s lock."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        handle = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:   # a file system without locks: as before, a leftover
        return False
    finally:
        os.close(handle)
    return False


def _remove(path: Path) -> None:
    """Delete a tree, or a link or file (``rmtree`` refuses a symlink, silently with ``ignore_errors``;
    older toist versions left an exchanged symlink under a staging name)."""
    if path.is_symlink() or path.is_file():
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    else:
        shutil.rmtree(path, ignore_errors=True)


def _exchange(a: Path, b: Path) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # no exchange here: fall back
            raise OSError(code, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(code)}")
    with _locked_tree(b) as displaced:
        os.rename(b, displaced / b.name)
        try:
            os.rename(a, b)
        except BaseException:
            # The old tree back where it was: else the target was gone, the old model waited in
            # an unlocked staging folder, and the next export's clean-up deleted it.
            os.rename(displaced / b.name, b)
            raise
        try:   # as an exchange leaves it: ``a`` names the old tree, which the caller removes
            os.rename(displaced / b.name, a)
            displaced.rmdir()
        except OSError:   # the new tree is in place; the old one is left to the next clean-up
            pass


def _open_up(staging: Path, target: Path) -> None:
    """Give the new tree the permissions a folder made with ``mkdir`` would have (the replaced
    folder's own, when there is one), and its files a new file's: ``mkdtemp`` makes the
    staging folder owner-only and some writers (safetensors) their files too, and a model
    directory only its writer can read is no use to a node running as another user."""
    file_mode = default_mode(directory=False)
    folder_mode = default_mode(directory=True)
    for folder, folders, files in os.walk(staging):
        for name in folders + files:
            path = os.path.join(folder, name)
            if os.path.islink(path):  # chmod would change what the link points to
                continue
            if name in folders:
                os.chmod(path, folder_mode)
            else:  # executables stay executable
                os.chmod(path, file_mode | (os.stat(path).st_mode & 0o111 & folder_mode))
    try:
        os.chmod(staging, target.stat().st_mode & 0o7777)
    except OSError:  # no folder there yet
        os.chmod(staging, folder_mode)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(folder))
