"""Periodic evaluation during training: the paper metric on a validation split.

Predictions come from :class:`toist_core.inference.TaskSegmenter` with the reference's
evaluation settings (pronoun caption, every query kept, score = 1 - p(no object); distilled
models replace the pronoun rows by the task's cluster centre; the noun teacher reads each
image's noun caption, as the reference's ``--verb_noun_input`` evaluation; so is a grounding
pre-training run) and are scored by
:func:`toist_core.eval.evaluator.evaluate_tasks` (per-task AP@0.5, mean = mAP@0.5). Every
process predicts a shard of the images; rank 0 scores them and shares the result.

The validation split (``eval.split``): ``holdout`` carves a seeded fraction of the training
images out of training (by image id); any other name reads ``task_k_<split>.json``. The
reference selects its best checkpoint on the test split; that is available as
``eval.split: test`` but is not the default.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch
from pycocotools.coco import COCO
from torch import nn

from toist_core.checkpoint.load import NOUN_CAPTION_STAGES
from toist_core.config import InferenceConfig
from toist_core.data.coco_tasks import CocoTasksDataset
from toist_core.eval.evaluator import evaluate_tasks, load_ground_truth
from toist_core.eval.predictions import ImagePredictions
from toist_core.inference import NonFiniteOutputError, TaskSegmenter
from toist_core.inference.noun_captions import noun_caption_state
from toist_core.model.eval_mode import eval_mode
from toist_core.model.text import max_caption_tokens

from training.config import HOLDOUT, EvalConfig, TrainConfig
from training.distributed import DistEnv, all_gather_objects, broadcast_object


def in_holdout(image_id: int, fraction: float, seed: int) -> bool:
    """Whether an image belongs to the validation holdout (a fixed function of its id)."""
    digest = hashlib.blake2b(f"{seed}:{int(image_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64 < fraction


@dataclass
class ValidationSet:
    """Per task: the annotation file, the image folder and the image ids to evaluate."""

    split: str
    ann_files: dict[int, Path]
    image_dir: Path
    image_ids: dict[int, list[int]] = field(default_factory=dict)
    _ground_truths: dict[int, COCO] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_images(self) -> int:
        return sum(len(v) for v in self.image_ids.values())

    def ground_truths(self) -> dict[int, COCO]:
        """Each task's ground truth, read and schema-checked at the first evaluation and kept for
        the run's later ones (COCO-Tasks' train files hold ~14 x 3,600 images of polygons)."""
        for task, path in self.ann_files.items():
            if task not in self._ground_truths:
                self._ground_truths[task] = load_ground_truth(path)
        return dict(self._ground_truths)


def holdout_ids(dataset: CocoTasksDataset, fraction: float, seed: int) -> set[int]:
    """Image ids of the training dataset that go to the holdout."""
    ids = {dataset.sample_info(i)[1].id for i in range(len(dataset))}
    return {image_id for image_id in ids if in_holdout(image_id, fraction, seed)}


def holdout_trained_on(cfg: TrainConfig, holdout: set[int], source_config: Mapping) -> int:
    """How many of this run's ``holdout`` images the run that wrote a loaded checkpoint trained
    on (``source_config``: that run's configuration as plain data). 0 when it read another image
    pool (another ``data.root`` / ``train_split``) or carved the same holdout; its holdout
    numbers would be optimistic otherwise: the weights have seen the validation images."""
    data, evaluation = source_config.get("data") or {}, source_config.get("eval") or {}
    same_pool = (Path(str(data.get("root", ""))).resolve() == Path(cfg.data.root).resolve()
                 and data.get("train_split") == cfg.data.train_split)
    if not same_pool:
        return 0
    if not (evaluation.get("enabled", True) and evaluation.get("split", HOLDOUT) == HOLDOUT):
        return len(holdout)  # that run trained on every image of the pool
    fraction = evaluation.get("holdout_fraction", EvalConfig.holdout_fraction)
    seed = evaluation.get("holdout_seed", EvalConfig.holdout_seed)
    return sum(not in_holdout(image_id, fraction, seed) for image_id in holdout)


def build_validation_set(cfg: TrainConfig, holdout: Optional[set[int]] = None, tokenizer=None) -> ValidationSet:
    """The validation images of every configured task (``holdout``: ids from the train split).
    With ``tokenizer``, their captions are checked to fit the model (a noun-caption stage's name
    an image's classes: too long, the run stopped at its first evaluation)."""
    split = cfg.data.train_split if cfg.eval.split == HOLDOUT else cfg.eval.split
    files = {task: cfg.data.annotation_path(task, split) for task in cfg.data.tasks}
    image_dir = cfg.data.image_dir(split)
    val = ValidationSet(cfg.eval.split, files, image_dir)
    for task, path in files.items():
        # Built as predict() reads it: a noun-caption stage's class names and every task's phrase
        # are checked here, when the run starts, not at its first evaluation.
        dataset = CocoTasksDataset(path, image_dir, caption_mode=_caption_mode(cfg), check_images=False,
                                   vocabulary=cfg.data.task_vocabulary())
        ids = [dataset.sample_info(i)[1].id for i in range(len(dataset))]
        if holdout is not None:
            ids = [i for i in ids if i in holdout]
        if cfg.eval.max_images is not None:
            ids = ids[:cfg.eval.max_images]
        if tokenizer is not None:
            dataset.check_caption_lengths(tokenizer, max_caption_tokens(cfg.model.text), set(ids))
        if cfg.data.check_images:
            # Checked when the run starts, as the training images are: found missing at the first
            # evaluation, it would stop the run after the training that led there.
            dataset.check_image_files(set(ids), "validation image", f"; eval.split {cfg.eval.split!r}; checked "
                                      "before training as data.check_images is true")
        val.image_ids[task] = ids
    return val


def _caption_mode(cfg: TrainConfig) -> str:
    """The captions evaluation reads: each image's noun caption for the teacher and a grounding
    run (:data:`NOUN_CAPTION_STAGES`), the task's pronoun caption otherwise."""
    return "noun" if cfg.stage in NOUN_CAPTION_STAGES else "pronoun"


def inference_config(cfg: TrainConfig) -> InferenceConfig:
    """Every query kept, no duplicate removal, at the data config's test size, with
    ``eval.protocol``'s pre/post-processing; cluster-centre replacement only where the model
    trains with it (``distill.ccr``: a run with CCR off keeps its bank for the cluster loss, and
    must be scored as it was trained)."""
    size = cfg.data.input_size()
    return InferenceConfig(short_side=size.short_side, max_size=size.max_size, score_threshold=0.0,
                           max_instances=cfg.model.num_queries, duplicate_iou=None, ccr=cfg.distill.ccr,
                           protocol=cfg.eval.protocol)


@torch.no_grad()
def predict(model: nn.Module, val: ValidationSet, cfg: TrainConfig, env: DistEnv,
            memory_bank: Optional[nn.Module] = None) -> dict:
    """This process's share of ``{task: {image_id: ImagePredictions}}``.

    ``memory_bank`` is copied: clustering at evaluation must not touch the training bank.
    """
    bank = copy.deepcopy(memory_bank) if memory_bank is not None else None
    # The segmenter uses the module as it is (no move, cast or layout change the trainer or its
    # EMA could observe); eval mode holds for the whole evaluation and every flag comes back.
    segmenter = TaskSegmenter(model, device=env.device, memory_bank=bank, pronoun=cfg.data.pronoun,
                              inference=inference_config(cfg), config=cfg.model,
                              vocabulary=cfg.data.task_vocabulary())
    predictions: dict[int, dict[int, ImagePredictions]] = {}
    captions = _caption_mode(cfg)
    with eval_mode(model):
        for task, path in sorted(val.ann_files.items()):
            dataset = CocoTasksDataset(path, val.image_dir, caption_mode=captions, check_images=False,
                                       vocabulary=cfg.data.task_vocabulary())
            wanted = set(val.image_ids[task])
            indices = [i for i in range(len(dataset)) if dataset.sample_info(i)[1].id in wanted]
            mine = indices[env.rank::env.world_size]
            task_preds = {}
            if captions == "noun":
                # The teacher reads noun captions (reference --verb_noun_input at evaluation too):
                # one caption per image, from its ground-truth classes. A grounding
                # pre-training run is scored the same way (its own task has no task metric).
                for i in mine:
                    out = segmenter.predict_batch([dataset.load_image(i).permute(1, 2, 0).numpy()],
                                                  noun_caption_state(model, dataset, i, task))[0]
                    task_preds[dataset.sample_info(i)[1].id] = ImagePredictions.from_arrays(
                        out.boxes, out.scores, out.masks)
            else:
                state = segmenter.encode_task(task)
                batch = cfg.loader.eval_batch_size
                for start in range(0, len(mine), batch):
                    chunk = mine[start:start + batch]
                    images = [dataset.load_image(i).permute(1, 2, 0).numpy() for i in chunk]
                    outs = segmenter.predict_batch(images, state)
                    for i, out in zip(chunk, outs):
                        image_id = dataset.sample_info(i)[1].id
                        task_preds[image_id] = ImagePredictions.from_arrays(out.boxes, out.scores, out.masks)
            predictions[task] = task_preds
    return predictions


def evaluate(model: nn.Module, val: ValidationSet, cfg: TrainConfig, env: DistEnv,
             memory_bank: Optional[nn.Module] = None) -> dict:
    """Metrics on every rank: ``{"mAP50/bbox": .., "AP50/bbox/task_k": .., "seconds": ..}``.

    Runs under a forked random state: evaluation never shifts the training random streams.
    """
    started = time.perf_counter()
    devices = [env.device] if env.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            local = predict(model, val, cfg, env, memory_bank)
        except NonFiniteOutputError as exc:
            # Said through the gather, so that every process stops here together (one process
            # raising alone would leave the others waiting in the gather until the timeout).
            local = f"process {env.rank}: {exc}"
    gathered = all_gather_objects(local, env)
    failures = [part for part in gathered if isinstance(part, str)]
    if failures:
        raise NonFiniteOutputError(f"evaluation at the validation set: {'; '.join(failures)}")
    metrics = None
    if env.is_main:
        merged: dict[int, dict[int, ImagePredictions]] = {task: {} for task in val.ann_files}
        for part in gathered:
            for task, preds in part.items():
                merged[task].update(preds)
        iou_types = ("bbox", "segm") if cfg.model.masks else ("bbox",)
        result = evaluate_tasks(val.ground_truths(), merged, iou_types, val.image_ids)
        metrics = {}
        for iou_type in iou_types:
            metrics[f"mAP50/{iou_type}"] = result.mean_ap50(iou_type)
            metrics[f"mAP/{iou_type}"] = result.mean_ap(iou_type)
            for task in result.tasks:
                metrics[f"AP50/{iou_type}/task_{task.task_id}"] = task.ap50[iou_type]
        metrics["images"] = float(val.num_images)
        metrics["seconds"] = time.perf_counter() - started
    return broadcast_object(metrics, env)
