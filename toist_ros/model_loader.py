"""Start-up of the model for the node: device choice, checkpoint loading, warm-up.

Every failure becomes a ``StartupError`` with an exit code and one clear sentence saying
what was asked, what was found, and what to change; the node prints it and exits.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import toist_core  # light: imports neither torch nor ROS
from typing import Any, Callable, Optional

EXIT_PARAMETERS = 2   # a parameter value is invalid
EXIT_MODEL = 3        # checkpoint missing, unreadable or not a TOIST model
EXIT_DEVICE = 4       # the requested device cannot be used

# The embedded default: the model directory `make default-model` trains on synthetic COCO-Tasks.
DEFAULT_MODEL_DIR = Path(toist_core.__file__).resolve().parent / "assets" / "default_model"
DEFAULT_MODEL_NOTE = ("embedded default model: a small TOIST (MobileNetV2, distilled student with masks) trained "
                      "on SYNTHETIC COCO-Tasks scenes only (toist_core/assets/default_model/MODEL_CARD.md); it "
                      "returns confident but meaningless instances on real images: pass checkpoint:=<TOIST .pth or "
                      "model directory> for those")
# Without the trained directory (a checkout that removed it): random weights, said loudly.
FALLBACK_MODEL = "tiny_segm"
FALLBACK_SEED = 0
FALLBACK_MODEL_NOTE = ("embedded default model MISSING ({path}): the 'tiny' TOIST configuration with RANDOM "
                       "weights instead, so its boxes, masks and scores are MEANINGLESS; run `make default-model` "
                       "or pass checkpoint:=<TOIST .pth or model directory>")


def default_model_dir() -> Optional[Path]:
    """The packaged trained default model directory, or None when it is not there."""
    return DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / "config.yaml").is_file() else None


class StartupError(RuntimeError):
    """The node cannot start; ``code`` is the process exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def resolve_device(requested: str, allow_cpu_fallback: bool, cuda_devices: int) -> tuple[str, Optional[str]]:
    """The torch device to use and a warning to log (None when there is nothing to say).

    ``auto`` takes CUDA device 0 when there is one, else the CPU. ``cuda`` / ``cuda:N`` fail
    without that device unless ``allow_cpu_fallback``.
    """
    requested = requested.strip().lower()
    match = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", requested)
    if not match:
        raise StartupError(EXIT_PARAMETERS, f"device {requested!r} is unknown: use auto, cpu, cuda or cuda:N")
    if requested == "cpu":
        return "cpu", None
    if requested == "auto":
        return ("cuda:0", None) if cuda_devices > 0 else ("cpu", None)
    index = int(match.group(1) or 0)
    if index < cuda_devices:
        return f"cuda:{index}", None
    found = "no CUDA device is visible" if cuda_devices == 0 else f"only {cuda_devices} CUDA device(s) are visible"
    if allow_cpu_fallback:
        return "cpu", f"device {requested!r} requested but {found}: running on the CPU (allow_cpu_fallback is true)"
    raise StartupError(EXIT_DEVICE, f"device {requested!r} requested but {found}; use device:=cpu or device:=auto, "
                                    "or set allow_cpu_fallback:=true")


def cuda_device_count() -> int:
    import torch

    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken driver counts as no CUDA
        return 0


def check_checkpoint_path(path: str) -> None:
    """Fail early (before torch is imported) when the checkpoint path does not exist."""
    if path and not os.path.exists(path):
        raise StartupError(EXIT_MODEL, f"checkpoint {path!r} not found (working directory {os.getcwd()!r}); "
                                       "give the path of an official TOIST .pth file or a model directory, "
                                       "or leave checkpoint empty for the embedded default")


@dataclass
class LoadedModel:
    segmenter: Any
    device: str
    description: str       # what the model is, for logs, diagnostics and the demo report
    is_random_default: bool


def load_model(settings: Any, warn: Callable[[str], None]) -> LoadedModel:
    """Build or load the TaskSegmenter the parameters ask for (no warm-up here)."""
    checkpoint = settings["checkpoint"].strip()
    check_checkpoint_path(checkpoint)
    device, note = resolve_device(settings["device"], settings["allow_cpu_fallback"], cuda_device_count())
    if note:
        warn(note)
    precision = settings["precision"]
    if device == "cpu" and precision == "fp16":
        warn("precision 'fp16' needs CUDA; the CPU runs fp32 (bf16 works on CPUs with bf16 support)")
        precision = "fp32"
    from toist_core.inference import TaskSegmenter

    inference = inference_config(settings, precision)
    text_encoder = settings["text_encoder"].strip() or None
    try:
        default_dir = None if checkpoint else default_model_dir()
        if checkpoint or default_dir is not None:
            source = checkpoint or str(default_dir)
            segmenter = TaskSegmenter.from_pretrained(source, device=device, text_encoder=text_encoder,
                                                      inference=inference)
            description = f"checkpoint {checkpoint}" if checkpoint else DEFAULT_MODEL_NOTE
        else:
            segmenter = TaskSegmenter.from_config(FALLBACK_MODEL, device=device, text_encoder=text_encoder,
                                                  inference=inference, seed=FALLBACK_SEED)
            description = FALLBACK_MODEL_NOTE.format(path=DEFAULT_MODEL_DIR)
    except StartupError:
        raise
    except Exception as exc:  # the loader's own message says which key / file / shape is wrong
        what = f"checkpoint {checkpoint!r}" if checkpoint else f"the embedded default model ({DEFAULT_MODEL_DIR})"
        raise StartupError(EXIT_MODEL, f"cannot load {what}: {type(exc).__name__}: {exc}") from exc
    return LoadedModel(segmenter, device, description, not checkpoint and default_dir is None)


def inference_config(settings: Any, precision: Optional[str] = None):
    """toist_core's InferenceConfig (input size, thresholds, precision) from the node's parameters."""
    from toist_core.config import InferenceConfig

    return InferenceConfig(short_side=int(settings["input.short_side"]) or None,  # 0: the model's own
                           max_size=int(settings["input.max_side"]) or None,
                           score_threshold=float(settings["score_threshold"]),
                           max_instances=int(settings["max_instances"]),
                           mask_threshold=float(settings["mask_threshold"]),
                           precision=precision or settings["precision"])
