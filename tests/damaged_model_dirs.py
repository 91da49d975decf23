"""Model directories toist itself would not write, for the loaders' refusals: what a damaged copy,
a hand edit or an older toist version can leave on a robot."""

from pathlib import Path
from typing import Callable

import torch

from toist_core.checkpoint.integrity import save_safetensors
from toist_core.checkpoint.model_dir import WEIGHTS_FILE


def with_weights_edited(directory: Path, edit: Callable[[dict], None]) -> Path:
    """Rewrite ``directory``'s weights through ``edit(tensors)``, metadata kept and the digest
    recomputed (so the loader's value checks, not its digest check, meet the edit).
    ``save_model_dir`` refuses a model holding NaN / inf: this is how such a directory is made."""
    from safetensors import safe_open

    path = Path(directory) / WEIGHTS_FILE
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    edit(tensors)
    metadata.pop("format", None)
    save_safetensors(tensors, path, metadata=metadata)
    return Path(directory)


def fill(tensors: dict, contains: str, value: float) -> list[str]:
    """Fill every tensor whose name contains ``contains`` with ``value``; their names."""
    names = [name for name in tensors if contains in name]
    assert names, f"no tensor named *{contains}*"
    for name in names:
        tensors[name] = torch.full_like(tensors[name], value)
    return names
