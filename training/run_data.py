"""The data a training run reads, built and checked as its start does: the training samples
(less the holdout), the holdout ids and the validation images. ``Trainer`` builds it, and so
does ``toist train --check``, which said "configuration and paths OK" for data the start then
refused (no object to train on, a holdout that selects no image, a caption too long)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch.utils.data import Dataset, Subset

from toist_core.data.coco_tasks import build_dataset
from toist_core.model.text import max_caption_tokens
from toist_core.typed_config import ConfigError

from training.config import HOLDOUT, TrainConfig
from training.evaluate import ValidationSet, build_validation_set, holdout_ids


@dataclass
class RunData:
    train_set: Dataset                 # the training samples, the holdout's images left out
    holdout: Optional[set[int]]        # image ids held out of the train split for evaluation
    val: Optional[ValidationSet]       # None with eval.enabled false


def build_run_data(cfg: TrainConfig, tokenizer, log: Callable[[str], None]) -> RunData:
    """Build the run's datasets; :class:`ConfigError` or ``DataError`` (naming the field or the
    file) for data the run cannot train on; warnings through ``log``."""
    train_set = build_dataset(cfg.data, cfg.data.train_split)
    check_targets(cfg, train_set.target_counts(), log)
    train_set.check_caption_lengths(tokenizer, max_caption_tokens(cfg.model.text))
    holdout = None
    if cfg.eval.enabled and cfg.eval.split == HOLDOUT:
        holdout = holdout_ids(train_set, cfg.eval.holdout_fraction, cfg.eval.holdout_seed)
        if not holdout:
            raise ConfigError(f"eval.holdout_fraction: {cfg.eval.holdout_fraction} of the training images "
                              "selects none; raise it or name an eval.split")
        keep = [i for i in range(len(train_set)) if train_set.sample_info(i)[1].id not in holdout]
        if not keep:
            raise ConfigError("eval.holdout_fraction: every training image went to the holdout")
        train_set = Subset(train_set, keep)
    val = build_validation_set(cfg, holdout, tokenizer) if cfg.eval.enabled else None
    unscored = [task for task, ids in val.image_ids.items() if not ids] if val is not None else []
    if unscored:
        log(f"warning: eval: no {cfg.eval.split} image for task(s) {unscored}: their AP is n/a and the mean is over "
            "the other tasks")
    return RunData(train_set, holdout, val)


def check_targets(cfg: TrainConfig, counts: dict[int, int], log: Callable[[str], None]) -> None:
    """Refuse training data without a single target (e.g. every object a crowd region, as some
    annotation tools export): the run trained to find nothing, without a word; warn about a
    task without one."""
    where = f"data: the {cfg.data.train_split} split of {cfg.data.root}"
    if not any(counts.values()):
        raise ConfigError(f"{where} has no object to train on for task(s) {sorted(counts)}: no preferred "
                          "object that is not a crowd region (iscrowd 1 is never a target) and whose box lies "
                          "inside its image; check the annotations (toist convert-coco reports such tasks)")
    empty = sorted(task for task, found in counts.items() if not found)
    # (grounding keeps an image once, under its first task, and every object is a target: the
    # other tasks count none there, and nothing is wrong)
    if empty and cfg.data.caption_mode != "grounding":
        log(f"warning: {where}: task(s) {empty} have no object to train on (no preferred object that is not a "
            "crowd region, with a box inside its image): the model learns to find nothing for them")
