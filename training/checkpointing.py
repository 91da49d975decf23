"""Training checkpoints: atomic writes, the reference's container layout, exact-resume state.

Layout (a superset of the official ``checkpoint.pth``, so ``model`` / ``model_ema`` /
``model_noun`` / ``cluster_criterion`` load where the official files do)::

    {"format": "toist-train", "version": 1, "stage": str,
     "model": state_dict, "model_ema": state_dict | None,
     "model_noun": state_dict | None, "model_noun_ema": state_dict | None,
     "optimizer": state_dict, "scheduler": {...}, "scaler": state_dict | None,
     "epoch": int,           # epochs completed
     "step": int,            # optimizer updates done (the run resumes at this update)
     "rng": [per-rank generator states],
     "cluster_criterion": memory-bank state_dict | None,
     "cluster_stale": [T] bool | None,   # tasks whose centres k-means has yet to recompute
     "config": the TrainConfig as plain data, "best": {...}, "metrics": {...},
     "last_eval_step": int,  # the update last evaluated
     "eval_pending": bool}   # update `step`'s evaluation raised (written then): a resume repeats it

Everything is plain tensors, numbers, strings, lists and dicts, so the files load with
``torch.load(weights_only=True)``; unlike the reference no ``argparse.Namespace`` is pickled.
A file is written to a temporary name in the same folder, flushed to disk, then renamed over
the target: a crash mid-write never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from toist_core.checkpoint.errors import CheckpointError  # one error class for every checkpoint
from toist_core.checkpoint.files import check_torch_file
from toist_core.checkpoint.strict import refuse_non_finite
from toist_core.atomic_file import atomic_write

FORMAT = "toist-train"
VERSION = 1
TMP_SUFFIX = ".tmp"
_REQUIRED = ("model", "optimizer", "scheduler", "step", "epoch", "config", "stage")


def atomic_save(obj: Any, path: Union[str, Path]) -> Path:
    """``torch.save`` to ``path`` through a temporary file and an atomic rename."""
    return atomic_write(path, lambda handle: torch.save(obj, handle), suffix=TMP_SUFFIX)


def remove_stale_temporaries(folder: Union[str, Path]) -> list[Path]:
    """Delete the temporary files of :func:`atomic_save` writes that never finished (a SIGKILL
    or power loss mid-write leaves a checkpoint-sized ``.<name>.<random>.tmp``); returns them.
    Call it only where no other process writes into ``folder``: at the start of a run."""
    folder = Path(folder)
    stale = sorted(folder.glob(f".*.pth.*{TMP_SUFFIX}")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def load_training_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> dict:
    """Read and sanity-check a training checkpoint (corruption included); errors name the file
    and what is wrong."""
    path = check_torch_file(path)   # exists, is a torch.save archive, every CRC-32 intact
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, not a torch file, pickled foreign objects ...
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a toist training checkpoint (format={ckpt.get('format')!r}); "
                              "to start from model weights use init.load / init.load_noun instead of --resume")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')!r}, this code reads {VERSION}")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {missing}")
    problem = _layout_problem(ckpt)
    if problem:
        raise CheckpointError(f"{path} {problem} (an edited file, or one of another version); nothing was loaded")
    return ckpt


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layout_problem(ckpt: dict) -> Optional[str]:
    """``"[field]: what is wrong"`` for a field whose type is not what a resume reads, else None:
    such a file failed half-way through a resume with a bare KeyError / AttributeError (after
    the run had written to its folder), or was read wrongly (``step`` 3.7 resumed at update 3)."""
    for name in ("step", "epoch"):
        if not _whole(ckpt[name]) or ckpt[name] < 0:
            return f"[{name}]: {ckpt[name]!r}, not a whole number of updates / epochs"
    for name in ("last_eval_step", "world_size"):
        if name in ckpt and not _whole(ckpt[name]):
            return f"[{name}]: {ckpt[name]!r}, not a whole number"
    if "eval_pending" in ckpt and not isinstance(ckpt["eval_pending"], bool):
        return f"[eval_pending]: {ckpt['eval_pending']!r}, not true / false"
    for name in ("model", "optimizer", "scheduler"):
        if not isinstance(ckpt[name], dict):
            return f"[{name}]: a {type(ckpt[name]).__name__}, not a mapping"
    if not isinstance(ckpt["stage"], str):
        return f"[stage]: {ckpt['stage']!r}, not a stage name"
    for name in ("config", "best", "metrics"):
        if ckpt.get(name) is not None and not isinstance(ckpt[name], dict):
            return f"[{name}]: a {type(ckpt[name]).__name__}, not a mapping"
    best = ckpt.get("best")
    if best is not None and not _whole(best.get("step")):
        return f"[best]: step {best.get('step')!r}, not a whole number (best = {best!r})"
    groups = ckpt["optimizer"].get("param_groups", [])   # none: the resume's group count says so
    if not isinstance(groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) and all(_whole(i) for i in g["params"])
            for g in groups):
        return "[optimizer]: param_groups is not a list of groups, each with its list of parameter numbers"
    if not isinstance(ckpt["optimizer"].get("state", {}), dict):
        return "[optimizer]: state is not a mapping"
    rng = ckpt.get("rng")
    if rng is not None:
        if not isinstance(rng, list):
            return f"[rng]: a {type(rng).__name__}, not a list of per-process states"
        for rank, state in enumerate(rng):
            problem = _rng_problem(state)
            if problem:
                return f"[rng][{rank}]: {problem}"
    return None


def _rng_problem(state: Any) -> Optional[str]:
    """What keeps ``restore_rng_state`` from restoring ``state`` (tried on this process's CPU
    generators, which are put back as they were), or None."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a generator state"
    cuda = state.get("cuda")
    if cuda is not None and not (isinstance(cuda, torch.Tensor) and cuda.dtype == torch.uint8):
        return "cuda: not a CUDA generator state"
    saved = capture_rng_state(torch.device("cpu"))
    try:
        restore_rng_state({**state, "cuda": None}, torch.device("cpu"))
    except Exception as exc:   # the generators say what they refuse (wrong sizes, types, names)
        return f"not a generator state that restores ({type(exc).__name__}: {exc})"
    finally:
        restore_rng_state(saved, torch.device("cpu"))
    return None


def check_state_dict(state: Optional[dict], module: torch.nn.Module, where: str) -> None:
    """Refuse a state_dict whose keys or shapes differ from ``module``'s, or that holds NaN / inf
    (before loading anything)."""
    if state is None:
        raise CheckpointError(f"{where}: missing")
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{where}: keys differ from the model built from the config "
                              f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})")
    for key, tensor in own.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{where}: {key} has shape {tuple(state[key].shape)}, "
                                  f"the model expects {tuple(tensor.shape)}")
    refuse_non_finite(state, where)


def check_per_rank_centres(per_rank: Optional[list], shape: tuple, where: str) -> None:
    """Refuse per-process cluster centres (``cluster_centers_per_rank``) of another shape than the
    bank's ``shape``, or holding NaN / inf; None (a file without them) passes."""
    if per_rank is None:
        return
    for rank, centres in enumerate(per_rank):
        if not isinstance(centres, torch.Tensor) or tuple(centres.shape) != tuple(shape):
            got = tuple(centres.shape) if isinstance(centres, torch.Tensor) else type(centres).__name__
            raise CheckpointError(f"{where}: process {rank}'s centres are {got}, the bank's are {tuple(shape)}")
    refuse_non_finite({f"process {rank}": centres for rank, centres in enumerate(per_rank)}, where)


def check_optimizer_state(state: dict, where: str) -> None:
    """Refuse an optimizer state whose moments hold NaN / inf: its first step would make every
    weight it updates NaN, and the next checkpoint would replace the good one with them."""
    tensors = {f"state.{index}.{name}": value for index, moments in state.get("state", {}).items()
               for name, value in moments.items() if isinstance(value, torch.Tensor)}
    refuse_non_finite(tensors, where)


def capture_rng_state(device: torch.device) -> dict:
    """This process's random generators (Python, NumPy, torch CPU and, on GPU, CUDA)."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, torch.tensor(mt_state, dtype=torch.int64), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in mt_state.tolist()), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def prune_step_checkpoints(folder: Path, keep: int, pattern: str = "checkpoint_step*.pth") -> None:
    """Keep the ``keep`` newest numbered step checkpoints (by step number), delete the rest."""
    if keep <= 0:
        return
    files = sorted(folder.glob(pattern), key=lambda p: int("".join(ch for ch in p.stem if ch.isdigit()) or 0))
    for old in files[:-keep]:
        old.unlink(missing_ok=True)
