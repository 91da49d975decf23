"""Checkpoint I/O: official TOIST / MDETR ``.pth`` files, toist training checkpoints and
toist's own model directory.

- :mod:`.files`: reading a ``.pth`` safely (``weights_only``, CRC-checked, clear refusals).
- :mod:`.official`: what an official or training file holds (:func:`read_official`).
- :mod:`.architecture`: the model config of a file (from its shapes or its stored config).
- :mod:`.strict`: loading every tensor or nothing.
- :mod:`.model_dir`: the offline model directory (config.yaml + safetensors + tokenizer).
- :mod:`.load`: :func:`load_pretrained` and :func:`export_model_dir` over all of these.
- :mod:`.integrity`, :mod:`.atomic_dir`: corruption checks and whole-directory replacement.
- :mod:`.default_model`: the embedded default model directory (synthetic scenes only).
"""

from .architecture import Architecture, config_for_checkpoint, detect_architecture, text_config_from_source
from .default_model import DEFAULT_MODEL_DIR, default_model_dir, default_model_note, require_default_model_dir
from .errors import CheckpointError
from .files import safe_torch_load
from .load import export_model_dir, load_official, load_pretrained, show_load_summary
from .loaded import LoadedModel
from .model_dir import (BANK_FILE, CONFIG_FILE, MODEL_DIR_FORMAT, MODEL_DIR_VERSION, TOKENIZER_DIR, WEIGHTS_FILE,
                        ModelDirConfig, is_model_dir, load_model_dir, save_model_dir)
from .official import BANK_KEYS, POSITION_IDS_KEY, SEGM_PREFIX, OfficialCheckpoint, read_official
from .strict import (build_memory_bank, load_official_weights, load_state_dict_strict, refuse_non_finite,
                     state_dict_problems)

__all__ = [
    "Architecture", "BANK_FILE", "BANK_KEYS", "CONFIG_FILE", "CheckpointError", "DEFAULT_MODEL_DIR", "LoadedModel",
    "MODEL_DIR_FORMAT", "default_model_dir", "default_model_note", "require_default_model_dir",
    "MODEL_DIR_VERSION", "ModelDirConfig", "OfficialCheckpoint", "POSITION_IDS_KEY", "SEGM_PREFIX", "TOKENIZER_DIR",
    "WEIGHTS_FILE", "build_memory_bank", "config_for_checkpoint", "detect_architecture", "export_model_dir",
    "is_model_dir", "load_model_dir", "load_official", "load_official_weights", "load_pretrained",
    "load_state_dict_strict", "read_official", "refuse_non_finite", "safe_torch_load", "save_model_dir",
    "show_load_summary", "state_dict_problems",
    "text_config_from_source",
]
