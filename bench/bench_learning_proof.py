"""Learning proof on CPU: the TOIST stages learn the synthetic COCO-Tasks world.

Runs the embedded default model's recipe (``training.default_model``: synthetic data, grounding
pre-training, noun teacher, plain and distilled students, mask heads) into its own directory
and prints mAP@0.5 (box and mask, mean over tasks) on the held-out synthetic test split for
every model next to an untrained one of the same configuration:

    python bench/bench_learning_proof.py --out /tmp/toist_learning_proof [--ablations]

About 50 minutes on 2 CPU cores; ``--quick`` runs a few updates per stage (checks the script,
proves nothing). Nothing is installed into the package (``make default-model`` does that).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import default_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/toist_learning_proof")
    parser.add_argument("--ablations", action="store_true", help="also CCR / CL / SBTL off, one at a time")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    return default_model.main(["--out", args.out] + ["--ablations"] * args.ablations + ["--quick"] * args.quick)


if __name__ == "__main__":
    sys.exit(main())
