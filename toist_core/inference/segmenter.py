"""The segmenter: a TOIST model, its task state and the per-frame pipeline (see the package doc)."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import uuid
import warnings
import weakref
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

from ..checkpoint import CheckpointError
from ..config import InferenceConfig, InputSize, ModelConfig, preset
from ..model.eval_mode import eval_mode
from ..structures import ImageBatch
from ..tasks import COCO_TASKS, TaskVocabulary, resolve_task
from ..tokens import NO_OBJECT_INDEX, span_token_indices
from .device import check_on_device, is_channels_last, prepared, resolve_device
from .finite import check_outputs, checked_masks
from .images import check_image, preprocess
from .postprocess import (binary_low_res, drop_duplicates, image_memory, mask_or_box_iou, masks_at_original, select,
                          to_pixels)
from .processing import Processing
from .results import Prediction, TaskState, UntrainedTaskWarning
from .settings import AppliedSettings, check_call_limits
from .warn_once import WarnOnce

DEFAULT_PRONOUN = "something"
_OWN = object()  # "the segmenter's current setting" for the optional arguments of the network steps


class _ReencodeOnLoad:
    """``load_state_dict`` post-hook of a segmenter's model and bank (see
    ``TaskSegmenter._follow_weight_loads``). Holds the segmenter weakly, and pickles as a no-op
    so that ``torch.save(seg.model)`` still works (a weak reference cannot be pickled)."""

    def __init__(self, segmenter: "TaskSegmenter"):
        self._segmenter = weakref.ref(segmenter)

    def __call__(self, module, _incompatible_keys) -> None:
        segmenter = self._segmenter() if self._segmenter is not None else None
        if segmenter is not None:
            segmenter._weights_loaded(module)

    def __getstate__(self) -> dict:
        return {"_segmenter": None}


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()


class TaskSegmenter:
    """Finds the objects an image offers for a task (and their masks) with a TOIST model.

    Build it with :meth:`from_pretrained` (official ``.pth`` or model directory) or
    :meth:`from_config` (random weights: tests, demos). ``model`` is the underlying
    ``torch.nn.Module`` (:class:`~toist_core.model.TOIST` or :class:`~toist_core.model.TOISTSegm`).
    """

    def __init__(self, model: torch.nn.Module, *, device: Union[str, torch.device] = "auto",
                 memory_bank: Optional[torch.nn.Module] = None, pronoun: str = DEFAULT_PRONOUN,
                 inference: Optional[InferenceConfig] = None, config: Optional[ModelConfig] = None,
                 task: Union[int, str, None] = None, input_size: Optional[InputSize] = None,
                 trained_tasks: Optional[Sequence[int]] = None, onnx_network=None,
                 vocabulary: TaskVocabulary = COCO_TASKS, captions: str = "pronoun"):
        """Wrap ``model`` as it is: the segmenter never changes a module it is given (device,
        dtype, memory layout and train/eval mode stay the caller's; a module in training mode is
        put in eval mode only for the duration of each forward pass), so a trainer can evaluate
        the very module it trains. It must already be on ``device``. Models the segmenter builds
        itself (:meth:`from_pretrained`, :meth:`from_config`) are moved, set to eval and, with
        ``inference.channels_last``, converted to channels-last once, when they are built.

        ``input_size``: the size the model was trained at, used where ``inference`` leaves the
        size to the model (default: the reference's 800 / 1333). ``trained_tasks``: the
        task ids the model was trained on (None: unknown); setting another task, or free
        text, warns once per task (:class:`UntrainedTaskWarning`, and ``TaskState.warning``).
        ``vocabulary``: what task ids and names mean (a model directory records its own; default
        the 14 COCO-Tasks tasks); the memory bank has one slot per task of it.
        ``onnx_network``: the :class:`~.onnx_backend.OnnxNetwork` that runs the network when
        ``inference.backend`` is not ``"torch"`` (:meth:`from_pretrained` opens it).
        ``captions``: what the model was trained to read, ``"pronoun"`` or ``"noun"`` (a noun
        teacher; ``toist evaluate`` then gives it each image's noun caption)."""
        self.device = resolve_device(device)
        inference = inference or InferenceConfig()
        if (inference.backend != "torch") != (onnx_network is not None):
            raise ValueError(f"backend {inference.backend!r}: the ONNX backends run a model directory's graphs; "
                             "use TaskSegmenter.from_pretrained(model_dir, inference=...)")
        self._onnx = onnx_network
        # What a config leaves to the model (None): its input size and its pronoun.
        self._own_input_size = input_size or InputSize()
        self._own_pronoun = pronoun
        check_on_device(model, self.device)
        self.model = model
        self.config = config
        self.trained_tasks = tuple(sorted(trained_tasks)) if trained_tasks else None
        self.vocabulary = vocabulary
        if captions not in ("pronoun", "noun"):
            raise ValueError(f"captions must be 'pronoun' or 'noun', got {captions!r}")
        self.captions = captions
        self._warned = WarnOnce()  # tasks whose UntrainedTaskWarning was given
        if memory_bank is not None and getattr(memory_bank, "num_tasks", vocabulary.num_tasks) != vocabulary.num_tasks:
            raise ValueError(f"the memory bank has {memory_bank.num_tasks} task slots but {vocabulary.describe()} "
                             f"has {vocabulary.num_tasks} tasks")
        self.memory_bank = memory_bank.to(self.device) if memory_bank is not None else None
        self._bank_lock = threading.Lock()
        # Task state swaps: set_task, a re-encode after a weight load or a new config; one of them
        # must not write back a state read before another's swap (the newer task would be lost).
        self._state_lock = threading.Lock()
        self._state: Optional[TaskState] = None
        # Stamped on every state this segmenter encodes: a state of another segmenter, or one
        # encoded before a weight load, holds other weights' text features (refused, not mixed).
        self._identity = uuid.uuid4().hex   # a value, not an object: a copied or pickled state keeps it
        self._weights_generation = 0
        # Why the ONNX graphs no longer match the model (its weights were loaded anew), or None.
        self._stale_graphs: Optional[str] = None
        self.inference = inference  # the setter derives sizes, pronoun, autocast, normalisation, processing
        self._follow_weight_loads()
        if task is not None:
            self.set_task(task)

    def _follow_weight_loads(self) -> None:
        """The current task's text features and CCR centres are computed from the weights: a
        ``load_state_dict`` of the whole model or of the memory bank re-encodes the task, so no
        frame mixes new image weights with the old weights' text. (On the torch backend a load
        into a submodule, or weights changed in place, need ``set_task`` again; on an ONNX backend
        every submodule is watched, since any load there leaves the graphs behind.) The hooks hold
        the segmenter weakly and leave with it, so a trainer's module does not collect them
        evaluation after evaluation."""
        hook = _ReencodeOnLoad(self)
        watched = [self.model] if self._onnx is None else list(self.model.modules())
        if self.memory_bank is not None:
            watched.append(self.memory_bank)
        handles = [module.register_load_state_dict_post_hook(hook) for module in watched]
        weakref.finalize(self, _remove_hooks, handles)

    def _weights_loaded(self, module: torch.nn.Module) -> None:
        """After a ``load_state_dict`` of the model or the bank: re-encode the current task. On an
        ONNX backend the network's weights are the exported graphs', which a load cannot change:
        the segmenter refuses to run from then on rather than mix the two sets of weights."""
        if self._onnx is not None and module is not self.memory_bank:
            loaded = ("the model's weights were" if module is self.model else
                      f"weights of a part of the model ({type(module).__name__}) were")
            self._stale_graphs = (f"{loaded} loaded anew (load_state_dict) after its ONNX graphs were "
                                  f"opened (backend {self._onnx.backend!r}); the graphs still hold the exported "
                                  "weights: save the new weights as a model directory, `toist export --onnx` it and "
                                  "open a new TaskSegmenter")
            if module is self.model:
                raise CheckpointError(self._stale_graphs)
            # A part's hook runs inside the load (the parts first, the whole model last): raising
            # here would stop a whole-model load half-way. Every later frame is refused instead.
            return
        self._weights_generation += 1
        state = self._state
        if state is not None:
            applied = self._applied
            self._replace_state(state, self._reencode(state, applied.pronoun, applied.config.ccr))

    def _replace_state(self, expected: TaskState, state: TaskState) -> None:
        """Make ``state`` current if ``expected`` still is: a task another thread set meanwhile
        is newer (and was encoded with the settings of its time)."""
        with self._state_lock:
            if self._state is expected:
                self._state = state

    def _reencode(self, state: TaskState, pronoun: str, ccr: bool) -> TaskState:
        """``state``'s task encoded again (with other weights, pronoun or ``ccr``)."""
        return self._encode(state.task_id if state.task_id is not None else state.caption, pronoun, ccr)

    @property
    def inference(self) -> InferenceConfig:
        """Pre- and post-processing settings, read on every call; assign a new config to change
        them at run time (``dataclasses.replace(seg.inference, ...)``, or a fresh
        ``InferenceConfig``: sizes and pronoun left None are the model's own). Assigning applies
        every field (normalisation, precision, sizes, protocol, thresholds; a changed pronoun or
        ``ccr`` re-encodes the current task) or, on an error, none; ``backend`` and, on an ONNX
        backend, ``precision`` are fixed when the segmenter is built."""
        return self._applied.config

    @inference.setter
    def inference(self, config: InferenceConfig) -> None:
        # The one place a config is applied: everything derived from it is computed first, then
        # swapped in, so a refused config changes nothing.
        running = "torch" if self._onnx is None else self._onnx.backend
        if config.backend != running:
            kept = (f" (to change other settings keep it: dataclasses.replace(seg.inference, ...), or "
                    f"InferenceConfig(backend={running!r}, ...))" if running != "torch" else "")
            raise ValueError(f"inference.backend: this segmenter runs {running!r}, got {config.backend!r}{kept}; the "
                             "backend is chosen when the segmenter is built: TaskSegmenter.from_pretrained(model_dir, "
                             f"inference=InferenceConfig(backend={config.backend!r}))")
        if self._onnx is not None and config.precision != "fp32":
            raise ValueError(f"inference.precision: {config.precision!r} is for the torch backend; backend "
                             f"{running!r} runs its ONNX graphs in fp32 (onnxruntime) or fp16 (tensorrt): keep 'fp32'")
        applied = AppliedSettings.of(config, self.device, self._own_input_size, self._own_pronoun)
        state = self._state
        reencoded = None
        if state is not None and (applied.pronoun != self.pronoun or applied.config.ccr != self.inference.ccr):
            reencoded = self._reencode(state, applied.pronoun, applied.config.ccr)
        # One assignment: a call running in another thread reads the old settings or the new,
        # never some of each (e.g. one config's queries with the other's mask threshold).
        self._applied = applied
        if reencoded is not None:
            self._replace_state(state, reencoded)

    @property
    def processing(self) -> Processing:
        """Resize method, padding, box clipping and duplicate removal of ``inference.protocol``;
        a benchmark may replace it to isolate one of the choices."""
        return self._applied.processing

    @processing.setter
    def processing(self, processing: Processing) -> None:
        self._applied = dataclasses.replace(self._applied, processing=processing)

    @property
    def pronoun(self) -> str:
        """The caption word cluster-centre replacement replaces (``inference.pronoun`` or the model's)."""
        return self._applied.pronoun

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, device: Union[str, torch.device] = "auto",
                        text_encoder: Optional[str] = None, config: Optional[ModelConfig] = None,
                        inference: Optional[InferenceConfig] = None,
                        task: Union[int, str, None] = None) -> "TaskSegmenter":
        """Load an official TOIST/MDETR ``.pth``, a toist training checkpoint or a model directory.

        ``text_encoder`` (hub name such as ``roberta-base``, or a local directory) supplies the
        tokenizer, and for official files the text architecture when it is a local directory
        with ``config.json``; official files default to ``roberta-base``. Model directories
        carry their own tokenizer and load without network, and their input size (the size they
        were trained at) is used unless ``inference`` sets one. ``config`` (official files only)
        is checked against the file's tensor shapes.
        """
        from ..checkpoint import load_pretrained

        path = Path(path).expanduser()  # "~/models/x" (a ROS parameter gets no shell expansion), every backend
        asked, device = device, resolve_device(device)
        if inference is None or inference.backend == "torch":
            loaded, network = load_pretrained(path, config=config, text_encoder=text_encoder), None
        else:
            from .onnx_backend import auto_device, load_with_network

            if asked == "auto":
                device, note = auto_device(inference.backend, device)
                if note:
                    warnings.warn(note, RuntimeWarning, stacklevel=2)
            loaded, network = load_with_network(path, inference.backend, device, config, text_encoder)
        return cls(prepared(loaded.model, device, inference), device=device, memory_bank=loaded.memory_bank,
                   pronoun=loaded.pronoun, inference=inference, config=loaded.config, task=task,
                   input_size=loaded.input_size, trained_tasks=loaded.tasks, onnx_network=network,
                   vocabulary=loaded.vocabulary, captions=loaded.captions)

    @classmethod
    def from_config(cls, config: Union[str, ModelConfig] = "tiny", device: Union[str, torch.device] = "cpu",
                    text_encoder: Optional[str] = None, inference: Optional[InferenceConfig] = None,
                    memory_bank: Optional[torch.nn.Module] = None, seed: Optional[int] = None,
                    task: Union[int, str, None] = None) -> "TaskSegmenter":
        """A model with random weights from a preset name (``tiny``, ``paper``, ...) or a config.

        ``text_encoder`` overrides the config's tokenizer (name or local directory). ``seed``
        makes the random weights reproducible. Never touches the network for ``tiny``.
        """
        from ..model import build_model, load_tokenizer

        cfg = preset(config) if isinstance(config, str) else config
        tokenizer = load_tokenizer(text_encoder or cfg.text.tokenizer)
        if seed is not None:
            torch.manual_seed(seed)
        model = build_model(cfg, tokenizer=tokenizer)
        device = resolve_device(device)
        return cls(prepared(model, device, inference), device=device, memory_bank=memory_bank, inference=inference,
                   config=cfg, task=task)

    # -- properties --------------------------------------------------------------------------
    @property
    def has_masks(self) -> bool:
        return bool(getattr(self.model, "has_masks", False))

    @property
    def is_distilled(self) -> bool:
        """True when the model came with a memory bank (cluster-centre replacement at inference)."""
        return self.memory_bank is not None

    @property
    def task_state(self) -> Optional[TaskState]:
        return self._state

    # -- task --------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_task(self, task: Union[int, str]) -> TaskState:
        """Compute the task's :class:`TaskState` (text features, pronoun tokens, CCR centres)
        without making it current. ``task``: an id of the model's vocabulary (1..14 for
        COCO-Tasks), a task name of it, or free text (no CCR; none either with
        ``inference.ccr`` off)."""
        applied = self._applied  # one read: the pronoun and ccr of one config
        return self._encode(task, applied.pronoun, applied.config.ccr)

    @torch.inference_mode()
    def _encode(self, task: Union[int, str], pronoun: str, ccr: bool) -> TaskState:
        query = resolve_task(task, pronoun, self.vocabulary)
        with eval_mode(self.model):  # the text encoder's dropout off, whatever the caller's mode
            text = self.model.encode_text([query.caption])
        tokens: tuple[int, ...] = ()
        if query.pronoun_span is not None:
            tokens = tuple(span_token_indices(text.tokenized, 0, [query.pronoun_span]))
        centres = None
        if ccr and self.memory_bank is not None and query.task_id is not None and tokens:
            num_tasks = self.memory_bank.num_tasks
            if not 1 <= query.task_id <= num_tasks:
                raise ValueError(f"task {query.task_id}: the memory bank has {num_tasks} tasks")
            with self._bank_lock:
                # Warm-started k-means on the fixed bank: the same centres for every frame.
                centres = self.memory_bank.cluster(query.task_id - 1).detach().clone().float()
        return TaskState(query.caption, query.task_id, text, tokens, centres, self._warning(query.task_id),
                         origin=(self._identity, self._weights_generation))

    def _check_origin(self, state: TaskState, name: str) -> None:
        """``state`` was encoded by this segmenter with its current weights (or built by hand)."""
        if state.origin is None:
            return
        identity, generation = state.origin
        if identity != self._identity:
            raise ValueError(f"{name}: encoded by another TaskSegmenter (its text features are that model's): "
                             "encode the task with this one, seg.encode_task(task)")
        if generation != self._weights_generation:
            raise ValueError(f"{name}: encoded before this segmenter's weights were loaded anew (load_state_dict): "
                             "its text features are the old weights'; encode the task again, seg.encode_task(task)")

    def _warning(self, task_id: Optional[int]) -> Optional[str]:
        """Why the task's results mean little, or None: a noun teacher given a task's pronoun
        caption, a task the model was not trained on."""
        if self.captions == "noun":
            if task_id is None:   # free text naming the objects: what a noun teacher reads (its tasks are the
                return None       # phrases before the noun, not task ids it was trained to answer)
            example = self.vocabulary.phrase(task_id) + "chair"  # phrase() ends with the joining space
            return (f"this model is a noun teacher (or MDETR's), trained on captions that name the objects "
                    f"({example!r}), not on a task's pronoun caption: give it free text naming the objects")
        if self.trained_tasks is None or task_id in self.trained_tasks:
            return None
        what = f"task {task_id}" if task_id is not None else "free-text task"
        return (f"{what} is not one this model was trained on (tasks {', '.join(map(str, self.trained_tasks))}): "
                "its instances mean little")

    def set_task(self, task: Union[int, str, TaskState]) -> TaskState:
        """Make ``task`` current (text encoded here, once). Thread-safe: one attribute swap."""
        if isinstance(task, TaskState):
            self._check_origin(task, "set_task")
        state = task if isinstance(task, TaskState) else self.encode_task(task)
        with self._state_lock:
            self._state = state
        key = state.task_id if state.task_id is not None else state.caption
        if state.warning is not None and self._warned.first(key):
            warnings.warn(f"{state.caption!r}: {state.warning}", UntrainedTaskWarning, stacklevel=2)
        return state

    # -- prediction --------------------------------------------------------------------------
    def predict(self, image: np.ndarray, task_state: Optional[TaskState] = None,
                score_threshold: Optional[float] = None, max_instances: Optional[int] = None,
                with_masks: bool = True) -> Prediction:
        """Instances of the current task (or ``task_state``) in an ``H x W x 3`` uint8 RGB image.

        ``with_masks=False`` skips the mask head (``masks`` is None): boxes and scores only.
        """
        return self.predict_batch([image], task_state, score_threshold, max_instances, with_masks)[0]

    @torch.inference_mode()
    def predict_batch(self, images: Sequence[np.ndarray], task_state: Optional[TaskState] = None,
                      score_threshold: Optional[float] = None,
                      max_instances: Optional[int] = None, with_masks: bool = True) -> list[Prediction]:
        """:meth:`predict` for several images at once (padded into one batch)."""
        if self._stale_graphs is not None:
            raise CheckpointError(self._stale_graphs)
        state = task_state if task_state is not None else self._state
        if state is None:
            raise RuntimeError("no task set: call set_task(task) first or pass task_state")
        if not isinstance(state, TaskState):
            raise TypeError(f"task_state must be a TaskState (from seg.encode_task(task)), got "
                            f"{type(state).__name__}; for a task id or name use seg.set_task(task)")
        if task_state is not None:  # the current state follows weight loads by itself
            self._check_origin(state, "task_state")
        check_call_limits(score_threshold, max_instances)
        applied = self._applied  # this call's settings, whatever another thread assigns meanwhile
        threshold = applied.config.score_threshold if score_threshold is None else float(score_threshold)
        limit = applied.config.max_instances if max_instances is None else int(max_instances)
        if getattr(images, "ndim", None) == 3:   # one image: its rows were taken for images
            raise TypeError(f"predict_batch takes a sequence of images (a list, or an [N, H, W, 3] array), got one "
                            f"array of shape {tuple(images.shape)}: use predict(image) or predict_batch([image])")
        images = list(images)   # a generator too (it has no len())
        if len(images) == 0:
            return []
        originals = [tuple(check_image(img, f"images[{i}]").shape[:2]) for i, img in enumerate(images)]
        # The mask head runs after the decoder: one eval-mode span for both.
        with eval_mode(self.model):
            batch, resized = self._preprocess(images, applied)
            # Only the network differs between backends: selection and post-processing below are shared.
            if self._onnx is None:
                pred_logits, pred_boxes, mask_logits = self._detect(batch, state, applied.autocast)
            else:
                pred_logits, pred_boxes, mask_logits = self._onnx.detect(batch, state)
            scores_all = 1.0 - pred_logits.float().softmax(-1)[..., NO_OBJECT_INDEX]
            boxes_all = pred_boxes.float()
            run, reduced = self._network_run(applied.config)
            check_outputs(scores_all, boxes_all, run, reduced)
            mask_logits = checked_masks(mask_logits, run, reduced)
            padded = batch.tensors.shape[-2:]
            masked = with_masks and self.has_masks
            predictions = []
            for b, (orig, size) in enumerate(zip(originals, resized)):
                if applied.processing.duplicate_iou is None:
                    keep = select(scores_all[b], threshold, limit)
                    logits = mask_logits(b, keep)[0] if masked and keep.numel() else None
                else:
                    keep, logits = self._distinct(scores_all[b], boxes_all[b], threshold, limit,
                                                  mask_logits if masked else None, b, size, padded, orig, applied)
                boxes = to_pixels(boxes_all[b, keep], orig, clip=applied.processing.clip_boxes)
                masks = None
                if masked:
                    masks = (np.zeros((0,) + tuple(orig), dtype=bool) if logits is None else
                             masks_at_original(logits[None], size, padded, orig, applied.config.mask_threshold))
                predictions.append(Prediction(
                    boxes=boxes.cpu().numpy().astype(np.float32),
                    scores=scores_all[b, keep].cpu().numpy().astype(np.float32),
                    masks=masks, queries=keep.cpu().numpy().astype(np.int64),
                    caption=state.caption, task_id=state.task_id, image_size=orig))
            return predictions

    def _network_run(self, config: Optional[InferenceConfig] = None) -> tuple[str, bool]:
        """What ran the network (for errors), and whether it computed in fp16 / bf16 (``config``:
        the call's settings; default: the segmenter's)."""
        config = config or self.inference
        backend, precision = config.backend, config.precision
        if backend != "torch":  # the graphs' own precision
            precision = "fp16" if backend == "tensorrt" else "fp32"
        return f"backend {backend!r}, precision {precision!r}, device {self.device}", precision != "fp32"

    # -- steps -------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[ImageBatch, list[tuple[int, int]]]:
        """Resize (reference evaluation size rule), normalise on the model's device and pad
        (``inference.protocol``: toist's float resize and padding to a multiple of
        ``pad_multiple``, or the reference's PIL resize and padding to the largest image);
        returns the padded batch ``[B, 3, H, W]`` and each image's resized ``(h, w)``."""
        images = list(images)   # a generator, spent by the checks, reached the batching empty
        for i, img in enumerate(images):  # as predict checks them (a uint16 image was divided by 255)
            check_image(img, f"images[{i}]")
        return self._preprocess(images, self._applied)

    def _preprocess(self, images: Sequence[np.ndarray],
                    applied: AppliedSettings) -> tuple[ImageBatch, list[tuple[int, int]]]:
        config = applied.config
        return preprocess(images, config, applied.mean, applied.std,
                          config.channels_last and is_channels_last(self.model), applied.processing)

    def _detect(self, batch: ImageBatch, state: TaskState, autocast=_OWN,
                ) -> tuple[Tensor, Tensor, Callable[[int, Tensor], Tensor]]:
        """The torch network: ``pred_logits [B, Q, 256]``, ``pred_boxes [B, Q, 4]`` and a function
        ``(b, keep [n]) -> mask logits [1, n, H/4, W/4]`` of image ``b``'s kept queries
        (``autocast``: the dtype to compute in, None: fp32; default: the segmenter's precision)."""
        with self._autocast_context(autocast):
            memory = self.model.encode(batch, text=state.text)
            if state.uses_ccr:
                memory = self._replace_pronoun_rows(memory, state)
            detector = self.model.detector
            hs = detector.decoder_states(memory)
            out = detector.predict_heads(hs, memory, aux=False)

        def mask_logits(b: int, keep: Tensor) -> Tensor:
            with self._autocast_context(autocast):
                return self.model.predict_masks(image_memory(memory, b), hs[-1][b:b + 1, keep])

        return out["pred_logits"], out["pred_boxes"], mask_logits

    def _autocast_context(self, dtype=_OWN):
        """Autocast to ``dtype`` (None: none; default: the segmenter's precision)."""
        if dtype is _OWN:
            dtype = self._applied.autocast
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _replace_pronoun_rows(self, memory: dict, state: TaskState) -> dict:
        """CCR: the pronoun rows of the decoder's memory <- the task centre nearest to the
        image's pronoun feature (mean of its post-encoder rows)."""
        from ..distill.ccr import replace_token_rows
        from ..distill.kmeans import assign_to_centres

        text_memory = memory["text_memory"]
        rows = list(state.pronoun_tokens)
        pronoun = text_memory[rows].float().mean(0)                      # [B, D]
        centres = state.centres.to(pronoun.device)
        values = centres[assign_to_centres(pronoun, centres)]            # [B, D]
        memory = dict(memory)
        memory["img_memory_mod"] = replace_token_rows(memory["img_memory"], text_memory.shape[0],
                                                      [rows] * text_memory.shape[1], values)
        return memory

    def _distinct(self, scores: Tensor, boxes: Tensor, threshold: float, limit: int,
                  mask_logits: Optional[Callable[[int, Tensor], Tensor]], b: int, size: tuple[int, int],
                  padded: Sequence[int], orig: tuple[int, int],
                  applied: AppliedSettings) -> tuple[Tensor, Optional[Tensor]]:
        """Image ``b``'s queries above ``threshold``, best first, without duplicates of one object
        (``inference.duplicate_iou``), at most ``limit``; and their stride-4 mask logits
        ``[k, h, w]`` (None without masks or instances). Masks are compared at stride 4 (the mask
        head's resolution); without masks the boxes in original-image pixels are."""
        candidates = select(scores, threshold, len(scores))
        iou = applied.processing.duplicate_iou
        if mask_logits is None:
            keep, _ = drop_duplicates(candidates, lambda q: to_pixels(boxes[q], orig), box_iou, iou, limit)
            return keep, None
        computed: list[Tensor] = []

        def regions(queries: Tensor) -> Tensor:
            computed.append(mask_logits(b, queries)[0])                     # [n, h, w]
            masks = binary_low_res(computed[-1], size, padded, applied.config.mask_threshold)
            return torch.cat([masks.float(), to_pixels(boxes[queries], orig).float()], dim=1)   # [n, P + 4]

        keep, positions = drop_duplicates(candidates, regions, mask_or_box_iou, iou, limit)
        if not positions:
            return keep, None
        return keep, torch.cat(computed)[positions]
