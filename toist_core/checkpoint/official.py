"""Official TOIST / MDETR ``.pth`` files (and toist's own training checkpoints) as weights.

Official files (``main.py`` of the reference) are pickled dicts::

    {"model", "model_ema", "model_noun", "model_noun_ema", "optimizer", "epoch",
     "args": argparse.Namespace, "cluster_criterion": memory bank state or None}

toist's training checkpoints (``training/checkpointing.py``) are a superset with
``"format": "toist-train"`` and the run's ``config``, whose ``model`` section is used as the
model config. The weights used are ``model_ema`` when present (the reported numbers are the
EMA's), else ``model``. Accepted quirks of the released files: the ``detr.`` prefix of
segmentation checkpoints, the ``transformer.text_encoder.embeddings.position_ids`` buffer of
transformers < 4.31, the 512-row position table of the "without pretraining" models, and
``cluster_criterion`` (the memory bank and centres of distilled models).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from torch import Tensor

from .errors import CheckpointError, PathLike
from .files import safe_torch_load

POSITION_IDS_KEY = "transformer.text_encoder.embeddings.position_ids"
SEGM_PREFIX = "detr."
BANK_KEYS = ("feature_bank", "cluster_centers", "update_count", "full_label")
TRAIN_FORMAT = "toist-train"   # training/checkpointing.py FORMAT


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


@dataclass
class OfficialCheckpoint:
    """What an official (TOIST / MDETR) file or a toist training checkpoint holds, ready for
    strict loading.

    state_dict:    the chosen weights (``model_ema`` if present, else ``model``), without the
                   ``position_ids`` buffer, names as in the file (``detr.`` kept).
    source_key:    which entry the weights came from (``model_ema``, ``model`` or ``<file>``
                   for a bare state_dict).
    args:          the training ``argparse.Namespace`` (or None).
    cluster_state: ``cluster_criterion`` buffers of a distilled model (or None).
    had_position_ids: the file carried the ``position_ids`` buffer.
    train_config:  toist training checkpoints: the run's configuration as plain data (its
                   ``model`` section is the exact model config; official files have none).
    """

    path: str
    state_dict: dict[str, Tensor]
    source_key: str
    args: Optional[argparse.Namespace] = None
    cluster_state: Optional[dict[str, Tensor]] = None
    had_position_ids: bool = False
    train_config: Optional[dict] = None

    @property
    def is_segmentation(self) -> bool:
        return any(k.startswith(SEGM_PREFIX) for k in self.state_dict)

    def detector_state_dict(self) -> dict[str, Tensor]:
        """Weights of the detector alone: ``detr.`` stripped, mask-head tensors dropped (what the
        reference's ``--resume`` does to load a segmentation file into a detector)."""
        if not self.is_segmentation:
            return dict(self.state_dict)
        return {k[len(SEGM_PREFIX):]: v for k, v in self.state_dict.items() if k.startswith(SEGM_PREFIX)}


def read_official(path: PathLike, weights: str = "ema") -> OfficialCheckpoint:
    """Read an official TOIST / MDETR checkpoint, a toist training checkpoint (``checkpoint.pth``
    of ``toist train``) or a bare state_dict file, safely and checked for corruption.

    ``weights``: ``"ema"`` takes ``model_ema`` when present, else ``model``; ``"model"`` takes
    ``model`` (the raw weights of the last update)."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights: expected 'ema' or 'model', got {weights!r}")
    path = Path(path)
    blob = safe_torch_load(path)
    args = None
    cluster_state = None
    if _is_state_dict(blob):
        state, source = dict(blob), "<file>"
    elif isinstance(blob, Mapping):
        if weights == "ema" and blob.get("model_ema") is not None:
            state, source = blob["model_ema"], "model_ema"
        elif blob.get("model") is not None:
            state, source = blob["model"], "model"
        else:
            raise CheckpointError(f"{path}: no 'model_ema' or 'model' weights in the checkpoint "
                                  f"(keys: {sorted(map(str, blob))})")
        if not _is_state_dict(state):
            raise CheckpointError(f"{path}: '{source}' is not a state_dict of tensors")
        state = dict(state)
        args = blob.get("args")
        if args is not None and not isinstance(args, argparse.Namespace):
            raise CheckpointError(f"{path}: 'args' is a {type(args).__name__}, expected argparse.Namespace")
        cluster_state = blob.get("cluster_criterion")
        if cluster_state is not None:
            if not _is_state_dict(cluster_state):
                raise CheckpointError(f"{path}: 'cluster_criterion' is not a dict of tensors")
            missing = [k for k in BANK_KEYS if k not in cluster_state]
            if missing:
                raise CheckpointError(f"{path}: 'cluster_criterion' lacks {missing} (has {sorted(cluster_state)})")
            cluster_state = dict(cluster_state)
    else:
        raise CheckpointError(f"{path}: expected a checkpoint dict, found a {type(blob).__name__}")
    train_config = None
    if isinstance(blob, Mapping) and blob.get("format") == TRAIN_FORMAT:
        train_config = blob.get("config")
        if not isinstance(train_config, Mapping) or not isinstance(train_config.get("model"), Mapping):
            raise CheckpointError(f"{path}: a {TRAIN_FORMAT} checkpoint without its 'config.model' section")
    state, had_position_ids = _drop_position_ids(state, path)
    return OfficialCheckpoint(str(path), state, source, args, cluster_state, had_position_ids, train_config)


def _drop_position_ids(state: dict[str, Tensor], where: PathLike) -> tuple[dict[str, Tensor], bool]:
    """Remove the ``position_ids`` buffer (newer transformers do not keep it in the state_dict)
    after checking it is the ``[1, P]`` integer row of the ``P``-row position table."""
    found = False
    for prefix in ("", SEGM_PREFIX):
        key = prefix + POSITION_IDS_KEY
        if key not in state:
            continue
        found = True
        ids = state.pop(key)
        table = state.get(prefix + "transformer.text_encoder.embeddings.position_embeddings.weight")
        rows = table.shape[0] if table is not None else None
        if ids.dtype.is_floating_point or ids.ndim != 2 or ids.shape[0] != 1 or (rows is not None and ids.shape[1] != rows):
            raise CheckpointError(f"{where}: {key} has shape {tuple(ids.shape)} / {ids.dtype}; expected "
                                  f"[1, {rows}] integers (one id per position-table row)")
    return state, found
