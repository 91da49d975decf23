"""The ``toist`` command: one entry point, one module per subcommand.

Each module in :data:`SUBCOMMANDS` exposes ``register(subparsers)``, which adds its parser
and sets ``func`` (called with the parsed arguments; returns an exit code). To add a
subcommand, write ``toist_core/cli/<name>.py`` and add one line below. Modules import their
heavy dependencies (torch, ...) inside ``func`` so that ``toist --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Optional, Sequence

SUBCOMMANDS = [
    "toist_core.cli.predict",
    "toist_core.cli.export",
    "toist_core.cli.synth",
    "toist_core.cli.evaluate",
    "toist_core.cli.convert",
]
# Subcommands of packages that may be absent: a robot installs toist_core without `training`.
OPTIONAL_SUBCOMMANDS = [
    "training.cli_train",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toist", description="Task-oriented instance segmentation (TOIST).")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(subparsers)
    for name in OPTIONAL_SUBCOMMANDS:
        if importlib.util.find_spec(name.split(".")[0]) is not None:
            importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "take_extra"):  # a subcommand that takes what is left (toist train: late overrides)
        args.take_extra(args, extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    # FloatingPointError: a training run stopped for NaN/inf (the message names what and where).
    except (ValueError, OSError, RuntimeError, FloatingPointError) as exc:
        print(f"toist {args.command}: error: {exc}", file=sys.stderr)
        return 2
