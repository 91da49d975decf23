"""Train a TOIST stage: ``python -m training.train --config training/configs/<stage>.yaml``.

    python -m training.train --config training/configs/tiny_pronoun.yaml data.root=/data/synth
    python -m training.train --config run.yaml --resume runs/pronoun/checkpoint.pth
    torchrun --standalone --nproc_per_node 4 -m training.train --config training/configs/pronoun.yaml
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m training.train --config training/configs/pronoun.yaml

Ctrl-C or SIGTERM stops a run cleanly: the update in progress finishes, ``checkpoint.pth`` is
written, the command that resumes the run is printed, and the exit status is 130 / 143.

Trailing ``key.path=value`` arguments override the YAML (values are read as YAML:
``optim.lr=1e-4``, ``data.tasks=[1,2]``, ``eval.split=test``). The configuration and every
path it names are checked before anything is built; one device needs no launcher.
Also available as ``toist train``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Optional, Sequence

EPILOG = "Stages: grounding, pronoun, noun, distill, mask_head, mask_head_distill (see docs/training.md)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training YAML (training/configs/*.yaml)")
    parser.add_argument("--resume", default=None, help="checkpoint.pth of an earlier run to continue exactly")
    parser.add_argument("--output-dir", default=None, help="overrides output_dir of the config")
    parser.add_argument("--check", action="store_true",
                        help="only read and check the configuration, its paths and its data, then exit")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="configuration overrides")
    parser.set_defaults(take_extra=functools.partial(take_late_overrides, parser))


def take_late_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: Sequence[str]) -> None:
    """Overrides typed after an option (``--check optim.lr=1e-4``), which argparse leaves over
    (``parse_known_args``): appended in order; anything else is refused with this parser's usage."""
    late = [item for item in extra if "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in late]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides or []) + late


def run(args: argparse.Namespace) -> int:
    from training.config import check_paths, config_to_dict, load_config

    overrides = list(args.overrides or [])
    if args.output_dir is not None:   # a path as written, not YAML ("runs/exp #2" lost its "#2" as a comment)
        overrides.append(f"output_dir={json.dumps(args.output_dir)}")
    cfg = load_config(args.config, overrides)
    check_paths(cfg, args.resume)
    if args.check:
        import yaml

        from training.start_checks import check_start

        check_start(cfg, args.resume)  # the refusals a real start would give, before it writes
        from toist_core.model import load_tokenizer
        from training.run_data import build_run_data

        tokenizer = load_tokenizer(cfg.model.text.tokenizer)   # offline without it, the start's first failure
        # The data as the start reads it (annotation files; the images when data.check_images):
        # no object to train on, a holdout that selects no image, a caption too long.
        build_run_data(cfg, tokenizer, log=lambda message: print(message, file=sys.stderr))

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        print(f"{args.config}: configuration, paths and data OK", file=sys.stderr)
        return 0

    from training.distributed import cleanup_distributed, init_distributed
    from toist_core.stop_signals import StopSignals
    from training.interrupt import exit_code
    from training.loops import Trainer
    from training.start_checks import LAST

    with StopSignals() as stop:
        env = init_distributed(cfg.runtime.device, cfg.distributed.backend, cfg.distributed.timeout_s)
        try:
            result = Trainer(cfg, env, resume=args.resume, stop=stop).run()
        finally:
            cleanup_distributed()
    if result.stopped_by is not None:
        if env.is_main:
            checkpoint = result.output_dir / LAST
            if checkpoint.is_file():
                print(f"stopped after update {result.step}; resume with:\n  "
                      f"{resume_command(args, checkpoint, env.world_size)}", file=sys.stderr)
            else:
                print("stopped before the first update; nothing to resume", file=sys.stderr)
        return exit_code(result.stopped_by)
    if env.is_main:
        best = result.best
        summary = f"done: {result.step} updates ({result.epoch} epochs); checkpoints in {result.output_dir}"
        if best:
            summary += f"; best {best['metric']} = {best['value']:.4f} at update {best['step']} on {best['split']}"
        print(summary, file=sys.stderr)
    return 0


def resume_command(args: argparse.Namespace, checkpoint, world_size: int) -> str:
    """The command line that continues this run from ``checkpoint`` (same config and overrides)."""
    import os
    import shlex

    command = ["--config", args.config, "--resume", str(checkpoint)]
    if args.output_dir is not None:
        command += ["--output-dir", args.output_dir]
    command += list(args.overrides or [])
    if world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ:   # under torchrun: the same processes
        if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:   # rendezvous options are not visible here
            launcher = "torchrun <the same --nnodes / --rdzv options on every node>"
        else:
            launcher = shlex.join(["torchrun", "--standalone", "--nproc_per_node",
                                   os.environ.get("LOCAL_WORLD_SIZE", str(world_size))])
        return f"{launcher} -m training.train {shlex.join(command)}"
    return shlex.join(getattr(args, "command_line", ["python", "-m", "training.train"]) + command)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    args.take_extra(args, extra)
    try:
        return run(args)
    # As `toist train` (toist_core.cli): ConfigError, CheckpointError, DataError are ValueErrors;
    # RuntimeError: torch set-up failures (process group, device) in one line, not a traceback;
    # FloatingPointError: a run stopped for NaN/inf (it names what and where).
    except (ValueError, OSError, RuntimeError, FloatingPointError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
