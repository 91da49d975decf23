"""The training loop: one class that owns a run from set-up to the last checkpoint.

Per update (reference ``engine.py``): forward of the stage (two-phase, see
:mod:`training.stages`) -> losses -> ``sum(loss[k] * weight[k])`` -> backward -> clip student
and teacher separately -> ``optimizer.step()`` -> learning rates of the next update -> EMA of
both models. Then, as configured: scalars to TensorBoard, ``checkpoint.pth`` every N updates,
and at the end of an epoch evaluation on the validation split, ``checkpoint.pth`` (+ a
numbered copy) and ``BEST_checkpoint.pth`` when the validation mAP@0.5 improved.

Exact resume: the data order and every augmentation are functions of (seed, epoch, sample)
(:mod:`training.sampling`), the learning rates a function of the step, and a checkpoint holds
model, EMA, optimizer, AMP scaler, memory bank and every process's random generators. A run
resumed from the checkpoint of update ``s`` therefore repeats exactly the updates an
uninterrupted run makes after ``s``.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as torch_dist
from torch import Tensor
from torch.utils.data import DataLoader

from toist_core.checkpoint.strict import non_finite_tensors
from toist_core.listing import listing
from toist_core.data.collate import Collator
from toist_core.inference import NonFiniteOutputError
from toist_core.losses.criterion import weighted_total
from toist_core.model import load_tokenizer
from toist_core.stop_signals import StopSignals
from toist_core.typed_config import ConfigError

from training import checkpointing as ckpt_io
from training.config import TrainConfig, check_paths, config_to_dict, save_config
from training.distributed import (DistEnv, all_gather_objects, barrier, broadcast_object, seed_everything,
                                  set_deterministic, wrap_ddp)
from training.ema import ModelEMA
from training.evaluate import evaluate, holdout_trained_on
from training.export import export_checkpoint
from training.interrupt import ignore_stop_signals
from training.optim import build_optimizer, clip_grad_norm
from training.run_data import build_run_data
from training.sampling import EpochBatchSampler, SeededSamples
from training.schedule import LRSchedule, ScheduleMismatch
from training.stages import StepModule, build_criterion, build_stage_models, compute_losses, float_outputs
from training.start_checks import (BEST, EPOCH_PATTERN, LAST, MODEL_DIR, RUN_CONFIG, check_resume_config,
                                   continued_run, foreign_config_problem, model_dir_problem, new_run_advice, other_run_file,
                                   refuse_existing_run, resumes_in_place)



@dataclass
class TrainResult:
    step: int
    epoch: int
    last_losses: dict[str, float] = field(default_factory=dict)
    loss_history: list[float] = field(default_factory=list)   # weighted total per update (this process)
    metrics: Optional[dict] = None
    best: Optional[dict] = None
    output_dir: Optional[Path] = None
    stopped_by: Optional[int] = None    # the signal that stopped the run early (checkpoint written)


class Trainer:
    """Set up everything a stage needs and run it (``Trainer(cfg, env).run()``).

    ``resume``: a ``checkpoint.pth`` to continue exactly. ``on_step(trainer, step)`` is called
    after every update (after any checkpoint of that step), e.g. for tests or custom logging.
    ``stop``: a :class:`~toist_core.stop_signals.StopSignals`; once it holds a signal (on any
    process), the run ends after the update in progress with ``checkpoint.pth`` written.
    """

    def __init__(self, cfg: TrainConfig, env: DistEnv, resume: Optional[str] = None,
                 on_step: Optional[Callable[["Trainer", int], None]] = None, log=None,
                 stop: Optional[StopSignals] = None):
        self.cfg = cfg
        self.env = env
        self.on_step = on_step
        self.stop = stop
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True) if env.is_main else None)
        self.output_dir = Path(cfg.output_dir)
        check_paths(cfg, resume)
        resume_state = ckpt_io.load_training_checkpoint(resume) if resume else None
        # Rank 0 writes output_dir, so its view decides; every process refuses together (a
        # process going on alone would wait in DDP's set-up for the ones that stopped).
        problem = broadcast_object(model_dir_problem(cfg) if env.is_main else None, env)
        if problem is not None:
            raise ConfigError(problem)
        # A fresh start, or a resume into another folder than its checkpoint's, would overwrite the
        # folder's own run (its checkpoint.pth, model/, config.yaml).
        resume_run = resume_state.get("run_id") if resume_state is not None else None
        found = broadcast_object(other_run_file(self.output_dir, resume, resume_run) if env.is_main else None, env)
        if found is not None:
            refuse_existing_run(self.output_dir, found, resume)
        # Which run this is: the one it continues (kept through every resume), else a new one.
        self.run_id = broadcast_object((continued_run(self.output_dir, resume, resume_run) or uuid.uuid4().hex)
                                       if env.is_main else None, env)
        if not resumes_in_place(self.output_dir, resume):
            problem = broadcast_object(foreign_config_problem(self.output_dir) if env.is_main else None, env)
            if problem is not None:
                raise ConfigError(problem)
        if resume_state is not None:
            check_resume_config(resume_state, cfg, resume)
        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)
        set_deterministic(cfg.runtime.deterministic, env.device)
        # Same initial weights on every process (DDP would broadcast rank 0's anyway), then
        # the reference's per-process streams (seed + rank) for dropout and the like.
        seed_everything(cfg.runtime.seed)

        # Data: training samples (minus the holdout) and the validation images.
        self.tokenizer = load_tokenizer(cfg.model.text.tokenizer)
        data = build_run_data(cfg, self.tokenizer, self.log)
        train_set, holdout, self.val = data.train_set, data.holdout, data.val
        try:
            self.sampler = EpochBatchSampler(len(train_set), cfg.loader.batch_size, env.world_size, env.rank,
                                             shuffle=True, seed=cfg.runtime.seed)
        except ValueError as exc:
            raise ConfigError(f"loader.batch_size: {exc}" if str(exc).startswith("batch_size") else str(exc)) from None
        self.loader = DataLoader(SeededSamples(train_set), batch_sampler=self.sampler,
                                 collate_fn=Collator(self.tokenizer), num_workers=cfg.loader.num_workers,
                                 worker_init_fn=ignore_stop_signals,
                                 pin_memory=cfg.loader.pin_memory and env.device.type == "cuda",
                                 generator=torch.Generator())  # keeps the global stream untouched
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = self.steps_per_epoch * cfg.schedule.epochs
        self.max_steps = min(self.total_steps, cfg.schedule.max_steps or self.total_steps)

        # Models, EMA, optimizer, schedule, loss.
        models = build_stage_models(cfg, self.tokenizer, log=self.log, load_init=resume_state is None)
        for where, path, source_config in (models.trained_by if holdout else ()):
            seen = holdout_trained_on(cfg, holdout, source_config)
            if seen:
                self.log(f"warning: {where}: {path} was trained on {seen} of this run's {len(holdout)} holdout "
                         f"images (its eval.split / holdout_fraction / holdout_seed differ): the holdout mAP is "
                         f"optimistic; use that run's holdout settings")
        self.model = models.model.to(env.device)
        self.teacher = models.teacher.to(env.device) if models.teacher is not None else None
        self.cluster = models.cluster.to(env.device) if models.cluster is not None else None
        o = cfg.optim
        self.optimizer = build_optimizer(self.model, o.lr, o.lr_backbone, o.text_encoder_lr, o.weight_decay,
                                         teacher=self.teacher)
        self.schedule = LRSchedule(self.steps_per_epoch, cfg.schedule.epochs, cfg.schedule.lr_drop,
                                   cfg.schedule.warmup_fraction)
        self._trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.criterion, self.weight_dict = build_criterion(cfg)
        self.amp_dtype = _amp_dtype(cfg, env.device)
        self.scaler = torch.amp.GradScaler(env.device.type) if self.amp_dtype == torch.float16 else None
        self.step_module = StepModule(models, cfg.stage, cfg.data.pronoun)
        # Buffers are not broadcast each step: frozen BatchNorm never changes and the memory bank
        # is kept identical on every process by its all-gathered updates.
        self.train_module = wrap_ddp(self.step_module, env, cfg.distributed.find_unused_parameters,
                                     broadcast_buffers=False)
        seed_everything(cfg.runtime.seed + env.rank)
        # EMA copies are taken after DDP has made the weights identical on every process.
        self.ema = ModelEMA(self.model, cfg.optim.ema_decay) if cfg.optim.ema else None
        self.ema_teacher = (ModelEMA(self.teacher, cfg.optim.ema_decay)
                            if cfg.optim.ema and self.teacher is not None else None)

        self.step = 0
        self.best: Optional[dict] = None
        self.metrics: Optional[dict] = None
        self.last_eval_step = -1
        self.eval_pending = False   # the evaluation of update `step` failed: repeat it first
        if resume_state is not None:
            self._restore(resume_state, resume)
        else:
            self.schedule.apply(self.optimizer, 0)
        self.writer = None
        if env.is_main:
            # Only once the run is accepted (the resumed checkpoint's own checks included): a
            # refused start must not touch a folder that another run may still be writing into.
            for stale in ckpt_io.remove_stale_temporaries(self.output_dir):
                self.log(f"removed {stale}: a checkpoint write cut short by an earlier run")
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / RUN_CONFIG)
            if cfg.runtime.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # A resume replays the updates after its checkpoint, which the interrupted run may
                # have logged already: TensorBoard drops those events (each update shown once).
                self.writer = SummaryWriter(str(self.output_dir / "tb"),
                                            purge_step=self.step + 1 if resume_state is not None else None)

    # ------------------------------------------------------------------------------ running

    def run(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        result = TrainResult(step=self.step, epoch=self.step // self.steps_per_epoch, output_dir=self.output_dir)
        self.log(f"stage {cfg.stage}: {self.steps_per_epoch} updates/epoch x {cfg.schedule.epochs} epochs "
                 f"(batch {cfg.loader.batch_size} x {env.world_size} process(es)), from update {self.step}, "
                 f"until {self.max_steps}; device {env.device}")
        result.stopped_by = self._stop_signal()
        if self.eval_pending and result.stopped_by is None:
            self._finish_pending_eval()
            # A stop during it ends the run here (checkpoint.pth holds the evaluation): it trained
            # one more update first.
            result.stopped_by = self._stop_signal()
        if result.stopped_by is None:
            self._write_interrupted_best()
            result.stopped_by = self._stop_signal()
        while self.step < self.max_steps and result.stopped_by is None:
            epoch = self.step // self.steps_per_epoch
            self.train_module.train()   # the reference's model.train() each epoch: dropout on, whatever built the modules
            self.sampler.set_epoch(epoch, self.step % self.steps_per_epoch)
            progress = self._progress(epoch)
            window_start, window_samples = time.perf_counter(), 0
            for batch in self.loader:
                losses, total = self._train_step(batch)
                self.step += 1
                result.loss_history.append(total)
                window_samples += len(batch[0]) * env.world_size
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{total:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
                if self.step % cfg.runtime.log_every == 0 or self.step == self.max_steps:
                    rate = window_samples / max(time.perf_counter() - window_start, 1e-9)
                    result.last_losses = self._log_scalars(losses, total, rate)
                    window_start, window_samples = time.perf_counter(), 0
                self._after_step()
                if self.on_step is not None:
                    self.on_step(self, self.step)
                result.stopped_by = self._stop_signal()
                if result.stopped_by is not None:
                    self._save(LAST)
                    self.log(f"stopped by signal {result.stopped_by} after update {self.step}: "
                             f"{self.output_dir / LAST} written")
                if self.step >= self.max_steps or result.stopped_by is not None:
                    break
            if progress is not None:
                progress.close()
        # A finished run resumed into a new folder trains nothing, so wrote no checkpoint there
        # (and the export read a file that was not there): the folder gets the run's state.
        if result.stopped_by is None and broadcast_object(not (self.output_dir / LAST).exists()
                                                          if env.is_main else None, env):
            self._save(LAST)
        if cfg.checkpoint.export_model_dir and env.is_main and result.stopped_by is None:
            self.export(self.output_dir / MODEL_DIR)
        barrier(env)
        if self.writer is not None:
            self.writer.close()
        result.step, result.epoch = self.step, self.step // self.steps_per_epoch
        result.metrics, result.best = self.metrics, self.best
        return result

    def _train_step(self, batch) -> tuple[dict[str, Tensor], float]:
        cfg, device = self.cfg, self.env.device
        if cfg.is_distill:
            images, noun_targets, targets = batch
            noun_targets = [_to_device(t, device) for t in noun_targets]
        else:
            images, targets = batch
            noun_targets = None
        images = images.to(device, non_blocking=True)
        targets = [_to_device(t, device) for t in targets]
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            try:
                outputs, cluster_losses = self.train_module(images, targets, noun_targets)
            except FloatingPointError as exc:
                # The memory bank's update and k-means run inside the forward, on rows gathered
                # from every process: all raise it at the same point.
                raise FloatingPointError(f"update {self.step + 1}: {exc}; {self._stopped_note()}") from None
        # Before the losses: the matchers refuse non-finite predictions on their process only,
        # and the others would then wait in the loss's collectives.
        bad = _non_finite_tensors(outputs)
        self._stop_unless_finite(f"NaN/inf in {', '.join(bad)}" if bad else None, "model outputs")
        with torch.autocast(device.type, enabled=False):
            losses = compute_losses(self.criterion, cfg.stage, float_outputs(outputs),
                                    float_outputs(cluster_losses), targets, noun_targets)
            total = weighted_total(losses, self.weight_dict)
        finite = bool(torch.isfinite(total.detach()))
        self._stop_unless_finite(None if finite else f"terms {_numbers(losses)}", "loss")
        if not total.requires_grad:
            # E.g. a mask-head batch without any target: the loss is a constant. A zero term
            # through the outputs gives zero gradients (the reference's zero-valued loss) and
            # keeps every process's backward, and so DDP's reduction, in step.
            total = total + _zero_through(outputs, self._trainable)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            total.backward()
        norms = {"model": clip_grad_norm(self.model, cfg.optim.clip_max_norm)}
        if self.teacher is not None:
            norms["teacher"] = clip_grad_norm(self.teacher, cfg.optim.clip_max_norm)
        if self.scaler is None:
            # Before the step (and so before any checkpoint of this update): a non-finite gradient
            # would make every weight NaN. (fp16's scaler skips such an update and lowers its scale.)
            bad = {name: float(norm) for name, norm in norms.items() if norm is not None and not torch.isfinite(norm)}
            self._stop_unless_finite(f"{bad} (before clipping to {cfg.optim.clip_max_norm})" if bad else None,
                                     "gradient norm")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.schedule.apply(self.optimizer, self.step + 1)
        if self.ema is not None:
            self.ema.update(self.model)
        if self.ema_teacher is not None:
            self.ema_teacher.update(self.teacher)
        return losses, float(total.detach())

    def _stop_signal(self) -> Optional[int]:
        """The stop signal received by any process (all stop at the same update), else None."""
        signum = (self.stop.signum or 0) if self.stop is not None else 0
        if self.env.distributed:
            flag = torch.tensor([signum], dtype=torch.int64, device=self.env.device)
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
            signum = int(flag.item())
        return signum or None

    def _stop_unless_finite(self, problem: Optional[str], what: str) -> None:
        """Raise the same FloatingPointError on every process if any process has a ``problem``
        (what is not finite there; None: nothing), so that all stop at the same point of the
        update instead of the others waiting in its next collective until the timeout."""
        flag = torch.tensor([0.0 if problem is None else 1.0], device=self.env.device)
        if self.env.distributed:
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        if flag.item() == 0:
            return
        problems = all_gather_objects(problem, self.env)   # every process saw the flag: all are here
        found = "; ".join(f"process {rank}: {text}" for rank, text in enumerate(problems) if text is not None)
        raise FloatingPointError(f"{what} not finite in update {self.step + 1} ({found}); {self._stopped_note()}")

    def _stopped_note(self) -> str:
        """What a run stopped for non-finite numbers in the current update kept."""
        return (f"stopped before its optimizer step and before any checkpoint of it (the last one written, if "
                f"any: {self.output_dir / LAST})")

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------------- evaluation

    def _after_step(self) -> None:
        """Evaluate and write checkpoints as configured for the update just taken.

        The checkpoint of an update is written after its evaluation, so it records the best
        score so far and a resumed run never repeats or skips an evaluation.
        """
        cfg, step = self.cfg, self.step
        epoch_end = step % self.steps_per_epoch == 0
        final = step == self.max_steps
        every_epochs, every_steps = cfg.eval.every_epochs, cfg.eval.every_steps
        eval_due = cfg.eval.enabled and (
            (epoch_end and every_epochs > 0 and (step // self.steps_per_epoch) % every_epochs == 0)
            or (every_steps > 0 and step % every_steps == 0) or final)
        improved = self._evaluate_keeping_state() if eval_due else False
        self._write_checkpoints(improved)

    def _write_checkpoints(self, improved: bool, last: bool = False) -> None:
        """The checkpoints due after the update just taken (``last``: ``checkpoint.pth`` anyway)."""
        cfg, step = self.cfg, self.step
        epoch_end = step % self.steps_per_epoch == 0
        final = step == self.max_steps
        ckpt_every = cfg.checkpoint.every_steps
        # An improving update's BEST_checkpoint.pth comes after its checkpoint.pth, whatever the
        # cadence: a run stopped after writing BEST resumes from that very update (a BEST alone
        # was an earlier run's leftover that a restart refused).
        due = (epoch_end and cfg.checkpoint.per_epoch) or final or (ckpt_every and step % ckpt_every == 0)
        if last or due or improved:
            # The numbered copy first: a run stopped between the two resumes from the previous
            # checkpoint.pth and writes both again (after checkpoint.pth, it was never written).
            if epoch_end and cfg.checkpoint.keep_epochs > 0:
                self._save(f"checkpoint_epoch{step // self.steps_per_epoch:04d}.pth")
                if self.env.is_main:
                    ckpt_io.prune_step_checkpoints(self.output_dir, cfg.checkpoint.keep_epochs, EPOCH_PATTERN)
            self._save(LAST)
        if improved:
            self._save(BEST)

    def _evaluate_keeping_state(self) -> bool:
        """:meth:`_run_eval`; if it raises, ``checkpoint.pth`` of the update is written first.

        An evaluation comes before the update's checkpoint, so a failing one (a validation image
        gone, NaN predictions) would lose every update since the last checkpoint. The checkpoint
        marks the evaluation as pending: a resume from it evaluates that update first and then
        goes on as from the update's normal checkpoint (evaluation leaves the training state alone).
        """
        try:
            return self._run_eval()
        except Exception as exc:
            # Every process must take part in the save (it gathers the random states): one
            # process alone, or an error evaluate() raises on every process together.
            if self.env.world_size == 1 or isinstance(exc, NonFiniteOutputError):
                self.eval_pending = True
                self._save(LAST)
                self.log(f"evaluation of update {self.step} failed ({type(exc).__name__}); {self.output_dir / LAST} "
                         f"written first: a resume from it evaluates update {self.step} again, then trains on")
            raise

    def _finish_pending_eval(self) -> None:
        """The evaluation the resumed checkpoint's run could not finish, then the checkpoints
        that update's normal end would have written (``checkpoint.pth`` again, now recording the
        evaluation)."""
        if not self.cfg.eval.enabled:
            self.log(f"update {self.step}: its evaluation failed in the run that wrote the checkpoint; not repeated "
                     "(eval.enabled is false)")
            self.eval_pending = False
            return
        self.log(f"update {self.step}: repeating its evaluation, which failed in the run that wrote the checkpoint")
        improved = self._evaluate_keeping_state()
        self.eval_pending = False
        self._write_checkpoints(improved, last=True)

    def _run_eval(self) -> bool:
        """Evaluate on the validation split; True when the selection metric improved."""
        cfg = self.cfg
        model = self.ema.module if self._evaluated_weights() == "ema" else self.model
        bank = self.cluster.bank if self.cluster is not None else None
        metrics = evaluate(model, self.val, cfg, self.env, bank)
        self.metrics = metrics
        self.last_eval_step = self.step
        key = f"mAP50/{cfg.metric_iou_type}"
        value = metrics[key]
        # NaN: no task has a result (no target in its images, or no image): nothing to rank.
        scored = not math.isnan(value)
        shown = f"{value:.4f}" if scored else "n/a (no validation task has a target)"
        self.log(f"update {self.step}: {self.val.split} {key} = {shown} "
                 f"({int(metrics['images'])} images, {metrics['seconds']:.1f} s)")
        if self.writer is not None:
            for name, number in metrics.items():
                self.writer.add_scalar(f"val_{self.val.split}/{name}", number, self.step)
        self._forget_incomparable_best(key)
        improved = scored and (self.best is None or value > self.best["value"])
        if improved:
            self.best = {"metric": key, "value": value, "step": self.step,
                         "epoch": self.step // self.steps_per_epoch, "split": self.val.split,
                         "protocol": cfg.eval.protocol, "weights": self._evaluated_weights()}
        return improved

    def _forget_incomparable_best(self, key: str) -> None:
        """Start the best over when it was scored with another metric, on another split, under
        another ``eval.protocol`` or on other weights (``eval.use_ema``) — a resume with other
        eval settings: the numbers do not compare. (A best recorded before the protocol was
        recorded was scored under toist's; one recorded before the weights were, is kept.)"""
        best = self.best
        protocol, weights = self.cfg.eval.protocol, self._evaluated_weights()
        if best is None or (best["metric"], best["split"], best.get("protocol", "toist"),
                            best.get("weights", weights)) == (key, self.val.split, protocol, weights):
            return
        self.log(f"update {self.step}: the best so far ({best['metric']} = {best['value']:.4f} on {best['split']!r}, "
                 f"protocol {best.get('protocol', 'toist')!r}, {best.get('weights', weights)} weights, update "
                 f"{best['step']}) was scored otherwise than this run's {key} on {self.val.split!r}, protocol "
                 f"{protocol!r}, {weights} weights: the best starts over")
        self.best = None

    # ------------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        """The checkpoint dict (every process must call it: it gathers the random states)."""
        rng = all_gather_objects(ckpt_io.capture_rng_state(self.env.device), self.env)
        bank_state = self.cluster.bank.state_dict() if self.cluster is not None else None
        # Every process's stored centres: the same under kmeans_rerun on_change; under every_use
        # each process's k-means (one per image it reads, warm-started) moves its own, as the
        # reference's do, so a resume with rank 0's everywhere would not continue exactly.
        centres = (all_gather_objects(self.cluster.bank.cluster_centers.detach().cpu(), self.env)
                   if self.cluster is not None else None)
        return {
            "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "stage": self.cfg.stage, "run_id": self.run_id,
            "model": self.model.state_dict(),
            "model_ema": self.ema.state_dict() if self.ema is not None else None,
            "model_noun": self.teacher.state_dict() if self.teacher is not None else None,
            "model_noun_ema": self.ema_teacher.state_dict() if self.ema_teacher is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": dict(self.schedule.state_dict(), step=self.step),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.step // self.steps_per_epoch,
            "step": self.step,
            "world_size": self.env.world_size,
            "rng": rng,
            "cluster_criterion": bank_state,
            # Beside the bank's reference keys: which tasks' centres still need k-means.
            "cluster_stale": self.cluster.bank.stale_flags() if self.cluster is not None else None,
            "cluster_centers_per_rank": centres,
            "config": config_to_dict(self.cfg),
            "best": self.best,
            "metrics": self.metrics,
            "last_eval_step": self.last_eval_step,
            "eval_pending": self.eval_pending,
        }

    def _save(self, name: str) -> None:
        # Every process holds the same weights, so all stop here together; the file on disk (the
        # last good one) is not replaced by NaN weights.
        trained = {"model": self.model, "model_noun": self.teacher}
        bad = [f"{key} {entry}" for key, module in trained.items() if module is not None
               for entry in non_finite_tensors(module.state_dict())]
        if bad:
            raise FloatingPointError(f"weights not finite after update {self.step}: {listing(bad, 8)}; "
                                     f"{self.output_dir / name} is left as it was (not replaced)")
        state = self.state()
        if self.env.is_main:
            ckpt_io.atomic_save(state, self.output_dir / name)
        barrier(self.env)

    def _restore(self, ckpt: dict, path) -> None:
        """Load a resume checkpoint; everything is checked before anything is changed."""
        where = str(path)
        ckpt_io.check_state_dict(ckpt["model"], self.model, f"{where} [model]")
        if self.ema is not None:
            ckpt_io.check_state_dict(ckpt.get("model_ema"), self.ema.module, f"{where} [model_ema]")
        if self.teacher is not None:
            ckpt_io.check_state_dict(ckpt.get("model_noun"), self.teacher, f"{where} [model_noun]")
        if self.ema_teacher is not None:
            ckpt_io.check_state_dict(ckpt.get("model_noun_ema"), self.ema_teacher.module, f"{where} [model_noun_ema]")
        if self.cluster is not None:
            ckpt_io.check_state_dict(ckpt.get("cluster_criterion"), self.cluster.bank, f"{where} [cluster_criterion]")
            stale = ckpt.get("cluster_stale")   # absent in older checkpoints: every task re-clusters
            if stale is not None and tuple(stale.shape) != (self.cluster.bank.num_tasks,):
                raise ckpt_io.CheckpointError(f"{where} [cluster_stale]: shape {tuple(stale.shape)}, the bank has "
                                              f"{self.cluster.bank.num_tasks} tasks")
            ckpt_io.check_per_rank_centres(ckpt.get("cluster_centers_per_rank"),
                                           tuple(self.cluster.bank.cluster_centers.shape),
                                           f"{where} [cluster_centers_per_rank]")
        written_by = ckpt.get("world_size")
        if written_by is not None and written_by != self.env.world_size:
            # Updates per epoch can come out equal (ceil(N / processes) // batch), but the images
            # per update, each process's share of the data mid-epoch and the random streams change.
            raise ckpt_io.CheckpointError(
                f"{where} was written by {written_by} process(es), this run has {self.env.world_size}: a resume "
                f"runs with the same number (torchrun --nproc_per_node {written_by}; over several nodes, the same "
                f"total), or the images per update and each process's data would change. "
                f"{new_run_advice(self.cfg.stage, path)}")
        try:
            self.schedule.check_compatible(ckpt["scheduler"], where)
        except ScheduleMismatch as exc:
            # Said only when it is what differs: a changed schedule.epochs changes total_steps, not it.
            hint = (" Updates per epoch follow from the data, loader.batch_size and the number of processes."
                    if "steps_per_epoch" in exc.keys else "")
            raise ckpt_io.CheckpointError(f"{exc}.{hint} {new_run_advice(self.cfg.stage, path)}") from None
        if len(ckpt["optimizer"].get("param_groups", [])) != len(self.optimizer.param_groups):
            raise ckpt_io.CheckpointError(f"{where} [optimizer]: {len(ckpt['optimizer'].get('param_groups', []))} "
                                          f"parameter groups, this run has {len(self.optimizer.param_groups)}")
        ckpt_io.check_optimizer_state(ckpt["optimizer"], f"{where} [optimizer]")
        step = int(ckpt["step"])
        if not 0 <= step <= self.total_steps:
            raise ckpt_io.CheckpointError(f"{where}: step {step} outside this run's {self.total_steps} updates")
        rng = ckpt.get("rng") or []
        same_world = written_by == self.env.world_size and len(rng) == self.env.world_size

        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["model_ema"])
        if self.teacher is not None:
            self.teacher.load_state_dict(ckpt["model_noun"])
        if self.ema_teacher is not None:
            self.ema_teacher.load_state_dict(ckpt["model_noun_ema"])
        if self.cluster is not None:
            self.cluster.bank.load_state_dict(ckpt["cluster_criterion"])
            self.cluster.bank.load_stale_flags(ckpt.get("cluster_stale"))
            per_rank = ckpt.get("cluster_centers_per_rank")  # absent in older checkpoints: rank 0's
            if per_rank is not None and len(per_rank) == self.env.world_size:
                self.cluster.bank.cluster_centers.copy_(per_rank[self.env.rank])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = step
        self.schedule.apply(self.optimizer, step)
        self.best = ckpt.get("best")
        self.metrics = ckpt.get("metrics")
        self.last_eval_step = int(ckpt.get("last_eval_step", -1))
        self.eval_pending = bool(ckpt.get("eval_pending", False))
        if same_world:
            ckpt_io.restore_rng_state(rng[self.env.rank], self.env.device)
        else:
            self.log(f"warning: {where} holds the random states of {len(rng)} process(es) (an older or edited "
                     f"file), this run has {self.env.world_size}: random states re-seeded, the continuation is "
                     "not bit-exact")
        self.log(f"resumed from {where} at update {step} (epoch {step // self.steps_per_epoch})")

    def export(self, directory: Path) -> Path:
        """This run's best (else its last) checkpoint as a model directory, with the weights
        evaluation scored (EMA unless ``eval.use_ema`` is false or there is no EMA)."""
        source = self._best_file()
        if source is None:
            source = self.output_dir / LAST
        weights = self._evaluated_weights()
        path = export_checkpoint(source, directory, weights)
        self.log(f"exported {source.name} ({weights} weights) to the model directory {path}")
        return path

    def _evaluated_weights(self) -> str:
        """Which weights evaluation scores ("ema" or "model"), and so the ones the best is chosen on."""
        return "ema" if self.ema is not None and self.cfg.eval.use_ema else "model"

    def _best_file(self) -> Optional[Path]:
        """``BEST_checkpoint.pth`` when it holds this run's best (else None, said in the log).

        The file in output_dir need not be: this run may have resumed from another folder's
        checkpoint, started its best over, or resumed from a checkpoint older than the file (the
        interrupted run wrote it later). Only the file whose update and best record are this
        run's is exported.
        """
        source = self.output_dir / BEST
        if self.best is None:
            self.log(f"no evaluation of this run chose a best checkpoint: exporting {LAST}")
            return None
        if not source.exists():
            self.log(f"{source} not found (best: update {self.best['step']}): exporting {LAST}")
            return None
        chosen_on, exported = self.best.get("weights", self._evaluated_weights()), self._evaluated_weights()
        if chosen_on != exported:
            # (a resume with eval.use_ema changed that evaluated nothing kept the best of the others)
            self.log(f"the best (update {self.best['step']}) was chosen on the {chosen_on} weights, this run exports "
                     f"the {exported} weights (eval.use_ema): exporting {LAST}")
            return None
        step, record = self._best_file_record()
        if (step, record) != (self.best["step"], self.best):
            self.log(f"{source} holds update {step}, not this run's best (update "
                     f"{self.best['step']}, {self.best['metric']} = {self.best['value']:.4f}): exporting {LAST}")
            return None
        return source

    def _best_file_record(self) -> tuple[Optional[int], Optional[dict]]:
        """(update, best record) ``BEST_checkpoint.pth`` holds; (None, None) without the file."""
        source = self.output_dir / BEST
        if not source.exists():
            return None, None
        ckpt_io.check_torch_file(source)   # a torch.save archive, every CRC-32 intact
        try:
            recorded = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001  (what torch raises for a file it cannot read varies)
            raise ckpt_io.CheckpointError(f"{source}: not a readable checkpoint ({type(exc).__name__}: {exc}); move "
                                          "it away and this run writes its best again") from None
        if not isinstance(recorded, dict):
            raise ckpt_io.CheckpointError(f"{source}: expected a dict checkpoint, got {type(recorded).__name__}; "
                                          "move it away and this run writes its best again")
        return recorded.get("step"), recorded.get("best")

    def _write_interrupted_best(self) -> None:
        """Write ``BEST_checkpoint.pth`` again when the run resumed from the very update its best
        is and the file lacks it: the earlier run was killed after that update's
        ``checkpoint.pth`` and before its ``BEST_checkpoint.pth`` (written in that order), so the
        file held an older update, which the next stage, or an export, took as the best. A file
        holding a later update (a resume from an older ``checkpoint_epochNNNN.pth``) is left as it is."""
        best = self.best
        if best is None or best["step"] != self.step:
            return
        why = None
        if self.env.is_main:
            step, record = self._best_file_record()
            if step is None:
                why = "is missing"
            elif step < self.step:
                why = f"holds the older update {step}"
            elif step == self.step and record != best:
                why = f"holds another run's update {step}"
            elif step > self.step:
                self.log(f"{self.output_dir / BEST} holds update {step}, later than update {self.step} this run "
                         "resumed from: left as it is")
        why = broadcast_object(why, self.env)
        if why:  # every process takes part in the save
            self.log(f"update {self.step}, which this run resumed from, is its best ({best['metric']} = "
                     f"{best['value']:.4f}) and {self.output_dir / BEST} {why}: written from it")
            self._save(BEST)

    # ---------------------------------------------------------------------------- logging

    def _progress(self, epoch: int):
        if not (self.cfg.runtime.progress and self.env.is_main):
            return None
        from tqdm import tqdm

        start = self.step % self.steps_per_epoch
        total = min(self.steps_per_epoch, self.max_steps - epoch * self.steps_per_epoch)
        return tqdm(total=total, initial=start, desc=f"epoch {epoch}", unit="it", dynamic_ncols=True,
                    file=sys.stderr, leave=False)

    def _log_scalars(self, losses: dict[str, Tensor], total: float, rate: float) -> dict[str, float]:
        names = sorted(losses)
        values = torch.stack([losses[k].detach().float().reshape(()) for k in names] +
                             [torch.tensor(total, device=losses[names[0]].device)])
        if self.env.distributed:
            torch_dist.all_reduce(values)
            values /= self.env.world_size
        numbers = dict(zip(names + ["total"], values.tolist()))
        if self.writer is not None:
            self.writer.add_scalar("train/loss", numbers["total"], self.step)
            for name in names:
                self.writer.add_scalar(f"train_terms/{name}", numbers[name], self.step)
            for group in self.optimizer.param_groups:
                self.writer.add_scalar(f"lr/{group['name']}", group["lr"], self.step)
            self.writer.add_scalar("train/samples_per_s", rate, self.step)
        return numbers


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    if cfg.runtime.amp == "none":
        return None
    if device.type != "cuda" and not cfg.runtime.amp_on_cpu:
        return None
    if device.type != "cuda" and cfg.runtime.amp == "fp16":
        raise ConfigError("runtime.amp: fp16 autocast is for GPUs; use bf16 with runtime.amp_on_cpu")
    return torch.bfloat16 if cfg.runtime.amp == "bf16" else torch.float16


def _zero_through(outputs, params: list) -> Tensor:
    """``0 * sum(outputs)`` over the output tensors that carry a gradient (else over ``params``)."""
    found = [t.float().sum() * 0.0 for _, t in _float_tensors(outputs) if t.requires_grad]
    if not found:
        found = [p.sum() * 0.0 for p in params]
    return torch.stack(found).sum()


def _non_finite_tensors(outputs) -> list[str]:
    """Names (``[1].aux_outputs[0].pred_boxes``) of the output tensors holding NaN or inf."""
    named = _float_tensors(outputs)
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).tolist()  # one device sync
    return [name for (name, _), ok in zip(named, finite) if not ok]


def _float_tensors(obj, name: str = "") -> list[tuple[str, Tensor]]:
    """The floating tensors of model outputs (nested dicts / lists / tuples; not the tokenizer's)."""
    if isinstance(obj, Tensor):
        return [(name or "output", obj)] if obj.is_floating_point() else []
    found = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key != "tokenized":
                found += _float_tensors(value, f"{name}.{key}" if name else str(key))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            found += _float_tensors(value, f"{name}[{index}]")
    return found


def _numbers(losses: dict[str, Tensor]) -> dict[str, float]:
    return {key: float(value.detach()) for key, value in losses.items()}


def _to_device(target: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in target.items()}
