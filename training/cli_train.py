"""``toist train``: the training entry point as a subcommand of the ``toist`` command."""

from __future__ import annotations

import argparse

from training.train import EPILOG, __doc__ as TRAIN_DOC, add_arguments, run


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("train", help="train a TOIST stage from a YAML config (one CPU to many GPUs)",
                                   description=TRAIN_DOC, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run, command_line=["toist", "train"])
    return parser
