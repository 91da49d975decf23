"""``toist export``: convert an official TOIST/MDETR ``.pth`` into a toist model directory.

    toist export toist_distilled.pth models/toist_distilled --text-encoder /data/roberta-base

The directory (config.yaml, model.safetensors, tokenizer/, memory_bank.safetensors for
distilled models) loads without network: ``TaskSegmenter.from_pretrained(dir)``. The
checkpoint is read safely (tensors + argparse.Namespace only) and loaded strictly first.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="convert an official checkpoint into a model directory",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="official TOIST/MDETR .pth file")
    p.add_argument("directory", help="output model directory (created)")
    p.add_argument("--text-encoder", default=None,
                   help="tokenizer source copied into the directory: hub name or local directory "
                        "(default: the --config's text.tokenizer, else roberta-base)")
    p.add_argument("--config", default=None, help="model config YAML (default: read from the checkpoint)")
    p.add_argument("--pronoun", default=None, help="pronoun of the captions (default: something)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import typed_config
    from ..checkpoint import export_official
    from ..config import ModelConfig

    config = typed_config.load_yaml(ModelConfig, args.config) if args.config else None
    loaded = export_official(args.checkpoint, args.directory, text_encoder=args.text_encoder, config=config,
                             pronoun=args.pronoun)
    kind = "segmentation" if loaded.config.masks else "detection"
    bank = ", memory bank" if loaded.memory_bank is not None else ""
    print(f"{args.checkpoint} -> {args.directory} ({kind}{bank})")
    return 0
