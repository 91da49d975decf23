"""Strict loading: every tensor or nothing, and errors that name what does not fit."""

from __future__ import annotations

from typing import Mapping, Sequence, Union

from torch import Tensor, nn

from .errors import CheckpointError, PathLike
from .official import BANK_KEYS, OfficialCheckpoint, read_official


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def state_dict_problems(module: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Human-readable differences between ``state_dict`` and ``module``'s tensors (empty = loadable)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = []
    for key, want in expected.items():
        have = state_dict.get(key)
        if have is None:
            continue
        if tuple(have.shape) != tuple(want.shape):
            misshaped.append(f"{key} (file {list(have.shape)}, model {list(want.shape)})")
        elif have.dtype.is_floating_point != want.dtype.is_floating_point:
            misshaped.append(f"{key} (file dtype {have.dtype}, model dtype {want.dtype})")
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_listing(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped tensor(s): {_listing(misshaped)}")
    return problems


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, Tensor], where: str = "checkpoint") -> None:
    """Load every tensor or nothing: any missing / unexpected / mis-shaped tensor raises
    :class:`CheckpointError` naming them."""
    problems = state_dict_problems(module, state_dict)
    if problems:
        raise CheckpointError(f"{where} does not match the model: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)


def load_official_weights(model: nn.Module, checkpoint: Union[PathLike, OfficialCheckpoint],
                          detector_only: bool = False, ignore_prefixes: Sequence[str] = ()) -> OfficialCheckpoint:
    """Strictly load an official file's weights into ``model`` (built with a matching config).

    ``detector_only``: ``model`` is a detector and the file a segmentation checkpoint: load the
    ``detr.`` weights and deliberately skip the mask head (the reference's ``--resume`` rule).
    ``ignore_prefixes``: tensors of the file to leave out on purpose, e.g. heads of an MDETR
    pre-training file that TOIST does not have (``("isfinal_embed.",)``); everything else must
    still match exactly.
    """
    ckpt = checkpoint if isinstance(checkpoint, OfficialCheckpoint) else read_official(checkpoint)
    state = ckpt.detector_state_dict() if detector_only else ckpt.state_dict
    if ignore_prefixes:
        state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore_prefixes))}
    load_state_dict_strict(model, state, where=f"{ckpt.path} [{ckpt.source_key}]")
    return ckpt


def build_memory_bank(cluster_state: Mapping[str, Tensor], where: str = "cluster_criterion"):
    """A :class:`toist_core.distill.memory_bank.MemoryBank` holding an official bank state."""
    from ..distill.memory_bank import MemoryBank

    missing = [k for k in BANK_KEYS if k not in cluster_state]
    if missing:
        raise CheckpointError(f"{where}: memory bank state lacks {missing}")
    num_tasks, size, dim = cluster_state["feature_bank"].shape
    num_clusters = cluster_state["cluster_centers"].shape[1]
    bank = MemoryBank(num_tasks=num_tasks, size=size, dim=dim, num_clusters=num_clusters)
    load_state_dict_strict(bank, {k: v.float() for k, v in cluster_state.items()}, where=where)
    return bank
