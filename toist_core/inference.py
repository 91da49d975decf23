"""Task-oriented instance segmentation of single images: :class:`TaskSegmenter`.

    seg = TaskSegmenter.from_pretrained("toist_distilled.pth", device="auto", text_encoder="roberta-base")
    seg.set_task(2)                       # "sit comfortably on something": text encoded once here
    pred = seg.predict(rgb_uint8_image)   # boxes / scores / masks in original-image pixels

Per frame: resize (short side 800, long side <= 1333) + ImageNet normalisation -> backbone
-> transformer encoder over the image tokens and the task's cached text tokens -> (distilled
models) the pronoun rows of the decoder's memory replaced by the task's nearest cluster
centre -> decoder -> score = 1 - p(no object) -> threshold / top-k -> mask head for the kept
queries only -> boxes and masks at the original resolution.

What depends only on the task is computed in :meth:`TaskSegmenter.encode_task` (called by
:meth:`~TaskSegmenter.set_task`): the RoBERTa + resizer features of the caption, the pronoun's
token positions and, for distilled models, the k-means centres of the task's memory bank
(the bank is fixed at inference, so warm-started k-means reaches the same centres on every
frame). The result is an immutable :class:`TaskState`; ``set_task`` swaps it in with one
attribute assignment, so a thread calling ``predict`` sees either the old or the new task.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import InferenceConfig, InputSize, ModelConfig, preset
from .model.eval_mode import eval_mode
from .structures import ImageBatch
from .tasks import resolve_task
from .tokens import NO_OBJECT_INDEX, span_token_indices

DEFAULT_PRONOUN = "something"


@dataclass(frozen=True)
class TaskState:
    """Everything about the current task that does not depend on the image (immutable).

    caption:        the caption the model reads (e.g. "sit comfortably on something").
    task_id:        COCO-Tasks id 1..14, or None for free text.
    text:           cached text features (:class:`toist_core.model.text.TextFeatures`, batch 1).
    pronoun_tokens: token positions of the pronoun in the caption (CCR rows).
    centres:        ``[K, D]`` k-means centres of the task's memory bank (distilled models and
                    COCO-Tasks tasks only), else None: no cluster-centre replacement.
    warning:        why this task's results are not to be trusted (the model was not trained
                    on it), else None.
    """

    caption: str
    task_id: Optional[int]
    text: object
    pronoun_tokens: tuple[int, ...]
    centres: Optional[Tensor] = None
    warning: Optional[str] = None

    @property
    def uses_ccr(self) -> bool:
        return self.centres is not None and len(self.pronoun_tokens) > 0


@dataclass
class Prediction:
    """Instances found in one image, sorted by decreasing score.

    boxes:   ``[N, 4]`` float32, (x1, y1, x2, y2) in original-image pixels, clipped to the image.
    scores:  ``[N]`` float32, ``1 - p(no object)``.
    masks:   ``[N, H, W]`` bool at the original resolution, or None for detection-only models.
    queries: ``[N]`` int64, the decoder query each instance came from.
    caption / task_id: the task the image was processed for.
    image_size: ``(H, W)`` of the input image.
    """

    boxes: np.ndarray
    scores: np.ndarray
    masks: Optional[np.ndarray]
    queries: np.ndarray
    caption: str
    task_id: Optional[int]
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.scores.shape[0])


class UntrainedTaskWarning(UserWarning):
    """The task set is not one the model was trained on: its instances mean little."""


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return dev


def _autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device; use bf16 on CPU")
        return torch.float16
    return torch.bfloat16


def check_image(image: np.ndarray, where: str = "image") -> np.ndarray:
    """An ``H x W x 3`` uint8 RGB array, or a ValueError saying what is wrong."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{where}: expected a numpy array (H x W x 3 uint8 RGB), got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}: expected shape H x W x 3 (RGB), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{where}: expected dtype uint8, got {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{where}: empty image {image.shape}")
    return image


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
                 trained_tasks: Optional[Sequence[int]] = None):
        """Wrap ``model`` as it is: the segmenter never changes a module it is given (device,
        dtype, memory layout and train/eval mode stay the caller's; a module in training mode is
        put in eval mode only for the duration of each forward pass), so a trainer can evaluate
        the very module it trains. It must already be on ``device``. Models the segmenter builds
        itself (:meth:`from_pretrained`, :meth:`from_config`) are moved, set to eval and, with
        ``inference.channels_last``, converted to channels-last once, when they are built.

        ``input_size``: the size the model was trained at, used where ``inference`` leaves the
        size to the model (default: the reference's 800 / 1333). ``trained_tasks``: the
        COCO-Tasks ids the model was trained on (None: unknown); setting another task, or free
        text, warns once per task (:class:`UntrainedTaskWarning`, and ``TaskState.warning``)."""
        self.device = resolve_device(device)
        self.inference = (inference or InferenceConfig()).with_input_size(input_size or InputSize())
        self.pronoun = self.inference.pronoun or pronoun
        self._autocast = _autocast_dtype(self.inference.precision, self.device)
        _check_on_device(model, self.device)
        self.model = model
        self.config = config
        self.trained_tasks = tuple(sorted(trained_tasks)) if trained_tasks else None
        self._warned: set = set()
        self.memory_bank = memory_bank.to(self.device) if memory_bank is not None else None
        self._mean = torch.tensor(self.inference.mean, device=self.device).view(3, 1, 1)
        self._std = torch.tensor(self.inference.std, device=self.device).view(3, 1, 1)
        self._bank_lock = threading.Lock()
        self._state: Optional[TaskState] = None
        if task is not None:
            self.set_task(task)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, device: Union[str, torch.device] = "auto",
                        text_encoder: Optional[str] = None, config: Optional[ModelConfig] = None,
                        inference: Optional[InferenceConfig] = None,
                        task: Union[int, str, None] = None) -> "TaskSegmenter":
        """Load an official TOIST/MDETR ``.pth`` or a toist model directory.

        ``text_encoder`` (hub name such as ``roberta-base``, or a local directory) supplies the
        tokenizer, and for official files the text architecture when it is a local directory
        with ``config.json``; official files default to ``roberta-base``. Model directories
        carry their own tokenizer and load without network, and their input size (the size they
        were trained at) is used unless ``inference`` sets one. ``config`` (official files only)
        is checked against the file's tensor shapes.
        """
        from .checkpoint import load_pretrained

        loaded = load_pretrained(path, config=config, text_encoder=text_encoder)
        device = resolve_device(device)
        return cls(_prepared(loaded.model, device, inference), device=device, memory_bank=loaded.memory_bank,
                   pronoun=loaded.pronoun, inference=inference, config=loaded.config, task=task,
                   input_size=loaded.input_size, trained_tasks=loaded.tasks)

    @classmethod
    def from_config(cls, config: Union[str, ModelConfig] = "tiny", device: Union[str, torch.device] = "cpu",
                    text_encoder: Optional[str] = None, inference: Optional[InferenceConfig] = None,
                    memory_bank: Optional[torch.nn.Module] = None, seed: Optional[int] = None,
                    task: Union[int, str, None] = None) -> "TaskSegmenter":
        """A model with random weights from a preset name (``tiny``, ``paper``, ...) or a config.

        ``text_encoder`` overrides the config's tokenizer (name or local directory). ``seed``
        makes the random weights reproducible. Never touches the network for ``tiny``.
        """
        from .model import build_model, load_tokenizer

        cfg = preset(config) if isinstance(config, str) else config
        tokenizer = load_tokenizer(text_encoder or cfg.text.tokenizer)
        if seed is not None:
            torch.manual_seed(seed)
        model = build_model(cfg, tokenizer=tokenizer)
        device = resolve_device(device)
        return cls(_prepared(model, device, inference), device=device, memory_bank=memory_bank, inference=inference, config=cfg, task=task)

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
        without making it current. ``task``: id 1..14, task name, or free text (no CCR)."""
        query = resolve_task(task, self.pronoun)
        with eval_mode(self.model):  # the text encoder's dropout off, whatever the caller's mode
            text = self.model.encode_text([query.caption])
        tokens: tuple[int, ...] = ()
        if query.pronoun_span is not None:
            tokens = tuple(span_token_indices(text.tokenized, 0, [query.pronoun_span]))
        centres = None
        if self.memory_bank is not None and query.task_id is not None and tokens:
            num_tasks = self.memory_bank.num_tasks
            if not 1 <= query.task_id <= num_tasks:
                raise ValueError(f"task {query.task_id}: the memory bank has {num_tasks} tasks")
            with self._bank_lock:
                # Warm-started k-means on the fixed bank: the same centres for every frame.
                centres = self.memory_bank.cluster(query.task_id - 1).detach().clone().float()
        return TaskState(query.caption, query.task_id, text, tokens, centres, self._untrained(query.task_id))

    def _untrained(self, task_id: Optional[int]) -> Optional[str]:
        if self.trained_tasks is None or task_id in self.trained_tasks:
            return None
        what = f"task {task_id}" if task_id is not None else "free-text task"
        return (f"{what} is not one this model was trained on (tasks {', '.join(map(str, self.trained_tasks))}): "
                "its instances mean little")

    def set_task(self, task: Union[int, str, TaskState]) -> TaskState:
        """Make ``task`` current (text encoded here, once). Thread-safe: one attribute swap."""
        state = task if isinstance(task, TaskState) else self.encode_task(task)
        self._state = state
        key = state.task_id if state.task_id is not None else state.caption
        if state.warning is not None and key not in self._warned:
            self._warned.add(key)
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
        state = task_state if task_state is not None else self._state
        if state is None:
            raise RuntimeError("no task set: call set_task(task) first or pass task_state")
        threshold = self.inference.score_threshold if score_threshold is None else score_threshold
        limit = self.inference.max_instances if max_instances is None else max_instances
        if len(images) == 0:
            return []
        originals = [tuple(check_image(img, f"images[{i}]").shape[:2]) for i, img in enumerate(images)]
        # The mask head runs after the decoder: one eval-mode span for both.
        with eval_mode(self.model):
            batch, resized = self.preprocess(images)
            with self._autocast_context():
                memory = self.model.encode(batch, text=state.text)
                if state.uses_ccr:
                    memory = self._replace_pronoun_rows(memory, state)
                detector = self.model.detector
                hs = detector.decoder_states(memory)
                out = detector.predict_heads(hs, memory, aux=False)
            scores_all = 1.0 - out["pred_logits"].float().softmax(-1)[..., NO_OBJECT_INDEX]
            boxes_all = out["pred_boxes"].float()
            predictions = []
            for b, (orig, size) in enumerate(zip(originals, resized)):
                keep = _select(scores_all[b], threshold, limit)
                boxes = _to_pixels(boxes_all[b, keep], orig)
                masks = None
                if with_masks and self.has_masks:
                    masks = self._masks(memory, hs[-1], b, keep, size, batch.tensors.shape[-2:], orig)
                predictions.append(Prediction(
                    boxes=boxes.cpu().numpy().astype(np.float32),
                    scores=scores_all[b, keep].cpu().numpy().astype(np.float32),
                    masks=masks, queries=keep.cpu().numpy().astype(np.int64),
                    caption=state.caption, task_id=state.task_id, image_size=orig))
            return predictions

    # -- steps -------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[ImageBatch, list[tuple[int, int]]]:
        """Resize (reference evaluation rule), normalise on the model's device and pad to a
        multiple of ``pad_multiple``; returns the padded batch and each image's resized ``(h, w)``."""
        from .data.transforms import resized_hw

        cfg = self.inference
        tensors, sizes = [], []
        for image in images:
            height, width = image.shape[:2]
            size = resized_hw(height, width, cfg.short_side, cfg.max_size)
            x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1).float().div_(255.0)
            if size != (height, width):
                x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
            tensors.append((x - self._mean) / self._std)
            sizes.append(size)
        batch = ImageBatch.from_images(tensors, size_divisibility=cfg.pad_multiple)
        if self.inference.channels_last and _is_channels_last(self.model):
            batch = ImageBatch(batch.tensors.contiguous(memory_format=torch.channels_last), batch.mask)
        return batch, sizes

    def _autocast_context(self):
        if self._autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._autocast)

    def _replace_pronoun_rows(self, memory: dict, state: TaskState) -> dict:
        """CCR: the pronoun rows of the decoder's memory <- the task centre nearest to the
        image's pronoun feature (mean of its post-encoder rows)."""
        from .distill.ccr import replace_token_rows
        from .distill.kmeans import assign_to_centres

        text_memory = memory["text_memory"]
        rows = list(state.pronoun_tokens)
        pronoun = text_memory[rows].float().mean(0)                      # [B, D]
        centres = state.centres.to(pronoun.device)
        values = centres[assign_to_centres(pronoun, centres)]            # [B, D]
        memory = dict(memory)
        memory["img_memory_mod"] = replace_token_rows(memory["img_memory"], text_memory.shape[0],
                                                      [rows] * text_memory.shape[1], values)
        return memory

    def _masks(self, memory: dict, last_states: Tensor, b: int, keep: Tensor, size: tuple[int, int],
               padded: Sequence[int], orig: tuple[int, int]) -> np.ndarray:
        """Masks of the kept queries of image ``b`` at the original resolution.

        As the reference's ``PostProcessSegm``: stride-4 logits -> bilinear to the padded input
        size -> crop to the image's resized size -> bilinear to the original size -> sigmoid > t.
        """
        if keep.numel() == 0:
            return np.zeros((0,) + tuple(orig), dtype=bool)
        with self._autocast_context():
            logits = self.model.predict_masks(_image_memory(memory, b), last_states[b:b + 1, keep])
        logits = F.interpolate(logits.float(), size=tuple(padded), mode="bilinear", align_corners=False)
        logits = logits[:, :, :size[0], :size[1]]
        logits = F.interpolate(logits, size=orig, mode="bilinear", align_corners=False)
        return (logits[0].sigmoid() > self.inference.mask_threshold).cpu().numpy()


def _prepared(model: torch.nn.Module, device: torch.device, inference: Optional[InferenceConfig]) -> torch.nn.Module:
    """A model the segmenter built itself, made ready for inference once: on ``device``, in
    eval mode and (``inference.channels_last``, the default) with channels-last conv weights."""
    model = model.to(device).eval()
    if (inference or InferenceConfig()).channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _check_on_device(model: torch.nn.Module, device: torch.device) -> None:
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.device.type != device.type or (device.index is not None and tensor.device.index != device.index):
            raise ValueError(f"model: {name} is on {tensor.device}, the segmenter's device is {device}; "
                             "TaskSegmenter never moves a module it is given: move it first (model.to(device))")
        return  # one tensor tells: modules are moved as a whole


def _is_channels_last(model: torch.nn.Module) -> bool:
    """Whether the model's first 4-D weight is stored channels-last (inputs then follow suit)."""
    for param in model.parameters():
        if param.dim() == 4:
            return param.is_contiguous(memory_format=torch.channels_last)
    return False


def _select(scores: Tensor, threshold: float, limit: int) -> Tensor:
    """Indices of the queries scoring at least ``threshold``, best first, at most ``limit``."""
    order = scores.argsort(descending=True, stable=True)
    order = order[scores[order] >= threshold]
    return order[:limit]


def _to_pixels(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Normalised ``(cx, cy, w, h)`` -> ``(x1, y1, x2, y2)`` pixels of an ``(H, W)`` image, clipped."""
    height, width = size
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
    xyxy = xyxy * torch.tensor([width, height, width, height], dtype=xyxy.dtype, device=xyxy.device)
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
    return xyxy


def _image_memory(memory: dict, b: int) -> dict:
    """The part of a batch's memory the mask head reads, for image ``b`` alone."""
    return {
        "src_proj": memory["src_proj"][b:b + 1],
        "features": [f[b:b + 1] for f in memory["features"]],
        "img_memory": memory["img_memory"][:, b:b + 1],
        "text_memory": memory["text_memory"][:, b:b + 1],
        "mask": memory["mask"][b:b + 1],
    }


__all__ = ["Prediction", "TaskSegmenter", "TaskState", "UntrainedTaskWarning", "check_image", "resolve_device"]
