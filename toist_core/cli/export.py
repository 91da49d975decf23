"""``toist export``: turn a checkpoint into a toist model directory (what robots load).

    toist export toist_distilled.pth toist_distilled/ --text-encoder roberta-base
    toist export toist_distilled.pth toist_distilled/ --text-encoder /data/roberta-base
    toist export runs/distill/BEST_checkpoint.pth models/my_distilled

Takes an official TOIST / MDETR ``.pth`` or a checkpoint of ``toist train`` (whose model
config, pronoun, input size and tasks come from the checkpoint itself). The file is read
safely (tensors + argparse.Namespace only), checked for corruption and loaded strictly
before anything is written; the directory (config.yaml, model.safetensors, tokenizer/,
memory_bank.safetensors for distilled models) then replaces any old one as a whole.

The directory is self-contained: the tokenizer files are copied into it (and checked to load
from there alone), so a robot without internet loads it with no hub:
``TaskSegmenter.from_pretrained(dir)``, ``toist predict --checkpoint dir``, or the node's
``checkpoint:=dir``. An official ``.pth`` holds the RoBERTa weights but not its tokenizer, so
run the export where ``--text-encoder`` can be had: a machine with internet (``roberta-base``
is fetched once into the Hugging Face cache) or a local copy of the tokenizer files.

``--onnx`` adds the per-frame network as ONNX graphs (detector.onnx, mask_head.onnx) for the
``onnxruntime`` / ``tensorrt`` backends, to an existing model directory or to the one being
exported, checked before they are installed: ONNX Runtime (CPU, fp32) against PyTorch on random
images of three sizes, two of the model's tasks and a free-text caption; the command fails when
logits or boxes differ by more than 1e-4 or a mask IoU is under 0.999, and the directory keeps
the graphs it had (exporting a checkpoint with --onnx: the new directory and its graphs are
checked before either replaces anything, so the old directory stays as it was, graphs and all):

    toist export --onnx models/my_distilled
    toist export toist_distilled.pth toist_distilled/ --text-encoder roberta-base --onnx
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="turn an official or training checkpoint into a model directory",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="official TOIST/MDETR .pth file or a toist training checkpoint "
                                      "(with --onnx alone: an existing model directory)")
    p.add_argument("directory", nargs="?", default=None,
                   help="output model directory (created, or replaced as a whole)")
    p.add_argument("--text-encoder", default=None,
                   help="tokenizer copied into the directory: a hub name (the local Hugging Face cache first, "
                        "then the hub) or a local directory (default: the training checkpoint's or --config's "
                        "text.tokenizer, else roberta-base)")
    p.add_argument("--config", default=None, help="model config YAML (default: read from the checkpoint)")
    p.add_argument("--pronoun", default=None, help="pronoun of the captions (default: the checkpoint's, "
                                                   "else something)")
    p.add_argument("--weights", choices=["ema", "model"], default=None,
                   help="EMA weights when the file has them, or the raw model weights (default: the ones the "
                        "file's run evaluated: raw after a toist run's eval.use_ema: false, else EMA)")
    p.add_argument("--onnx", action="store_true",
                   help="also write the ONNX graphs of the network into the model directory and check them "
                        "against PyTorch (backend: onnxruntime | tensorrt)")
    p.add_argument("--onnx-exporter", choices=["torchscript", "dynamo"], default="torchscript",
                   help="torch's ONNX exporter: the tracing one (default, fast) or torch.export + onnxscript")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import typed_config
    from ..checkpoint import CheckpointError, export_model_dir, show_load_summary
    from ..config import ModelConfig

    if args.directory is None:
        if not args.onnx:
            print("toist export: give the output directory (toist export CHECKPOINT DIRECTORY), or --onnx to add "
                  "ONNX graphs to an existing model directory", file=sys.stderr)
            return 2
        return run_onnx(args.checkpoint, args.onnx_exporter)
    show_load_summary()  # one line: what the file held (mask head, memory bank, EMA, tokenizer source)
    config = typed_config.load_yaml(ModelConfig, args.config) if args.config else None
    checked: dict = {}
    refused: list = []

    def add_onnx(staged) -> None:
        # In the new directory before it replaces the old: a failed check leaves the old one,
        # graphs and all (replaced first, it was left with new weights and no graphs).
        from ..inference.onnx_export import export_checked

        try:
            checked.update(export_checked(staged, exporter=args.onnx_exporter, shown=args.directory))
        except CheckpointError as exc:
            refused.append(exc)
            raise

    try:
        loaded = export_model_dir(args.checkpoint, args.directory, text_encoder=args.text_encoder, config=config,
                                  pronoun=args.pronoun, weights=args.weights,
                                  before_install=add_onnx if args.onnx else None)
    except CheckpointError:
        if not refused:
            raise
        print(f"toist export --onnx: {refused[0]}; {args.directory} was not written (it stays as it was)",
              file=sys.stderr)
        return 1
    kind = "segmentation" if loaded.config.masks else "detection"
    bank = ", memory bank" if loaded.memory_bank is not None else ""
    tasks = f", tasks {','.join(map(str, loaded.tasks))}" if loaded.tasks else ""
    use = (f"e.g. checkpoint:={args.directory} for the node" if loaded.captions == "pronoun" else
           "it reads captions naming the objects, not task captions: for training and evaluation, not the node")
    print(f"{args.checkpoint} -> {args.directory} ({kind}{bank}{tasks}; tokenizer inside: loads offline; {use})")
    if args.onnx:
        _say_onnx_written(args.directory, checked)
    return 0


def run_onnx(directory: str, exporter: str) -> int:
    """Export and check the ONNX graphs of a model directory; non-zero (nothing installed) on a failed check."""
    from ..checkpoint import CheckpointError
    from ..inference.onnx_export import export_checked

    try:
        result = export_checked(directory, exporter=exporter)
    except CheckpointError as exc:
        print(f"toist export --onnx: {exc}", file=sys.stderr)
        return 1
    _say_onnx_written(directory, result)
    return 0


def _say_onnx_written(directory: str, result: dict) -> None:
    from ..inference.onnx_export import describe_check

    print(f"{directory}: detector.onnx{', mask_head.onnx' if result['masks'] else ''} written; "
          f"check passed: {describe_check(result)}")
    print("use it with InferenceConfig(backend='onnxruntime') (or 'tensorrt' on an NVIDIA GPU), or the node's "
          "backend parameter (ros2 launch toist_ros perception.launch.py checkpoint:=<dir> backend:=onnxruntime)")
    return 0
