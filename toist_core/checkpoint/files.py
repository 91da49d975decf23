"""Reading a ``.pth`` file safely: what it is, whether it is intact, and nothing but tensors.

Checked before unpickling anything: the file exists, starts like a file ``torch.save``
writes (a zip archive, or a legacy pickle) and, for zip archives, every record passes its
CRC-32 (:func:`~toist_core.checkpoint.integrity.verify_zip`). Then ``torch.load`` with
``weights_only=True`` and one extra allowed class, ``argparse.Namespace`` (the official files'
``args``): any other pickled object is refused, by name.

A zip archive is memory-mapped (``mmap=True``), not read whole: a distillation file holds the
optimizer state, the teacher and a raw and an EMA copy of the model (~6 GB), of which a load uses
one state_dict; mapped, only the pages of the tensors that are read come into memory (as page
cache the system can drop again). Legacy (pre-zip) files cannot be mapped and are read whole.
"""

from __future__ import annotations

import argparse
import pathlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, PathLike
from .integrity import ZIP_MAGIC, verify_zip

# Non-tensor classes an official checkpoint may contain (its `args`): MDETR's submitit runs (how
# its pre-trained R101 file was trained) store `output_dir` / `job_dir` as paths. Unpickling a
# path calls its class on strings, nothing else.
# Both as this Python names them (pathlib._local.PosixPath from 3.13) and as older pickles do.
_PATH_CLASSES = (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.PureWindowsPath)
SAFE_GLOBALS = [argparse.Namespace, *_PATH_CLASSES, *((cls, f"pathlib.{cls.__name__}") for cls in _PATH_CLASSES)]
_PICKLE_PROTO = b"\x80"  # legacy torch.save files start with a pickle (protocol >= 2)

# What `toist train` writes into its output_dir beside its config.yaml (training/start_checks.py
# BEST, LAST, EPOCH_PATTERN, MODEL_DIR; the first bytes of training/config.py RUN_CONFIG_HEADER),
# restated here: a robot installs toist_core without `training`. A run folder has a config.yaml
# as a model directory has, and is none: its config.yaml is the run's configuration.
RUN_CHECKPOINTS = ("BEST_checkpoint.pth", "checkpoint.pth")   # the best weights first, then the last
RUN_EPOCH_PATTERN = "checkpoint_epoch*.pth"
RUN_MODEL_DIR = "model"
RUN_CONFIG_MARK = b"# toist train:"
_CONFIG = "config.yaml"   # model_dir.CONFIG_FILE (model_dir imports this module)
_WEIGHTS = "model.safetensors"   # model_dir.WEIGHTS_FILE
_MODEL_DIR_FORMAT = "toist-model"   # model_dir.MODEL_DIR_FORMAT


def is_run_folder(folder: PathLike) -> bool:
    """Whether ``folder`` is the output_dir of a ``toist train`` run: its config.yaml starts with
    the line toist train writes, or (runs written before that line) records no model-directory
    ``format`` and the folder holds a run's checkpoint."""
    folder = Path(folder).expanduser()
    config = folder / _CONFIG
    if not config.is_file():
        return False
    try:
        with open(config, "rb") as handle:
            if handle.read(len(RUN_CONFIG_MARK)) == RUN_CONFIG_MARK:
                return True
    except OSError:
        return False
    return bool(_run_checkpoints(folder)) and _recorded_format(config) != _MODEL_DIR_FORMAT


def _recorded_format(config: Path) -> object:
    """The top-level ``format`` of a config.yaml (None when it records none or does not read)."""
    import yaml

    from ..yaml_text import parse_yaml

    try:
        data = parse_yaml(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data.get("format") if isinstance(data, dict) else None


def _run_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints to give of a run folder: BEST_checkpoint.pth and checkpoint.pth where they
    exist, else its latest numbered copy (none: the run has written no checkpoint yet)."""
    found = [folder / name for name in RUN_CHECKPOINTS if (folder / name).is_file()]
    epochs = sorted(folder.glob(RUN_EPOCH_PATTERN))
    return found or epochs[-1:]


def run_folder_note(folder: PathLike, purpose: str = "load") -> str:
    """What to give instead of a ``toist train`` run folder, naming only what it holds.

    ``purpose``: ``"load"`` (a model: a checkpoint or its exported model directory), ``"convert"``
    (``toist export``: a checkpoint file), ``"checkpoint"`` (a checkpoint file and nothing else:
    a mask stage's frozen detector) or ``"onnx"`` (``toist export --onnx``: a model directory).
    """
    folder = Path(folder).expanduser()
    checkpoints = _run_checkpoints(folder)
    model = folder / RUN_MODEL_DIR if (folder / RUN_MODEL_DIR / _CONFIG).is_file() else None
    what = f"{folder}: a toist train run folder (its {_CONFIG} is the run's configuration), not "
    files = (f"{checkpoints[0]}" + (f" (or {checkpoints[1]})" if len(checkpoints) > 1 else "")) if checkpoints else ""
    exported = f"{model} (its exported model directory)" if model is not None else ""
    if purpose in ("convert", "checkpoint"):
        if not checkpoints:
            return what + "a checkpoint file, and it holds no checkpoint yet: give one once the run has written it"
        return (what + f"a checkpoint file: give {files}"
                + (f"; {model} is the model directory it exported already" if model is not None
                   and purpose == "convert" else ""))
    if purpose == "onnx":
        if model is not None:
            return what + f"a model directory: give {exported}"
        source = checkpoints[0] if checkpoints else f"{folder / RUN_CHECKPOINTS[0]}"
        return what + f"a model directory, and it holds none yet: export one first (`toist export {source} " \
                      "<model_dir> --onnx`)"
    choices = [choice for choice in (files, exported) if choice]
    if not choices:
        return what + "a model directory, and it holds no checkpoint yet: give one once the run has written it"
    return what + "a model directory: give " + ", or ".join(choices)


def refuse_run_folder(path: PathLike, purpose: str = "load") -> None:
    """CheckpointError naming what to give instead when ``path`` is a ``toist train`` run folder
    (``purpose``: :func:`run_folder_note`'s): it has a config.yaml as a model directory has."""
    if is_run_folder(path):
        raise CheckpointError(run_folder_note(path, purpose))


def check_torch_file(path: PathLike) -> Path:
    """Refuse a missing file, one that is not a ``torch.save`` file, or a damaged archive."""
    return _checked_torch_file(path)[0]


def _checked_torch_file(path: PathLike) -> tuple[Path, bytes]:
    """:func:`check_torch_file`'s path, and the file's first bytes (a zip archive's or a pickle's)."""
    path = Path(path).expanduser()
    if path.is_dir():
        refuse_run_folder(path)
        if (path / _CONFIG).is_file():   # not a run folder (above): a model directory
            raise CheckpointError(f"{path}: a model directory, not a checkpoint file (torch.save); give the .pth it "
                                  "was exported from")
        raise CheckpointError(f"{path}: a folder without config.yaml, so not a model directory; {_folder_hint(path)}")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not (head == ZIP_MAGIC or head[:1] == _PICKLE_PROTO):
        hint = ""
        if path.suffix == ".safetensors":
            hint = (f"; it is a model directory's weights file: give its folder, {path.parent}"
                    if (path.parent / _CONFIG).is_file() or path.name == _WEIGHTS else
                    "; a .safetensors file alone is not a checkpoint toist reads: give the official .pth file, or "
                    "a model directory that toist export wrote")
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (it starts with bytes {head!r}; a file "
                              f"written by torch.save is a zip archive starting with b'PK\\x03\\x04'){hint}")
    verify_zip(path)
    return path, head


def _folder_hint(folder: Path) -> str:
    """What the folder given as a checkpoint probably is: a copy that lost its config.yaml, a
    copy nested one level down (``cp -r model /models/model/`` onto an existing folder), or an
    unzipped download with the .pth inside."""
    entries = sorted(folder.iterdir())
    if any(entry.name == _WEIGHTS for entry in entries):
        return "it holds model.safetensors: an incomplete copy of a model directory (config.yaml is missing); copy it again"
    nested = [entry for entry in entries if (entry / _CONFIG).is_file() and not is_run_folder(entry)]
    if nested:
        return f"it holds the model directory {nested[0]} (a copy nested one level down?): give that folder"
    files = [entry.name for entry in entries if entry.suffix == ".pth"]
    if files:
        return f"give the checkpoint file inside it ({', '.join(files[:3])})"
    return "give a model directory (config.yaml, model.safetensors, tokenizer/) or a checkpoint file (.pth)"


def safe_torch_load(path: PathLike) -> Any:
    """``torch.load`` (``weights_only=True``, ``argparse.Namespace`` allowed) of a checked file.

    Zip archives are memory-mapped: their tensors are views of the file's pages (private, copy
    on write: changing one never writes to the file), read when used. Whoever keeps weights
    beyond the load copies them (``load_state_dict`` copies into the model's own parameters), so
    a file replaced afterwards (training renames a new one over it) changes no loaded model."""
    path, head = _checked_torch_file(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            # A zip archive or a legacy pickle, checked; torch refuses mmap=True for the latter.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=head == ZIP_MAGIC)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc)) or re.search(r"Unsupported global: ([\w.]+)", str(exc))
        if found is None:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
        raise CheckpointError(
            f"{path}: refused: the file contains a pickled object ({found.group(1)}) other "
            f"than tensors and argparse.Namespace; only those are loaded (torch.load weights_only=True)") from None
    except Exception as exc:  # truncated archives, foreign pickles (KeyError, EOFError, RuntimeError ...)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
