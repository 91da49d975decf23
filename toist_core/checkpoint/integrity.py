"""Integrity of checkpoint files: a flipped byte is refused, not loaded.

``torch.save`` writes a zip archive whose every record carries a CRC-32 that ``torch.load``
never checks; :func:`verify_zip` reads the archive once and compares them. safetensors files
have no checksum of their own, so toist writes one into their metadata
(:data:`DIGEST_KEY`: SHA-256 over every tensor's name, dtype, shape and bytes, in name order,
so it does not depend on the file layout) and :func:`check_tensor_digest` recomputes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .errors import CheckpointError, PathLike

DIGEST_KEY = "toist_sha256"
ZIP_MAGIC = b"PK\x03\x04"


def verify_zip(path: PathLike) -> None:
    """Check every CRC-32 of a ``torch.save`` zip archive; :class:`CheckpointError` names the
    file and the first damaged record. Legacy (pre-zip) files carry no checksum: not checked."""
    path = Path(path)
    with open(path, "rb") as handle:
        if handle.read(4) != ZIP_MAGIC:
            return
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            _check_torch_layout(path, names)
            _check_stored(path, archive.infolist())
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: damaged checkpoint archive ({exc}); the file is truncated or "
                              "corrupted: restore or re-download it") from None
    if damaged is not None:
        raise CheckpointError(f"{path}: corrupted: record {damaged!r} fails its CRC-32 check (the bytes "
                              "changed after torch.save wrote them); restore or re-download the file")


def _check_stored(path: Path, records: list) -> None:
    """``torch.save`` stores its records uncompressed. A compressed record is not its writing, and
    can be a zip bomb: a 2 MB file whose 2 GiB record the CRC check and torch.load would inflate
    (40 s and 2.5 GB before torch refused it)."""
    size = path.stat().st_size
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{path}: record {record.filename!r} is compressed; torch.save stores every record "
                                  "as it is: not a checkpoint torch.save wrote (repacked?)")
        if record.file_size > size:
            raise CheckpointError(f"{path}: record {record.filename!r} claims {record.file_size} bytes in a file of "
                                  f"{size}: damaged or crafted archive")


def _check_torch_layout(path: Path, names: list[str]) -> None:
    """``torch.save`` archives keep every record under one folder, with ``<folder>/data.pkl``.
    Another zip (a cloud drive's folder download holding the ``.pth``, anything renamed) got
    torch's internal errors ("Expected hasRecord("version") to be true")."""
    if any(name.count("/") == 1 and name.endswith("/data.pkl") for name in names):
        return
    inside = [name for name in names if name.endswith((".pth", ".pt", ".ckpt", ".safetensors"))]
    if inside:
        raise CheckpointError(f"{path}: a zip archive holding {', '.join(inside[:3])}"
                              f"{' ...' if len(inside) > 3 else ''}, not a checkpoint itself: unzip it and give "
                              "that file")
    raise CheckpointError(f"{path}: a zip archive, but not one torch.save writes (no <folder>/data.pkl among its "
                          f"{len(names)} entries): not a PyTorch checkpoint")


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 hex of ``tensors`` (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_digest(path: PathLike) -> str:
    """SHA-256 hex of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_digest(folder: PathLike, names: Sequence[str]) -> str:
    """SHA-256 hex over the files ``names`` of ``folder``, in name order: each name, then its
    bytes, or a mark that it is absent (a file removed changes the digest as one edited does)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for name in sorted(names):
        path = folder / name
        digest.update(f"{name}\n".encode())
        digest.update(path.read_bytes() if path.is_file() else b"\0absent\0")
    return digest.hexdigest()


def check_tensor_digest(path: PathLike, tensors: Mapping[str, Tensor], metadata: Optional[Mapping[str, str]],
                        required: bool) -> None:
    """Compare ``tensors`` (read from ``path``) with the digest stored in its metadata.

    ``required``: the file must carry one (written by a toist version that stores digests)."""
    expected = (metadata or {}).get(DIGEST_KEY)
    if expected is None:
        if required:
            raise CheckpointError(f"{path}: no {DIGEST_KEY} in its metadata; the file was not written by "
                                  "toist's save_model_dir or was replaced: re-export the model")
        return
    if tensor_digest(tensors) != expected:
        raise CheckpointError(f"{path}: corrupted: its tensors do not match the SHA-256 recorded when it was "
                              "written; restore or re-export the model directory")


def load_safetensors(path: PathLike, required_digest: bool) -> dict[str, Tensor]:
    """A safetensors file's tensors, checked against their recorded digest."""
    return read_safetensors(path, required_digest)[0]


def read_safetensors(path: PathLike, required_digest: bool) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A safetensors file's tensors, checked against their recorded digest, and its metadata,
    both from one opening of the file (a file replaced in between cannot give one version's
    metadata with another's tensors)."""
    path = Path(path)
    with _opened_safetensors(path) as handle:
        metadata = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    check_tensor_digest(path, tensors, metadata, required_digest)
    return tensors, metadata


def safetensors_metadata(path: PathLike) -> dict[str, str]:
    """The metadata of a safetensors file (its header only); a file that cannot be read is a
    :class:`CheckpointError` naming it, as :func:`read_safetensors` says it."""
    with _opened_safetensors(Path(path)) as handle:
        return handle.metadata() or {}


@contextlib.contextmanager
def _opened_safetensors(path: Path) -> Iterator[Any]:
    """``safe_open`` of ``path``; what keeps it from being read is a :class:`CheckpointError`."""
    from safetensors import safe_open

    try:  # safetensors says "No such file or directory" for a file it may not read
        with open(path, "rb"):
            pass
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied: make it readable by the user that loads the model "
                              "(e.g. chmod a+r; an export under umask 077 writes files only its owner reads)") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except CheckpointError:
        raise
    except Exception as exc:  # header damage: SafetensorError, OSError, ...
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}); a copy cut "
                              "short or damaged? copy it again, or export the model again") from None


def read_safetensors_metadata(path: PathLike) -> dict[str, str]:
    """The metadata of a safetensors file (its header only); {} when it cannot be read
    (:func:`safetensors_metadata` says why instead)."""
    try:
        return safetensors_metadata(path)
    except CheckpointError:  # the caller compares it with what it read before: a difference is what counts
        return {}


def save_safetensors(tensors: Mapping[str, Tensor], path: PathLike, metadata: Optional[dict] = None) -> None:
    """Write ``tensors`` with their digest in the metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={**(metadata or {}), "format": "pt", DIGEST_KEY: tensor_digest(tensors)})
