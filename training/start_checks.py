"""What a training run checks before it starts or resumes, and the checkpoint file names it
works with: a fresh start refuses an output_dir holding another run's checkpoints; a resume
refuses a checkpoint of another stage or model, or with optimizer, schedule or holdout settings
its state cannot continue. ``toist train --check`` runs the same checks (:func:`check_start`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from toist_core.typed_config import ConfigError

from training import checkpointing as ckpt_io
from training.config import HOLDOUT, RUN_CONFIG_HEADER, EvalConfig, TrainConfig, config_to_dict
from training.schedule import LRSchedule, ScheduleMismatch

LAST = "checkpoint.pth"
BEST = "BEST_checkpoint.pth"
EPOCH_PATTERN = "checkpoint_epoch*.pth"   # numbered copies (checkpoint.keep_epochs)
MODEL_DIR = "model"                        # the model directory a run exports at its end
RUN_CONFIG = "config.yaml"                 # the run's resolved configuration

# Settings the resumed optimizer state brings back from the checkpoint (its parameter groups
# hold them), whatever the config says.
OPTIM_FROM_CHECKPOINT = ("lr", "lr_backbone", "text_encoder_lr", "weight_decay")


def check_start(cfg: TrainConfig, resume: Optional[str] = None) -> None:
    """What ``Trainer`` refuses before it writes anything, for ``toist train --check``: a fresh
    start in an output_dir that holds a run, a ``resume`` checkpoint of another stage or model."""
    problem = model_dir_problem(cfg)
    if problem is not None:
        raise ConfigError(problem)
    resume_run = None
    if resume:
        ckpt = ckpt_io.load_training_checkpoint(resume)
        check_resume_config(ckpt, cfg, resume)
        resume_run = ckpt.get("run_id")
        if resumes_in_place(Path(cfg.output_dir), resume):
            return
    found = other_run_file(Path(cfg.output_dir), resume, resume_run)
    if found is not None:
        refuse_existing_run(Path(cfg.output_dir), found, resume)
    problem = foreign_config_problem(Path(cfg.output_dir))
    if problem is not None:
        raise ConfigError(problem)


def model_dir_problem(cfg: TrainConfig) -> Optional[str]:
    """Why the model directory the run exports at its end (``<output_dir>/model``) could not be
    written there (a folder of other files: it is replaced whole), or None; said before a run
    that would otherwise train for hours and then fail to export."""
    if not cfg.checkpoint.export_model_dir:
        return None
    from toist_core.checkpoint import CheckpointError
    from toist_core.checkpoint.model_dir import check_replaceable

    try:  # the folder is <output_dir>/model: another folder means another output_dir
        check_replaceable(Path(cfg.output_dir) / MODEL_DIR,
                          remedy="choose another output_dir, or set checkpoint.export_model_dir=false "
                                 "(nothing exported)")
    except CheckpointError as exc:
        return f"output_dir: the run exports its model to {exc}"
    return None


def resumes_in_place(output_dir: Path, resume: Optional[str]) -> bool:
    """Whether the run continues ``resume`` in the checkpoint's own folder (which it then writes on)."""
    return bool(resume) and Path(resume).resolve().parent == Path(output_dir).resolve()


def run_id_of(path: Path) -> Optional[str]:
    """The run a checkpoint belongs to (its ``run_id``, kept through resumes); None for a file
    without one (written before runs recorded it) or one that cannot be read. The tensors are
    memory-mapped, not read."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    run = ckpt.get("run_id") if isinstance(ckpt, dict) else None
    return run if isinstance(run, str) else None


def other_run_file(output_dir: Path, resume: Optional[str] = None, resume_run: Optional[str] = None) -> Optional[str]:
    """The checkpoint of another run that a start in ``output_dir`` would overwrite (None: none).
    A fresh start wants the folder free of runs; a resume continues in its checkpoint's own folder
    or in one of the same run (``resume_run``: a copy of one of its checkpoints resumed there)."""
    if resumes_in_place(output_dir, resume):
        return None
    found = earlier_run_file(output_dir)
    if found is not None and resume and resume_run is not None and run_id_of(output_dir / found) == resume_run:
        return None   # (a file without a run_id, written before runs recorded one, is no proof of the same run)
    return found


def continued_run(output_dir: Path, resume: Optional[str], resume_run: Optional[str]) -> Optional[str]:
    """The run a start that :func:`other_run_file` accepted continues (``resume_run``, when the
    folder is its checkpoint's or holds a run, which that check found to be this one), else None:
    a new run, which gets its own id (a resume into a new folder forks the run: the two folders
    must not take each other's checkpoints for their own)."""
    if resume_run is None:
        return None
    return resume_run if resumes_in_place(output_dir, resume) or earlier_run_file(output_dir) else None


def earlier_run_file(output_dir: Path) -> Optional[str]:
    """The name of a checkpoint an earlier run left in ``output_dir`` (None: none).

    Not only ``checkpoint.pth``: a run that evaluated and then crashed before its first
    ``checkpoint.pth`` leaves ``BEST_checkpoint.pth`` alone, and a new run there would export it
    as its own model at the end.
    """
    if (output_dir / LAST).exists():
        return LAST
    if (output_dir / BEST).exists():
        return BEST
    epochs = sorted(output_dir.glob(EPOCH_PATTERN))
    return epochs[-1].name if epochs else None


def foreign_config_problem(output_dir: Path) -> Optional[str]:
    """Why a fresh start must not write ``<output_dir>/config.yaml`` (a file there that no run
    wrote: a configuration the user keeps beside the run, lost when replaced), or None."""
    from toist_core.data.schema import written_by

    path = output_dir / RUN_CONFIG
    if not path.exists() or written_by(path, RUN_CONFIG_HEADER.encode()) or _resolved_dump(path):
        return None
    return (f"output_dir: {path} exists and was not written by toist train (a configuration of yours?); a run "
            "writes its resolved configuration there: move the file (give it with --config from elsewhere), or "
            "choose another output_dir")


def _resolved_dump(path: Path) -> bool:
    """Whether ``path`` is a run's resolved configuration as toist wrote it before the header
    line: every section of a ``TrainConfig`` at the top level (a hand-written one names a few)."""
    import dataclasses

    import yaml

    from toist_core.yaml_text import parse_yaml

    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and set(data) == {field.name for field in dataclasses.fields(TrainConfig)}


def refuse_existing_run(output_dir: Path, found: str, resume: Optional[str] = None) -> None:
    if resume:   # continuing a checkpoint of another folder: this folder's run would be overwritten
        raise ConfigError(f"output_dir: {output_dir} already holds {found} of another run than --resume {resume}; "
                          f"continue it in its own folder (--output-dir {Path(resume).parent}) or in a new one")
    if found == BEST:   # the best weights of a run that never wrote a resumable checkpoint.pth
        raise ConfigError(f"output_dir: {output_dir} already holds {BEST} of an earlier run (without a {LAST} "
                          "to resume); choose another output_dir, or move the file away to start over there")
    raise ConfigError(f"output_dir: {output_dir} already holds {found}; continue it with "
                      f"--resume {output_dir / found} or choose another output_dir")


def check_resume_config(ckpt: dict, cfg: TrainConfig, path) -> None:
    """The checkpoint must come from the same stage and model, with the optimizer settings its
    state restores (other settings may change)."""
    if ckpt["stage"] != cfg.stage:
        raise ckpt_io.CheckpointError(f"{path}: checkpoint of stage {ckpt['stage']!r}, config stage {cfg.stage!r}")
    saved = ckpt.get("config") or {}
    current = config_to_dict(cfg)
    saved_model = saved.get("model")
    if saved_model is not None and saved_model != current.get("model"):
        diffs = _dict_diff(saved_model, current.get("model"), "model")
        raise ckpt_io.CheckpointError(f"{path}: model config differs from the checkpoint's: " + "; ".join(diffs[:6]))
    saved_optim = saved.get("optim") or {}
    diffs = [f"optim.{name}: checkpoint {saved_optim[name]!r}, config {current['optim'][name]!r}"
             for name in OPTIM_FROM_CHECKPOINT if name in saved_optim and saved_optim[name] != current["optim"][name]]
    if diffs:
        raise ckpt_io.CheckpointError(
            f"{path}: a resume continues the checkpoint's optimizer, whose state holds its own values of "
            f"{'; '.join(diffs)}. Resume with the checkpoint's values. {new_run_advice(cfg.stage, path)}")
    saved_ema = saved_optim.get("ema")
    if saved_ema is not None and saved_ema != cfg.optim.ema:
        # Resumed with the EMA off, the run's EMA (the weights its evaluations scored, its best
        # was chosen on, the paper reports) was dropped from every later checkpoint, silently.
        lost = ("its EMA weights (what its evaluations scored and its best was chosen on) would be dropped"
                if saved_ema else "an EMA begun mid-run from the current weights is not the run's")
        raise ckpt_io.CheckpointError(f"{path}: optim.ema: checkpoint {saved_ema!r}, config {cfg.optim.ema!r}: {lost}. "
                                      f"Resume with optim.ema={str(saved_ema).lower()}. "
                                      f"{new_run_advice(cfg.stage, path)}")
    if ckpt.get("cluster_criterion") is not None and not cfg.uses_bank:
        # The bank is training state as the optimizer's is: it was dropped without a word.
        raise ckpt_io.CheckpointError(
            f"{path} holds a memory bank (its run used distill.ccr or distill.cluster_loss), this config uses none "
            "(distill.ccr false and distill.cluster_loss 0): a resume keeps the run's settings. "
            f"{new_run_advice(cfg.stage, path)}")
    _check_resume_schedule(ckpt, cfg, path)
    _check_resume_holdout(saved, current, path, cfg.stage)
    _check_resume_data(saved, current, path, cfg.stage)


# What the training data is, beyond where it lies (data.root may move): a resume that reads other
# tasks, or another order of them, trains the checkpoint's weights on a mix without a word.
RESUME_DATA_FIELDS = ("data.tasks", "data.vocabulary_entries", "data.train_split", "data.caption_mode",
                      "data.pronoun", "runtime.seed")   # the seed orders every epoch's samples


def _check_resume_data(saved: dict, current: dict, path, stage: str) -> None:
    diffs = []
    for name in RESUME_DATA_FIELDS:
        section, key = name.split(".")
        before, now = saved.get(section) or {}, current.get(section) or {}
        if key in before and before[key] != now.get(key):
            diffs.append(f"{name}: checkpoint {before[key]!r}, config {now.get(key)!r}")
    if diffs:
        raise ckpt_io.CheckpointError(
            f"{path}: {'; '.join(diffs)}: the checkpoint trained on that data, in that order; a resume reads the "
            f"same. {new_run_advice(stage, path)}")


def _check_resume_schedule(ckpt: dict, cfg: TrainConfig, path) -> None:
    """The schedule the checkpoint continues, as far as the config alone decides it (epochs,
    lr_drop, warmup, batch size): ``--check`` passed what the start then refused. (Updates per
    epoch also follow from the data and the process count: checked when the run starts.)"""
    state = ckpt.get("scheduler") or {}
    saved_batch = ((ckpt.get("config") or {}).get("loader") or {}).get("batch_size")
    if saved_batch is not None and saved_batch != cfg.loader.batch_size:
        raise ckpt_io.CheckpointError(
            f"{path}: loader.batch_size: checkpoint {saved_batch!r}, config {cfg.loader.batch_size!r}: it sets the "
            f"updates per epoch, and so the learning-rate schedule; exact resume needs the same. "
            f"{new_run_advice(cfg.stage, path)}")
    if "steps_per_epoch" not in state:
        return
    schedule = LRSchedule(int(state["steps_per_epoch"]), cfg.schedule.epochs, cfg.schedule.lr_drop,
                          cfg.schedule.warmup_fraction)
    try:
        schedule.check_compatible(state, str(path))
    except ScheduleMismatch as exc:
        raise ckpt_io.CheckpointError(f"{exc}. {new_run_advice(cfg.stage, path)}") from None


def _check_resume_holdout(saved: dict, current: dict, path, stage: str) -> None:
    """A holdout decides which training images train: a resume that carves another one trains on
    images it validated on before (and scores on images it trained on), without a word."""
    def holdout(config: dict) -> Optional[dict]:
        evaluation = config.get("eval") or {}
        if not evaluation.get("enabled", True) or evaluation.get("split", HOLDOUT) != HOLDOUT:
            return None
        return {"eval.holdout_fraction": evaluation.get("holdout_fraction", EvalConfig.holdout_fraction),
                "eval.holdout_seed": evaluation.get("holdout_seed", EvalConfig.holdout_seed)}

    before, now = holdout(saved), holdout(current)
    if before == now or not saved.get("eval"):
        return
    if before is None or now is None:
        said = (f"eval.split: checkpoint {'holdout' if before else (saved.get('eval') or {}).get('split')!r} "
                f"(enabled {(saved.get('eval') or {}).get('enabled', True)}), config "
                f"{'holdout' if now else (current.get('eval') or {}).get('split')!r} "
                f"(enabled {(current.get('eval') or {}).get('enabled', True)})")
    else:
        said = "; ".join(f"{name}: checkpoint {before[name]!r}, config {now[name]!r}" for name in before
                         if before[name] != now[name])
    raise ckpt_io.CheckpointError(
        f"{path}: {said}: the holdout decides which training images train and which validate; a resume keeps "
        f"the checkpoint's. {new_run_advice(stage, path)}")


def new_run_advice(stage: str, path) -> str:
    """How to train on from checkpoint ``path`` of ``stage`` with settings a resume refuses: a
    new run, started as the stage allows (only init.load for the stages that take it)."""
    if stage in ("mask_head", "mask_head_distill"):
        return ("To go on with other settings start a new run in another output_dir from the same "
                "init.frozen_weights (a mask-head stage takes no init.load: its head trains from the start)")
    if stage == "distill":
        return (f"To go on with other settings start a new run in another output_dir with init.load={path} and "
                f"init.load_noun={path} (its student and its teacher, EMA preferred; a fresh optimizer and "
                "schedule; the memory bank starts empty and refills)")
    return (f"To go on with other settings start a new run in another output_dir with init.load={path} (its "
            "weights, EMA preferred; a fresh optimizer and schedule)")


def _dict_diff(a, b, where: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _dict_diff(a.get(key), b.get(key), f"{where}.{key}")
        return out
    return [] if a == b else [f"{where}: checkpoint {a!r}, config {b!r}"]
