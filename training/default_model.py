"""The embedded default model: trained on synthetic COCO-Tasks with this project's own pipeline.

    python -m training.default_model --out runs/default_model            # or: make default-model
    python -m training.default_model --out runs/default_model --install  # + copy into the package

One command, CPU only (2 idle cores: about 70 minutes; docs/default_model.md), deterministic:

1. writes a synthetic COCO-Tasks tree (``toist_core.data.synth``: train and test splits) and a
   set of single-object scenes for pre-training,
2. pre-trains the detector MDETR-style (``grounding`` stage: every object named in the caption)
   on the single-object scenes, from ImageNet MobileNetV2 (fine-tuned gently here, frozen in
   every later stage); this stands in for the MDETR weights both of the paper's models start
   from (DETR-style training from scratch on the multi-object scenes barely localises anything
   within a CPU hour),
3. trains the noun **teacher** (noun captions) and the plain **student** (pronoun captions),
   both from the pre-trained weights, as the paper does from MDETR,
4. trains the **distilled** student (memory bank, CCR, cluster loss, SBTL; student and teacher
   both trained) initialised from the teacher and the plain student, as the paper does,
5. trains the mask head on the frozen plain and distilled detectors,
6. evaluates every model with the paper metric (mAP@0.5, box and mask, mean over tasks) on the
   *test* split (no stage ever sees it; best checkpoints are picked on a training holdout),
   next to an untrained model,
7. exports the distilled segmentation model as a model directory with ``metrics.json`` and a
   model card (``MODEL_CARD.md``); ``--install`` copies it to ``toist_core/assets/default_model``.

Stages that do not depend on each other (teacher and plain student, the mask heads, the
ablations) train at the same time in worker processes (``--jobs``, default 2, one thread each).
Each stage keeps its run directory: an interrupted recipe continues where it stopped
(finished stages are skipped, a stage cut short resumes from its last checkpoint). Ctrl-C /
SIGTERM stop every training stage at the end of its update, checkpoint written, and the recipe
exits 130 / 143 (``training.stage_processes``).
``--ablations`` also trains the distilled student with CCR, the cluster loss or SBTL off.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

import toist_core
from toist_core.atomic_file import write_text_atomic
from toist_core.config import InputSize
from toist_core.data.synth import generate
from toist_core.json_text import dumps_null_for_nan
from toist_core.model import build_model, load_tokenizer

from training.checkpointing import load_training_checkpoint
from training.config import TrainConfig, load_config
from training.distributed import DistEnv, seed_everything
from training.evaluate import build_validation_set, evaluate
from training.export import export_checkpoint
from training.interrupt import exit_code
from training.loops import Trainer
from training.start_checks import BEST, LAST
from training.stage_processes import (RecipeRefused, StageStopped, WorkDirBusy, run_stages, stage_lock, stage_stop,
                                      work_dir_lock)

CONFIGS = Path(__file__).resolve().parent / "configs"
PACKAGE_MODEL_DIR = Path(toist_core.__file__).resolve().parent / "assets" / "default_model"
DONE = "done.json"
STARTED = "started.json"   # in a stage folder: the upstream stages it started from (its resume checks them)
DATA_DONE = "recipe_data_done"     # in a data folder: every split of it is written
RECIPE_FILE = "recipe_settings.json"  # in the work directory: the settings its data and stages come from
TRAINING_MINUTES = "training_minutes.json"
ABLATION_SUFFIX = " off"             # results rows of the ablations: "distilled, CCR off", ...


@dataclass
class RecipeSettings:
    """Everything that decides the default model (written into its metrics and model card)."""

    # Tasks 1/2 and 3/5 rank overlapping classes differently: the student must read the verb.
    tasks: list[int] = field(default_factory=lambda: [1, 2, 3, 5])
    train_images: int = 3000           # train image pool, shared by the tasks
    test_images: int = 600             # test image pool
    pretrain_images: int = 1500        # single-object scenes of all 14 classes (grounding stage)
    min_size: int = 96                 # synthetic image sides (px)
    max_size: int = 128
    min_objects: int = 1
    max_objects: int = 3
    empty_fraction: float = 0.1        # share of a task's images without a preferred object
    bank_size: int = 64                # memory-bank features per task (the paper: 1024)
    # The paper's cluster-loss weight (lambda_7) is 1e4. Here the cluster loss's MSE is ~0.01-0.02,
    # so at 1e4 it is about half the summed loss and its gradient takes over the clipped update
    # (the 10-query model's ablation: 0.094 with it, 0.161 without); 1e2 keeps it one term among many.
    cluster_loss: float = 1e2
    # Weight of the no-object target of unmatched queries (the reference: 0.1, for 100 queries).
    # The loss is minimised at p(object) = q / (q + eos_coef (1 - q)) for a query matched with
    # probability q: with 5 queries for 1-3 objects, at 0.1 a query matched one time in four
    # scores 0.77, so duplicates and empty boxes kept scores of 0.6-0.96 (4.3 instances >= 0.5
    # per image; docs/default_model.md). At 0.5 it scores 0.40 (the model before this one: still
    # 2.0 instances per image, mostly the right object twice); at 1.0 the loss is plain
    # cross-entropy and the score is the match probability itself, 0.25.
    eos_coef: float = 1.0
    data_seed: int = 7
    queries: int = 5                   # >= max_objects; fewer queries rank the right box first sooner
    batch_size: int = 16
    lr: float = 2e-4                   # transformer, heads and text encoder (random init)
    # Pre-training fine-tunes the ImageNet backbone gently (1e-4 destroys its features within a
    # few hundred updates; 3e-5 ranks a well-placed box first on 56% of single-object test scenes
    # against 43% frozen); the later stages keep the adapted backbone frozen (a third faster).
    pretrain_backbone_lr: float = 3e-5
    # 16 pre-training epochs rank a right box first on 80% of single-object test scenes (10: 64%),
    # but every model trained from them was worse (distilled 0.238 against 0.308 box mAP@0.5 at
    # 112 px with 6 teacher / student epochs, docs/default_model.md): the task stages start better
    # from 10.
    pretrain_epochs: int = 10
    # The detectors were still improving at 8 epochs (holdout mAP@0.5:0.95 0.11-0.14: boxes that
    # cover part of an object, kept beside a better one); 12 give the decoder more time.
    teacher_epochs: int = 12
    student_epochs: int = 12
    distill_epochs: int = 4
    # The distillation fine-tunes the trained student: at the detectors' 2e-4 it lost what the
    # student had learnt within the first epoch (holdout best after epoch 1 of 4, test box mAP@0.5
    # 0.568 against the plain student's 0.594; top instance right on 49 of 80 held-out scenes);
    # at 5e-5 it kept improving to epoch 4 (57.5 against 49.9 box AP50 under `toist evaluate`,
    # 55 of 80 top instances right; 2e-5: 51 of 80). docs/default_model.md.
    distill_lr: float = 5e-5
    # The mask head learns from the matched queries only (<= 3 per image): 2 epochs (~340 updates)
    # left masks that ignored their query; see docs/default_model.md.
    mask_epochs: int = 4
    threads: int = 2
    # Stages that do not depend on each other train at once, each on threads // jobs threads: on
    # 2 cores two one-thread processes train about twice as fast as one two-thread process.
    jobs: int = 2
    seed: int = 42

    @property
    def stage_threads(self) -> int:
        return max(1, self.threads // self.jobs)

    @property
    def distill_batch_size(self) -> int:
        """The distillation's batch: half the others' (teacher and student in memory at once)."""
        return max(1, self.batch_size // 2)

    @property
    def input_size(self) -> InputSize:
        """Evaluation resize (``data.test_size`` / ``data.max_size``, what the exported model
        records): short side the largest training size, as the reference tests at 800 after
        training at 480..800; long side at most twice the largest synthetic side. (The middle
        size, 112, ranked a right box first on 32 of 80 held-out scenes, 128 on 45.)"""
        return InputSize(short_side=self.max_size, max_size=2 * self.max_size)

    def common_overrides(self, data_root: Path) -> list[str]:
        """Overrides of every stage (on top of the tiny_* configs)."""
        mid = (self.min_size + self.max_size) // 2
        return [f"data.root={data_root}", f"data.tasks=[{','.join(map(str, self.tasks))}]",
                "model.backbone.name=mobilenet_v2", "model.backbone.weights=imagenet",
                            # The backbone stays fixed after pre-training (see pretrain_backbone_lr).
                "model.backbone.train=false",
                "model.transformer.dec_layers=6", "model.transformer.dim_feedforward=512",
                "loss.num_decoder_layers=6", f"model.num_queries={self.queries}",
                f"loader.batch_size={self.batch_size}", f"runtime.threads={self.stage_threads}",
                f"runtime.seed={self.seed}", "runtime.progress=false", "runtime.log_every=100",
                f"optim.lr={self.lr}", f"optim.text_encoder_lr={self.lr}",
                "eval.holdout_fraction=0.1", "checkpoint.export_model_dir=false",
                # image sizes around the synthetic ones (the reference's 480..800 / 800 scaled down)
                f"data.train_sizes=[{self.min_size},{mid},{self.max_size}]", f"data.max_size={self.input_size.max_size}",
                f"data.crop_resize_sizes=[{self.min_size},{mid}]", f"data.crop_min_size={self.min_size * 5 // 6}",
                f"data.crop_max_size={self.max_size}", f"data.test_size={self.input_size.short_side}",
                "distill.feature_dim=128", f"distill.bank_size={self.bank_size}",
                f"loss.eos_coef={self.eos_coef}"]


@dataclass
class Stage:
    name: str
    config: str                       # a training/configs file
    epochs: int
    overrides: list[str]
    after: tuple[str, ...] = ()       # stages whose checkpoints this one starts from


def stages(settings: RecipeSettings, out: Path, ablations: bool) -> list[Stage]:
    teacher, student, distilled = (out / n / BEST for n in ("teacher", "student", "distilled"))
    pretrained = out / "pretrain" / LAST
    segm = ["model.masks=true", "model.aux_loss=false", "model.contrastive_align=false"]
    plan = [
        Stage("pretrain", "tiny_grounding.yaml", settings.pretrain_epochs,
              [f"data.root={out / 'synth_pretrain'}", f"data.tasks=[{','.join(map(str, range(1, 15)))}]",
               "eval.enabled=false", "model.backbone.train=true",
               f"optim.lr_backbone={settings.pretrain_backbone_lr}"]),
        Stage("teacher", "tiny_noun.yaml", settings.teacher_epochs, [f"init.load={pretrained}"], ("pretrain",)),
        Stage("student", "tiny_pronoun.yaml", settings.student_epochs, [f"init.load={pretrained}"], ("pretrain",)),
        Stage("distilled", "tiny_distill.yaml", settings.distill_epochs,
              [f"init.load={student}", f"init.load_noun={teacher}",
               f"loader.batch_size={settings.distill_batch_size}",
               f"distill.cluster_loss={settings.cluster_loss}",
               f"optim.lr={settings.distill_lr}", f"optim.text_encoder_lr={settings.distill_lr}"], ("teacher", "student")),
        Stage("student_masks", "tiny_mask_head.yaml", settings.mask_epochs,
              segm + [f"init.frozen_weights={student}"], ("student",)),
        Stage("distilled_masks", "tiny_mask_head_distill.yaml", settings.mask_epochs,
              segm + [f"init.frozen_weights={distilled}"], ("distilled",)),
    ]
    if ablations:
        # Box-only: a mask head per ablation would add 3 x ~10 CPU-minutes to the recipe.
        distill = next(stage for stage in plan if stage.name == "distilled")
        for name, switch in (("no_ccr", "distill.ccr=false"), ("no_cl", "distill.cluster_loss=0"),
                             ("no_sbtl", "distill.sbtl=0")):
            plan.append(Stage(f"distilled_{name}", distill.config, distill.epochs, distill.overrides + [switch],
                              distill.after))
    return plan


def stage_config(settings: RecipeSettings, out: Path, stage: Stage) -> TrainConfig:
    return load_config(CONFIGS / stage.config, [
        *settings.common_overrides(out / "synth"), f"output_dir={out / stage.name}",
        f"schedule.epochs={stage.epochs}", f"schedule.lr_drop={max(1, stage.epochs * 3 // 4)}",
        f"eval.every_epochs={max(1, stage.epochs // 4)}", *stage.overrides])


def _upstream(out: Path, stage: Stage) -> dict[str, float]:
    """When each stage ``stage`` starts from finished (their done.json), as this stage saw them."""
    return {name: _record(out / name / DONE).get("finished", 0.0) for name in stage.after}


def _record(path: Path, remedy: str = "delete it (and its stage's folder, if it is a stage's) to start that part "
                                      "over") -> dict:
    """The JSON record (an object) the recipe wrote at ``path``; one that does not parse or is
    not an object (a disk filled, an edit) is refused naming the file and ``remedy``, not shown
    as a traceback."""
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecipeRefused(f"{path}: not a record this recipe can read ({exc}): {remedy}") from None
    if not isinstance(record, dict):
        raise RecipeRefused(f"{path}: not a record this recipe can read (a JSON {type(record).__name__}, not an "
                            f"object): {remedy}")
    return record


def run_stage(settings: RecipeSettings, out: Path, stage: Stage) -> dict:
    """Train one stage unless it finished before (resumes a stage that was cut short). Picklable
    for a worker process: the Trainer sets the stage's torch threads (``runtime.threads``).

    A finished stage is reused only if the stages it starts from are the ones it trained from:
    one retrained since (its folder deleted) stops the recipe here, naming what to delete.
    SIGINT / SIGTERM end the stage after its update in progress, checkpoint written
    (:class:`~training.stage_processes.StageStopped`)."""
    run_dir = out / stage.name
    with stage_lock(out, stage.name), stage_stop() as stop:
        if (run_dir / DONE).is_file():
            record = _record(run_dir / DONE)
            if record.get("upstream", {}) != _upstream(out, stage) and "upstream" in record:
                raise RecipeRefused(f"{run_dir / DONE}: stage {stage.name!r} was trained from earlier runs of "
                                    f"{', '.join(stage.after)} than the ones now in {out}: delete {run_dir} to "
                                    f"retrain it")
            return record
        cfg = stage_config(settings, out, stage)
        last = run_dir / LAST
        started = time.perf_counter()
        upstream = _upstream(out, stage)
        # The stages it starts from, recorded when it starts: a resume (which takes no init.* of
        # the config) from a checkpoint of earlier upstream runs is refused as a finished one is.
        begun = run_dir / STARTED
        if last.is_file() and begun.is_file() and _record(begun) != upstream:
            raise RecipeRefused(f"{last}: stage {stage.name!r} was started from earlier runs of "
                                f"{', '.join(stage.after)} than the ones now in {out}: delete {run_dir} to retrain it")
        if not last.is_file():
            write_text_atomic(begun, json.dumps(upstream))
        result = Trainer(cfg, DistEnv(), resume=str(last) if last.is_file() else None, stop=stop).run()
        if result.stopped_by is not None:
            raise StageStopped(stage.name, result.stopped_by)
        record = {"updates": result.step, "minutes": (time.perf_counter() - started) / 60, "best": result.best,
                  "finished": time.time(), "upstream": upstream}
        print(f"[{stage.name}] {result.step} updates in {record['minutes']:.1f} min; best {result.best}", flush=True)
        write_text_atomic(run_dir / DONE, json.dumps(record, indent=1))
        return record


def run_plan(settings: RecipeSettings, out: Path, plan: Sequence[Stage]) -> dict[str, dict]:
    """Train every stage of ``plan``, up to ``settings.jobs`` at once, each once the stages it
    starts from are done; returns each stage's record (updates, minutes, best), in plan order.
    Stopping, failures and worker processes: :mod:`training.stage_processes`."""
    names = {stage.name for stage in plan}
    for stage in plan:
        if not set(stage.after) <= names:
            raise ValueError(f"stage {stage.name!r} starts from {sorted(set(stage.after) - names)}, "
                             f"which are not in the plan")
    records = run_stages(plan, functools.partial(run_stage, settings, out), settings.jobs)
    return {stage.name: records[stage.name] for stage in plan}


def write_data(settings: RecipeSettings, out: Path) -> None:
    """``out/synth`` (the tasks' train and test splits) and ``out/synth_pretrain`` (single-object
    scenes of every class, listed by all 14 task files; a different seed, so other images).

    A folder counts as written once ``DATA_DONE`` marks it, after its last split: a run cut
    short while writing the test split writes both again (the same images: seeded)."""
    sizes = dict(min_size=settings.min_size, max_size=settings.max_size)
    if not (out / "synth" / DATA_DONE).is_file():
        for split, count in (("train", settings.train_images), ("test", settings.test_images)):
            generate(out / "synth", tasks=settings.tasks, splits=(split,), images_per_split=count,
                     min_objects=settings.min_objects, max_objects=settings.max_objects,
                     empty_fraction=settings.empty_fraction, seed=settings.data_seed, **sizes)
        (out / "synth" / DATA_DONE).write_text("{}")
    if not (out / "synth_pretrain" / DATA_DONE).is_file():
        generate(out / "synth_pretrain", splits=("train",), images_per_split=settings.pretrain_images,
                 min_objects=1, max_objects=1, seed=settings.data_seed + 1, **sizes)
        (out / "synth_pretrain" / DATA_DONE).write_text("{}")


def check_settings(settings: RecipeSettings, out: Path) -> None:
    """``out`` holds the data and stages of one set of settings (``RECIPE_FILE``): a finished
    stage is reused by its folder alone, so other settings (``--quick`` into the full recipe's
    folder, an edited ``RecipeSettings``) would silently reuse what they did not train."""
    path = out / RECIPE_FILE
    wanted = json.loads(json.dumps({k: v for k, v in asdict(settings).items() if k != "jobs"}))
    if path.is_file():
        recorded = _record(path, "give another --out, or delete the work directory to start over")
        changed = sorted(k for k in set(wanted) | set(recorded) if wanted.get(k) != recorded.get(k))
        if changed:
            detail = "; ".join(f"{k}: {recorded.get(k)!r} there, {wanted.get(k)!r} now" for k in changed[:6])
            raise RecipeRefused(f"{path}: {out} was written with other recipe settings ({detail}): give another "
                                "--out, or delete it to start over")
    else:
        # No record but data or stages there (a folder of a toist before the record, or one whose
        # record was deleted): whose settings they are nobody can tell, and a finished stage would be
        # reused by its folder alone (an install then shipped a 1-epoch teacher under a 25-epoch card).
        found = sorted(p.name for p in out.iterdir() if p.is_dir()) if out.is_dir() else []   # (not its lock)
        if found:
            raise RecipeRefused(f"{out} holds {', '.join(found[:6])}{' ...' if len(found) > 6 else ''} but no "
                                f"{RECIPE_FILE} saying which recipe settings wrote them: give another --out, or delete "
                                "it to start over")
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(wanted, indent=1))


# ----------------------------------------------------------------------------- evaluation

def _load(cfg: TrainConfig, checkpoint: Path, tokenizer):
    """EMA weights of a run's best checkpoint (the paper evaluates EMA weights) and its bank,
    with the run's k-means settings and stale flags, as its exported model directory loads it."""
    from toist_core.checkpoint import build_memory_bank
    from toist_core.checkpoint.strict import BankSettings

    ckpt = load_training_checkpoint(checkpoint)
    model = build_model(cfg.model, tokenizer=tokenizer)
    model.load_state_dict(ckpt["model_ema"])
    bank = ckpt.get("cluster_criterion")
    if bank is None:
        return model, None
    return model, build_memory_bank(bank, settings=BankSettings.of_distill(cfg.distill), stale=ckpt.get("cluster_stale"))


def evaluate_all(settings: RecipeSettings, out: Path, plan: Sequence[Stage], env: DistEnv) -> dict:
    """mAP@0.5 (box, and mask where a mask head exists) on the test split, per model."""
    by_name = {s.name: s for s in plan}

    def test_config(stage: Stage) -> TrainConfig:
        cfg = stage_config(settings, out, stage)
        cfg.eval.split, cfg.eval.max_images = "test", None
        return cfg

    rows: dict[str, dict] = {}
    noun_cfg = test_config(by_name["teacher"])
    pronoun_cfg = test_config(by_name["student"])
    val = build_validation_set(pronoun_cfg)
    tokenizer = load_tokenizer(pronoun_cfg.model.text.tokenizer)

    def score(name: str, cfg: TrainConfig, model, bank=None, checkpoint: Optional[Path] = None) -> None:
        metrics = evaluate(model, val, cfg, env, bank)
        rows[name] = {k: v for k, v in metrics.items() if k.startswith(("mAP50/", "AP50/"))}
        if checkpoint is not None and cfg.model.masks:
            rows[name].update(mask_agreement(cfg, checkpoint))

    seed_everything(settings.seed)
    untrained = build_model(pronoun_cfg.model, tokenizer=tokenizer)  # ImageNet backbone, rest random
    score("untrained", pronoun_cfg, untrained)
    teacher, _ = _load(noun_cfg, out / "teacher" / BEST, tokenizer)
    score("teacher (noun captions)", noun_cfg, teacher)
    score("teacher (pronoun captions)", pronoun_cfg, teacher)
    for name, stage in (("plain student", "student_masks"), ("distilled student", "distilled_masks")):
        cfg = test_config(by_name[stage])
        model, bank = _load(cfg, out / stage / BEST, tokenizer)
        score(name, cfg, model, bank, out / stage / BEST)
    for stage in plan:
        if stage.name.startswith("distilled_no_"):
            cfg = test_config(stage)
            model, bank = _load(cfg, out / stage.name / BEST, tokenizer)
            score(f"distilled, {stage.name[len('distilled_no_'):].upper()}{ABLATION_SUFFIX}", cfg, model, bank)
    return {"rows": rows, "test_pairs": val.num_images, "tasks": settings.tasks}


MASK_AGREEMENT_IMAGES = 100   # test images per task for the mask/box agreement numbers


def mask_agreement(cfg: TrainConfig, checkpoint: Path) -> dict[str, float]:
    """:func:`~toist_core.eval.mask_sanity.mask_box_agreement` of a mask-head run's best model on
    the first test images of every task, one image at a time at the model's input size and score
    >= 0.5: with every instance kept (``mask_*``: the model itself, comparable with the models
    before duplicate removal existed), and as the node publishes them (``published_*``: duplicate
    removal at the default ``duplicate_iou``)."""
    from toist_core.config import InferenceConfig
    from toist_core.data.coco_tasks import CocoTasksDataset
    from toist_core.eval.mask_sanity import mask_box_agreement
    from toist_core.inference import TaskSegmenter

    published = TaskSegmenter.from_pretrained(checkpoint, device="cpu")
    every = TaskSegmenter.from_pretrained(checkpoint, device="cpu", inference=InferenceConfig(duplicate_iou=None))
    raw, kept = [], []
    for task in cfg.data.tasks:
        states = (every.encode_task(task), published.encode_task(task))
        dataset = CocoTasksDataset(cfg.data.annotation_path(task, "test"), cfg.data.image_dir("test"),
                                   check_images=False, vocabulary=cfg.data.task_vocabulary())
        for index in range(min(MASK_AGREEMENT_IMAGES, len(dataset))):
            image = dataset.load_image(index).permute(1, 2, 0).numpy()
            raw.append(every.predict(image, states[0]))
            kept.append(published.predict(image, states[1]))
    stats, shown = mask_box_agreement(raw), mask_box_agreement(kept)
    return {"mask_pairwise_iou_median": stats["pairwise_iou_median"],
            "mask_disjoint_iou_median": stats["disjoint_iou_median"], "mask_inside_box_mean": stats["inside_box_mean"],
            "instances_per_image": stats["instances"] / max(1, len(raw)),
            "published_pairwise_iou_median": shown["pairwise_iou_median"], "published_pairs": shown["pairs"],
            "published_inside_box_mean": shown["inside_box_mean"],
            "published_instances_per_image": shown["instances"] / max(1, len(kept))}


# The committed model this recipe's output replaced (git 622cd92): the same stages up to the
# distillation, which ran at the detectors' learning rate 2e-4 (it shares the teacher, the plain
# student and their mask head with this one); no duplicate removal existed (its masks were measured
# with every instance kept). Its ablations: CCR off 0.542, CL off 0.588, SBTL off 0.611.
BEFORE = {
    "untrained": {"mAP50/bbox": 0.001},
    "teacher (noun captions)": {"mAP50/bbox": 0.598},
    "teacher (pronoun captions)": {"mAP50/bbox": 0.458},
    "plain student": {"mAP50/bbox": 0.594, "mAP50/segm": 0.744, "mask_pairwise_iou_median": 0.803,
                      "mask_disjoint_iou_median": 0.071, "mask_inside_box_mean": 0.778},
    "distilled student": {"mAP50/bbox": 0.568, "mAP50/segm": 0.712, "mask_pairwise_iou_median": 0.956,
                          "mask_disjoint_iou_median": 0.652, "mask_inside_box_mean": 0.822},
    "distilled, CCR off": {"mAP50/bbox": 0.542},
    "distilled, CL off": {"mAP50/bbox": 0.588},
    "distilled, SBTL off": {"mAP50/bbox": 0.611},
}


def comparison_table(results: dict, before: dict = BEFORE) -> str:
    """Old -> new per model: box and mask mAP@0.5 and the masks' fit to their instances."""
    lines = ["| model | mAP^box@0.5 | mAP^mask@0.5 | mask IoU, instance pairs (all kept) | mask IoU, disjoint boxes "
             "| mask inside its box |", "|---|---|---|---|---|---|"]

    def pair(key, old, new, fmt):
        if old.get(key) is None and new.get(key) is None:
            return "-"
        show = lambda v: "-" if v is None else fmt.format(v)  # noqa: E731
        return f"{show(old.get(key))} -> {show(new.get(key))}"

    for name, new in results["rows"].items():
        old = before.get(name, {})
        lines.append(f"| {name} | {pair('mAP50/bbox', old, new, '{:.3f}')} | {pair('mAP50/segm', old, new, '{:.3f}')} | "
                     f"{pair('mask_pairwise_iou_median', old, new, '{:.2f}')} | "
                     f"{pair('mask_disjoint_iou_median', old, new, '{:.2f}')} | "
                     f"{pair('mask_inside_box_mean', old, new, '{:.0%}')} |")
    return "\n".join(lines)


def results_table(results: dict) -> str:
    """mAP@0.5 per model, and where it has masks how well they fit their instances: median IoU
    between two instances' masks in one image and instances per image, with every instance
    scoring >= 0.5 kept and as published (duplicate removal, ``InferenceConfig.duplicate_iou``);
    median IoU of pairs whose boxes are disjoint; share of a mask inside its own box."""
    lines = ["| model | mAP^box@0.5 | mAP^mask@0.5 | mask IoU, instance pairs: all kept / published "
             "| instances per image: all kept / published | mask IoU, pairs with disjoint boxes "
             "| mask inside its box |", "|---|---|---|---|---|---|---|"]

    def cell(value, fmt="{:.3f}"):
        return "-" if value is None or value != value else fmt.format(value)  # None / NaN: not measured

    def two(metrics, raw, shown, fmt):
        if cell(metrics.get(raw)) == "-":
            return "-"
        return f"{cell(metrics.get(raw), fmt)} / {cell(metrics.get(shown), fmt)}"

    for name, metrics in results["rows"].items():
        lines.append(f"| {name} | {cell(metrics.get('mAP50/bbox'))} | {cell(metrics.get('mAP50/segm'))} | "
                     f"{two(metrics, 'mask_pairwise_iou_median', 'published_pairwise_iou_median', '{:.2f}')} | "
                     f"{two(metrics, 'instances_per_image', 'published_instances_per_image', '{:.2f}')} | "
                     f"{cell(metrics.get('mask_disjoint_iou_median'), '{:.2f}')} | "
                     f"{cell(metrics.get('mask_inside_box_mean'), '{:.0%}')} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- export

MODEL_CARD = """# toist default model (synthetic world only)

The model `make demo` and the perception node use when no checkpoint is given.

**It knows only the synthetic world** of `toist_core.data.synth`: flat coloured, textured
shapes standing for {num_classes} COCO classes on gradient backgrounds, and on real photos its
instances mean nothing: {real_photos} For real robots use an official TOIST checkpoint (see
docs/checkpoints.md). Setting a task other than {task_list} warns that its results mean little.

- Network: the TOIST architecture at small size (`mobile_segm` preset: MobileNetV2 backbone
  from torchvision's ImageNet weights, fine-tuned in pre-training only; 2-layer RoBERTa-style text encoder on the packaged
  801-token tokenizer; 128-d transformer, 2 encoder + 6 decoder layers; {queries} queries; DETR
  mask head), the distilled student with its memory bank (CCR at inference).
- Input: short side {test_size} px, long side at most {long_side} px, the size it was trained at; recorded
  in `config.yaml` (`input_size`), which the node and `TaskSegmenter` resize to by default.
- Tasks: {tasks} (COCO-Tasks ids), pronoun "something".
- Data: synthetic COCO-Tasks, {train_images} train / {test_images} test images of
  {min_size}-{max_size} px with {min_objects}-{max_objects} objects, about {empty_pct}% of a
  task's images without a preferred object (seed {data_seed}).
- Training (`python -m training.default_model{ablation_flag}`, CPU, {minutes:.0f} min on {threads} cores{ablation_time},
  {jobs} independent stages at a time):
  MDETR-style grounding pre-training on {pretrain_images} single-object scenes of all classes
  ({pretrain_epochs} epochs, backbone lr {pretrain_backbone_lr:g}; stands in for the MDETR weights
  the paper starts from); from it
  the noun teacher ({teacher_epochs} epochs) and the plain pronoun student ({student_epochs}
  epochs); the distilled student {distill_epochs} epochs from both at lr {distill_lr:g} (a fine-tune of the
  trained student; student and teacher trained, bank {bank_size} per task, 3 clusters, cluster-loss weight {cluster_loss:g}: the paper's 1e4
  dominates the loss at this model's feature scale); the mask head {mask_epochs} epochs on each frozen
  student. AdamW lr {lr} (backbone frozen after pre-training), batch {batch_size} (the distillation {distill_batch}: two
  models in memory), EMA, best checkpoints on a 10%
  holdout of the training images.

## Metrics (synthetic test split, never seen in training; mean over tasks)

{table}

Produced by the recipe; `metrics.json` has the per-task numbers. Reproduce with
`make default-model` (same numbers up to CPU floating-point noise; the "off" rows, the
distillation with one part switched off, need `--ablations`). Mask columns, over
{agreement_images} test images per task at score >= 0.5, one image at a time: median IoU between
the masks of two instances of one image and instances per image, with every instance kept / as
published (the node's duplicate removal, `InferenceConfig.duplicate_iou` 0.7: of two instances
whose masks overlap with IoU above 0.7 the lower-scoring one is dropped); median IoU of pairs
whose boxes overlap by less than 0.1, and the mean share of a mask's pixels inside its own box
(every instance kept).

## Before and after

The model this one replaced was trained by the same recipe, except its distillation: that ran at
the detectors' learning rate 2e-4 and undid within its first epoch what the trained student had
learnt (distilled box mAP@0.5 0.568 against the plain student's 0.594). This one fine-tunes the
student at {distill_lr:g} (teacher, plain student and the plain student's mask head are the same
models). Old -> new (the old model's masks were measured with every instance kept, as the "all
kept" column here):

{comparison}
"""


# The demo camera's photos (scikit-image's samples), to say what the model returns on real images.
REAL_PHOTOS = ("coffee", "chelsea", "astronaut", "rocket", "camera")


def real_photo_scores(checkpoint: Path, tasks: Sequence[int]) -> dict[str, list[float]]:
    """``{"<photo>/task_<k>": scores of the instances}`` of a model on scikit-image's sample photos
    at the node's default settings (score >= 0.5, the model's input size, masks computed, so
    duplicates are found by mask overlap as the node finds them); empty without scikit-image."""
    try:
        import skimage.data
    except ImportError:
        return {}
    import numpy as np

    from toist_core.inference import TaskSegmenter

    segmenter = TaskSegmenter.from_pretrained(checkpoint, device="cpu")
    scores = {}
    for name in REAL_PHOTOS:
        pixels = np.asarray(getattr(skimage.data, name)())
        pixels = np.ascontiguousarray(np.stack([pixels] * 3, -1) if pixels.ndim == 2 else pixels[..., :3])
        for task in tasks:
            prediction = segmenter.predict(pixels, segmenter.encode_task(task))
            scores[f"{name}/task_{task}"] = [round(float(v), 3) for v in prediction.scores]
    return scores


def real_photo_summary(scores: dict[str, list[float]]) -> str:
    """One sentence for the card and the README: how many instances, at which scores."""
    if not scores:
        return "(not measured: scikit-image is not installed)."
    found = [v for values in scores.values() for v in values]
    photos = list(dict.fromkeys(key.split("/")[0] for key in scores))
    tasks = set(key.split("/")[1] for key in scores)
    some = sum(bool(values) for values in scores.values())
    text = (f"on scikit-image's photos {', '.join(photos)} (the demo camera's), for each of its "
            f"{len(tasks)} tasks at the node's default score threshold 0.5, it returns {len(found)} instances "
            f"over the {len(scores)} (photo, task) pairs ({some} pairs with at least one")
    if found:
        text += f"; scores {min(found):.2f}-{max(found):.2f}"
    return text + "); it has never seen a real image."


def add_training_minutes(out: Path, minutes: float) -> float:
    """The work directory's training wall time over all its runs, this one's ``minutes`` added
    (a resumed run, or one adding the ablations, does not report only its own part)."""
    path = out / TRAINING_MINUTES
    remedy = "delete it (the total then counts from this run)"
    recorded = _record(path, remedy).get("minutes") if path.is_file() else 0.0
    number = isinstance(recorded, (int, float)) and not isinstance(recorded, bool)
    try:
        minutes_so_far = float(recorded) if number else math.nan
    except OverflowError:   # an integer of 400 digits
        minutes_so_far = math.inf
    if not 0 <= minutes_so_far < math.inf:
        raise RecipeRefused(f"{path}: field 'minutes' is {str(recorded)[:40]}, not a number of minutes: {remedy}")
    total = minutes_so_far + minutes
    write_text_atomic(path, json.dumps({"minutes": total}))
    return total


def export_default(settings: RecipeSettings, out: Path, results: dict, minutes: float) -> Path:
    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    export_checkpoint(out / "distilled_masks" / BEST, model_dir)
    # Null where nothing was measured (a median over no pair): NaN tokens are not JSON.
    (model_dir / "metrics.json").write_text(dumps_null_for_nan({**results, "settings": asdict(settings)}, indent=1))
    from toist_core.data.synth import SYNTH_CLASSES

    ablations = any(name.endswith(ABLATION_SUFFIX) for name in results["rows"])
    card = MODEL_CARD.format(num_classes=len(SYNTH_CLASSES), table=results_table(results), minutes=minutes,
                             real_photos=real_photo_summary(results.get("real_photos", {})),
                             comparison=comparison_table(results), agreement_images=MASK_AGREEMENT_IMAGES,
                             task_list=", ".join(map(str, settings.tasks)),
                             ablation_flag=" --ablations" if ablations else "",
                             ablation_time=" with the ablations" if ablations else "",
                             empty_pct=round(100 * settings.empty_fraction), test_size=settings.input_size.short_side,
                             long_side=settings.input_size.max_size, distill_batch=settings.distill_batch_size,
                             **asdict(settings))
    (model_dir / "MODEL_CARD.md").write_text(card)
    return model_dir


def install(model_dir: Path, destination: Path = PACKAGE_MODEL_DIR) -> Path:
    """Replace the packaged default model with ``model_dir``: written aside, the old one renamed
    away, the new one renamed in (a crash in between leaves the old one, ``.old``, restorable),
    then the old one deleted."""
    staging = destination.with_name(destination.name + ".new")
    previous = destination.with_name(destination.name + ".old")
    for leftover in (staging, previous):
        if leftover.exists():
            shutil.rmtree(leftover)
    shutil.copytree(model_dir, staging)
    if destination.exists():
        destination.rename(previous)
    try:
        staging.rename(destination)
    except OSError:
        if previous.exists():
            previous.rename(destination)
        raise
    shutil.rmtree(previous, ignore_errors=True)
    return destination


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.default_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/default_model", help="work directory (data, runs, model)")
    parser.add_argument("--install", action="store_true", help=f"copy the exported model to {PACKAGE_MODEL_DIR}")
    parser.add_argument("--ablations", action="store_true", help="also train with CCR / CL / SBTL off in turn")
    parser.add_argument("--jobs", type=int, default=RecipeSettings.jobs,
                        help="stages trained at once (each on threads // jobs threads; 1 = one after another)")
    parser.add_argument("--quick", action="store_true", help="a few updates per stage (checks the recipe, "
                                                              "proves nothing)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs: must be >= 1, got {args.jobs}")
    if args.quick and args.install:
        parser.error("--install with --quick would replace the packaged default model with a model of a few "
                     "updates: install only a full run")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = RecipeSettings(jobs=args.jobs)
    if args.quick:
        settings = RecipeSettings(tasks=[1, 2], train_images=24, test_images=8, pretrain_images=8, batch_size=4,
                                  pretrain_epochs=1, teacher_epochs=1, student_epochs=1, distill_epochs=1,
                                  mask_epochs=1, jobs=args.jobs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with work_dir_lock(out):
            return _run(settings, out, args.ablations, args.install)
    except StageStopped as stopped:
        print(f"stopped ({stopped}); every stage cut short wrote its checkpoint: run the same command again "
              f"to continue", file=sys.stderr)
        return exit_code(stopped.signum)
    except (WorkDirBusy, RecipeRefused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def install_problems(results: dict) -> list[str]:
    """Why a finished run's model must not replace the packaged one (empty: it may): the checks
    the tests make of the committed model (tests/test_default_model.py), on the new figures.
    A run that finished with a broken model overwrote the packaged one; the tests found it after."""
    rows = {name: row.get("mAP50/bbox") for name, row in results["rows"].items()}
    needed = ("untrained", "teacher (noun captions)", "teacher (pronoun captions)", "plain student",
              "distilled student")
    missing = [name for name in needed if rows.get(name) is None]
    if missing:
        return [f"no box mAP@0.5 for {', '.join(missing)}"]
    problems = []
    floor = max(0.05, 10 * rows["untrained"])
    problems += [f"{name}: box mAP@0.5 {rows[name]:.3f} is not above {floor:.3f} (0.05, and 10x the untrained model)"
                 for name in needed[1:] if name != "teacher (pronoun captions)" and not rows[name] > floor]
    teacher, plain, distilled = rows["teacher (pronoun captions)"], rows["plain student"], rows["distilled student"]
    if not min(plain, distilled) > teacher + 0.05:
        problems.append(f"the students ({plain:.3f}, {distilled:.3f}) are not 0.05 above the noun teacher reading "
                        f"pronoun captions ({teacher:.3f}): they do not read the verb")
    if not distilled > plain - 0.05:
        problems.append(f"the distilled student ({distilled:.3f}) is more than 0.05 below the plain one ({plain:.3f})")
    problems += _mask_problems(results["rows"]["distilled student"])
    return problems


def _mask_problems(row: dict) -> list[str]:
    """The packaged model's masks as test_committed_masks_belong_to_their_instances judges them:
    mask mAP keeping up with box mAP, published instances whose masks are different objects and
    lie in their boxes (a run with every mask alike, mask mAP 0.105, passed the box checks)."""
    def number(key: str) -> float:
        value = row.get(key)
        return float("nan") if value is None else float(value)   # missing or NaN: fails every check below

    segm, bbox = number("mAP50/segm"), row["mAP50/bbox"]
    problems = []
    if not segm >= 0.7 * bbox:
        problems.append(f"distilled student: mask mAP@0.5 {segm:.3f} is below 0.7x its box mAP@0.5 ({bbox:.3f})")
    # (no image with two published instances: no pair to judge, and a median of none is NaN)
    if number("published_pairs") != 0 and not number("published_pairwise_iou_median") < 0.3:
        problems.append(f"distilled student: the median mask IoU between published instances of an image is "
                        f"{number('published_pairwise_iou_median'):.2f}, not below 0.3 (one object twice)")
    if not number("published_inside_box_mean") >= 0.8:
        problems.append(f"distilled student: {number('published_inside_box_mean'):.0%} of a published mask lies in "
                        "its box on average, not 80 %")
    return problems


def install_checked(results: dict, model_dir: Path) -> int:
    """Install ``model_dir`` if its figures pass :func:`install_problems` (0); else say why and
    leave the packaged model as it was (1)."""
    problems = install_problems(results)
    if problems:
        print("not installed (the packaged model is left as it was): " + "; ".join(problems)
              + f"; the new model is in {model_dir}", file=sys.stderr)
        return 1
    print(f"installed: {install(model_dir)}")
    return 0


def _run(settings: RecipeSettings, out: Path, ablations: bool, install_model: bool) -> int:
    check_settings(settings, out)
    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    write_data(settings, out)
    plan = stages(settings, out, ablations)
    training_started = time.perf_counter()
    try:
        timings = run_plan(settings, out, plan)
    except BaseException:  # interrupted or failed: its training time still counts in the total
        try:
            add_training_minutes(out, (time.perf_counter() - training_started) / 60)
        except (RecipeRefused, OSError) as exc:   # not instead of the failure or stop under way: beside it
            print(f"error: {exc}", file=sys.stderr)
        raise
    minutes = add_training_minutes(out, (time.perf_counter() - training_started) / 60)
    results = evaluate_all(settings, out, plan, DistEnv())
    results["stages"] = timings
    results["real_photos"] = real_photo_scores(out / "distilled_masks" / BEST, settings.tasks)
    results["training_wall_minutes"] = minutes
    model_dir = export_default(settings, out, results, minutes)
    print(f"\nmAP@0.5 on the synthetic test split (tasks {settings.tasks}, {results['test_pairs']} "
          f"(task, image) pairs; training {minutes:.1f} min):\n\n{results_table(results)}\n")
    print(f"model directory: {model_dir}")
    code = install_checked(results, model_dir) if install_model else 0
    print(f"recipe finished in {(time.perf_counter() - started) / 60:.1f} min")
    return code


if __name__ == "__main__":
    sys.exit(main())
