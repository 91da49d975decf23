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
# Prefixes a wrapper puts before every key of the model it wraps: DataParallel /
# DistributedDataParallel (``module.``) and torch.compile (``_orig_mod.``). A state_dict saved
# from the wrapper instead of the model holds them on every key, and nothing else is different.
# Each with the attribute that holds the wrapped model (what to save instead).
WRAPPERS = {"module.": "model.module, the module DataParallel / DistributedDataParallel wrapped",
            "_orig_mod.": "model._orig_mod, the module torch.compile wrapped"}
WRAPPER_PREFIXES = tuple(WRAPPERS)


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
    args:          the training ``argparse.Namespace`` (or None; a file that stores it as a dict,
                   ``vars(args)``, gives the same Namespace).
    cluster_state: ``cluster_criterion`` buffers of a distilled model (or None).
    cluster_stale: toist training checkpoints: ``[T]`` bool, the tasks whose stored centres
                   k-means has yet to recompute (None: not recorded, every task is).
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
    cluster_stale: Optional[Tensor] = None
    stripped_prefix: str = ""

    @property
    def is_segmentation(self) -> bool:
        return any(k.startswith(SEGM_PREFIX) for k in self.state_dict)

    def detector_state_dict(self) -> dict[str, Tensor]:
        """Weights of the detector alone: ``detr.`` stripped, mask-head tensors dropped (what the
        reference's ``--resume`` does to load a segmentation file into a detector)."""
        if not self.is_segmentation:
            return dict(self.state_dict)
        return {k[len(SEGM_PREFIX):]: v for k, v in self.state_dict.items() if k.startswith(SEGM_PREFIX)}


def read_official(path: PathLike, weights: str = "ema", network: str = "model") -> OfficialCheckpoint:
    """Read an official TOIST / MDETR checkpoint, a toist training checkpoint (``checkpoint.pth``
    of ``toist train``) or a bare state_dict file, safely and checked for corruption.

    ``weights``: ``"ema"`` takes ``model_ema`` when present, else ``model``; ``"model"`` takes
    ``model`` (the raw weights of the last update); None: the weights the file's own run
    evaluated: ``"model"`` for a toist training checkpoint of a run with ``eval.use_ema: false``
    (its best was chosen on them), else ``"ema"``. ``network``: ``"model"`` (the student / the
    model), or ``"teacher"``: a distillation file's teacher (``model_noun_ema`` / ``model_noun``)
    where the file holds one, else its model (a noun-stage file)."""
    if network not in ("model", "teacher"):
        raise ValueError(f"network: expected 'model' or 'teacher', got {network!r}")
    if weights not in ("ema", "model", None):
        raise ValueError(f"weights: expected 'ema', 'model' or None, got {weights!r}")
    path = Path(path).expanduser()
    blob = safe_torch_load(path)
    args = None
    cluster_state = None
    if _is_state_dict(blob):
        state, source = dict(blob), "<file>"
    elif isinstance(blob, Mapping):
        holds_teacher = any(blob.get(key) is not None for key in ("model_noun_ema", "model_noun"))
        state, source = _chosen_weights(blob, weights or _evaluated_weights(blob), path,
                                        "model_noun" if network == "teacher" and holds_teacher else "model")
        if not _is_state_dict(state):
            raise CheckpointError(f"{path}: '{source}' is not a state_dict of tensors")
        state = dict(state)
        args = _read_args(blob.get("args"), path)
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
    train_config, cluster_stale = None, None
    if isinstance(blob, Mapping) and blob.get("format") == TRAIN_FORMAT:
        train_config = blob.get("config")
        if not isinstance(train_config, Mapping) or not isinstance(train_config.get("model"), Mapping):
            raise CheckpointError(f"{path}: a {TRAIN_FORMAT} checkpoint without its 'config.model' section")
        cluster_stale = blob.get("cluster_stale") if cluster_state is not None else None
        if cluster_stale is not None and not isinstance(cluster_stale, Tensor):
            raise CheckpointError(f"{path}: 'cluster_stale' is a {type(cluster_stale).__name__}, expected a "
                                  "tensor of one bool per task")
    state, stripped = _strip_wrapper_prefix(state)
    state, had_position_ids = _drop_position_ids(state, path)
    return OfficialCheckpoint(str(path), state, source, args, cluster_state, had_position_ids, train_config,
                              cluster_stale, stripped)


def _evaluated_weights(blob: Mapping) -> str:
    return evaluated_weights(blob.get("config") if blob.get("format") == TRAIN_FORMAT else None)


def evaluated_weights(train_config: Optional[Mapping]) -> str:
    """"model" when a toist training run (its ``config``) evaluated its raw weights
    (``eval.use_ema: false``), else "ema" (the reference's reported numbers are the EMA's)."""
    evaluation = train_config.get("eval") if isinstance(train_config, Mapping) else None
    return "model" if isinstance(evaluation, Mapping) and evaluation.get("use_ema") is False else "ema"


def _chosen_weights(blob: Mapping, weights: str, path: Path, network: str = "model") -> tuple[Any, str]:
    """(state_dict, key) of the weights ``weights`` asks for of ``network`` (``model`` or
    ``model_noun``); the error says which entries are absent and which are None (a file saved
    without --ema has ``model_ema: None``)."""
    raw, ema = network, f"{network}_ema"
    if weights == "ema" and blob.get(ema) is not None:
        return blob[ema], ema
    if blob.get(raw) is not None:
        return blob[raw], raw

    def state_of(key: str) -> str:
        return "absent" if key not in blob else "None" if blob[key] is None else "present"

    if weights == "model" and blob.get(ema) is not None:
        raise CheckpointError(f"{path}: '{raw}' is {state_of(raw)} in the checkpoint but '{ema}' holds "
                              "weights: load the EMA weights instead (weights='ema', toist export --weights ema)")
    raise CheckpointError(f"{path}: no '{ema}' or '{raw}' weights in the checkpoint ('{ema}' is "
                          f"{state_of(ema)}, '{raw}' is {state_of(raw)}; keys: {sorted(map(str, blob))})")


def _read_args(args: Any, path: Path) -> Optional[argparse.Namespace]:
    """The reference's ``args`` as a Namespace. Some re-saved files store ``vars(args)``, a
    dict: the same fields (only a few, such as ``nheads`` and ``dilation``, are ever read)."""
    if args is None or isinstance(args, argparse.Namespace):
        return args
    if isinstance(args, Mapping):
        return argparse.Namespace(**{key: value for key, value in args.items() if isinstance(key, str)})
    raise CheckpointError(f"{path}: 'args' is a {type(args).__name__}, expected argparse.Namespace "
                          "(or a dict of its fields)")


def _strip_wrapper_prefix(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """Remove a prefix that every key carries because the weights were saved from a
    DataParallel / torch.compile wrapper (``module.``, ``_orig_mod.``); returns what was removed."""
    stripped = ""
    while True:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            return state, stripped
        state = {k[len(prefix):]: v for k, v in state.items()}
        stripped += prefix


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
