"""Turn a training checkpoint into a toist model directory (what robots and ``toist predict`` load).

    python -m training.export runs/distill/BEST_checkpoint.pth models/toist_distilled

The same as ``toist export`` (one code path: :func:`toist_core.checkpoint.export_model_dir`):
the model config, pronoun, input size, tasks and memory bank come from the checkpoint; the
weights are the ones the run evaluated by default: EMA (the reference's reported numbers are
the EMA model's) unless its ``eval.use_ema`` was false.
Training writes ``<output_dir>/model`` this way at the end of a run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

from toist_core.checkpoint import export_model_dir


def export_checkpoint(path: Union[str, Path], directory: Union[str, Path], weights: Optional[str] = None) -> Path:
    """Write ``directory`` from a training checkpoint (``weights``: "ema", "model", or None: the
    ones the run evaluated)."""
    export_model_dir(path, directory, weights=weights)
    return Path(directory)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint.pth / BEST_checkpoint.pth of a training run")
    parser.add_argument("directory", help="output model directory")
    parser.add_argument("--weights", choices=["ema", "model"], default=None,
                        help="default: the weights the run evaluated (EMA unless eval.use_ema was false)")
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
