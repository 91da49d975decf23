"""Turn a training checkpoint into a toist model directory (what robots and ``toist predict`` load).

    python -m training.export runs/distill/BEST_checkpoint.pth models/toist_distilled

The model config, pronoun and memory bank come from the checkpoint itself; the weights are the
EMA ones by default (the reference's reported numbers are the EMA model's). Training writes
``<output_dir>/model`` this way at the end of a run. A training checkpoint also loads directly:
``TaskSegmenter.from_pretrained(ckpt, config=<its model config>)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

from toist_core.checkpoint import build_memory_bank, load_state_dict_strict, save_model_dir
from toist_core.config import ModelConfig
from toist_core.data.config import DataConfig
from toist_core.model import build_model, load_tokenizer
from toist_core.typed_config import from_dict

from training.checkpointing import CheckpointError, load_training_checkpoint


def export_checkpoint(path: Union[str, Path], directory: Union[str, Path], weights: str = "ema") -> Path:
    """Write ``directory`` from a training checkpoint (``weights``: "ema" or "model")."""
    ckpt = load_training_checkpoint(path)
    key = {"ema": "model_ema", "model": "model"}.get(weights)
    if key is None:
        raise ValueError(f"weights: expected 'ema' or 'model', got {weights!r}")
    if ckpt.get(key) is None:
        raise CheckpointError(f"{path}: has no {key!r} weights (trained with optim.ema: false?)")
    config = ckpt["config"]
    model_cfg = from_dict(ModelConfig, config["model"], f"{path} [config.model]")
    model = build_model(model_cfg, tokenizer=load_tokenizer(model_cfg.text.tokenizer))
    load_state_dict_strict(model, ckpt[key], where=f"{path} [{key}]")
    bank = None
    if ckpt.get("cluster_criterion") is not None:
        bank = build_memory_bank(ckpt["cluster_criterion"], where=f"{path} [cluster_criterion]")
    data_cfg = from_dict(DataConfig, config.get("data", {}), f"{path} [config.data]")
    return save_model_dir(model, directory, model_cfg, memory_bank=bank, pronoun=data_cfg.pronoun,
                          source=f"{Path(path).name} ({ckpt['stage']}, update {ckpt['step']}, {key})",
                          input_size=data_cfg.input_size())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint.pth / BEST_checkpoint.pth of a training run")
    parser.add_argument("directory", help="output model directory")
    parser.add_argument("--weights", choices=["ema", "model"], default="ema")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.directory, args.weights)
    except (ValueError, OSError) as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
