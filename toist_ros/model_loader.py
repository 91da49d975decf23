"""Start-up of the model for the node: device choice, checkpoint loading, warm-up.

Every failure becomes a ``StartupError`` with an exit code and one clear sentence saying
what was asked, what was found, and what to change; the node prints it and exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import toist_core  # light: imports neither torch nor ROS (toist_core.checkpoint imports torch)

EXIT_PARAMETERS = 2   # a parameter value is invalid
EXIT_MODEL = 3        # checkpoint missing, unreadable or not a TOIST model
EXIT_DEVICE = 4       # the requested device cannot be used

# The embedded default: the model directory `make default-model` trains on synthetic COCO-Tasks.
# toist_core.checkpoint.DEFAULT_MODEL_DIR, spelt out here so that a bad checkpoint path fails
# before torch is imported (tests/test_default_model.py checks that the two agree).
DEFAULT_MODEL_DIR: Path = Path(toist_core.__file__).resolve().parent / "assets" / "default_model"
CONFIG_FILE = "config.yaml"
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
    return DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / CONFIG_FILE).is_file() else None


class StartupError(RuntimeError):
    """The node cannot start; ``code`` is the process exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.logger_name: Optional[str] = None  # the node's logger, once a node was created


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


def no_cuda_reason() -> str:
    """Why torch sees no CUDA device, in the words a user can act on (for ``device: auto``)."""
    import torch

    built_for = torch.version.cuda
    if not built_for:
        return f"this torch ({torch.__version__}) is a CPU-only build: install a CUDA build (docs/robot.md)"
    try:
        torch.cuda.init()
    except Exception as exc:  # the driver's own words: too old, not loaded, no device
        return (f"torch {torch.__version__} is built for CUDA {built_for} and cannot use this machine's driver or "
                f"GPU ({type(exc).__name__}: {str(exc).strip()[:200]}); a CUDA {built_for} build needs a recent "
                "NVIDIA driver (docs/robot.md: driver table and older CUDA builds)")
    return f"torch {torch.__version__} (CUDA {built_for}) finds no CUDA device"


def check_checkpoint_path(path: str) -> None:
    """Fail early (before torch is imported) when the checkpoint path does not exist."""
    if path and not os.path.exists(os.path.expanduser(path)):  # "~/models/x": no shell expands a parameter
        raise StartupError(EXIT_MODEL, f"checkpoint {path!r} not found (working directory {os.getcwd()!r}); "
                                       "give the path of an official TOIST .pth file or a model directory, "
                                       "or leave checkpoint empty for the embedded default")


@dataclass
class LoadedModel:
    segmenter: Any
    device: str
    description: str       # what the model is, for logs, diagnostics and the demo report
    is_random_default: bool


@contextlib.contextmanager
def _load_summary_to(info: Callable[[str], None]) -> Iterator[None]:
    """Hand toist_core's one-line "what the checkpoint held" INFO record to the node's logger
    (rclpy's logging is not Python's: the record would be dropped)."""
    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            info(record.getMessage())

    source = logging.getLogger("toist_core.checkpoint")
    handler, level = Forward(logging.INFO), source.level
    source.addHandler(handler)
    if source.getEffectiveLevel() > logging.INFO:
        source.setLevel(logging.INFO)
    try:
        yield
    finally:
        source.removeHandler(handler)
        source.setLevel(level)


# The largest task id the messages can carry (TaskStatus.task_id, TaskInstances.task_id: uint8).
MAX_TASK_ID = 255


def load_model(settings: Any, warn: Callable[[str], None], info: Optional[Callable[[str], None]] = None) -> LoadedModel:
    """Build or load the TaskSegmenter the parameters ask for (no warm-up here); ``info`` gets the
    loader's line saying what the checkpoint held (mask head, memory bank, EMA weights, tokenizer)."""
    checkpoint = settings["checkpoint"].strip()
    check_checkpoint_path(checkpoint)
    device, note = resolve_device(settings["device"], settings["allow_cpu_fallback"], cuda_device_count())
    if note:
        warn(note)
    elif device != "cpu" and settings["device"].strip().lower() == "auto" and settings["backend"] == "onnxruntime":
        import torch

        from toist_core.inference.onnx_backend import auto_device

        resolved, note = auto_device(settings["backend"], torch.device(device))
        if note:
            warn(note)
            device = str(resolved)
    elif device == "cpu" and settings["device"].strip().lower() == "auto":
        # Not silent: on a robot this usually means a driver older than the torch build needs,
        # and the paper model then takes ~15 s per frame.
        warn(f"device auto: running on the CPU: {no_cuda_reason()}; set device:=cpu to silence this")
    precision = settings["precision"]
    if settings["backend"] != "torch" and precision != "fp32":
        warn(f"precision {precision!r} applies to the torch backend; backend {settings['backend']!r} runs its "
             "ONNX graphs as they were exported (tensorrt builds fp16 engines itself)")
        precision = "fp32"
    if device == "cpu" and precision == "fp16":
        warn("precision 'fp16' needs CUDA; the CPU runs fp32 (bf16 works on CPUs with bf16 support)")
        precision = "fp32"
    from toist_core.inference import TaskSegmenter
    from toist_core.inference.device import EMULATED_BF16, SlowPrecisionWarning, cpu_computes_bf16

    if device == "cpu" and precision == "bf16" and cpu_computes_bf16() is False:
        warn(EMULATED_BF16)

    inference = inference_config(settings, precision)
    text_encoder = settings["text_encoder"].strip() or None
    what = f"checkpoint {checkpoint!r}" if checkpoint else f"the embedded default model ({DEFAULT_MODEL_DIR})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SlowPrecisionWarning)  # said above, through the node's log
            default_dir = None if checkpoint else default_model_dir()
            if checkpoint or default_dir is not None:
                source = checkpoint or str(default_dir)
                with _load_summary_to(info or (lambda _text: None)):
                    segmenter = TaskSegmenter.from_pretrained(source, device=device, text_encoder=text_encoder,
                                                              inference=inference)
                description = f"checkpoint {checkpoint}" if checkpoint else DEFAULT_MODEL_NOTE
            else:
                if inference.backend != "torch":
                    warn(f"backend {inference.backend!r} needs a model directory with ONNX graphs; the random-weight "
                         "fallback model runs on torch")
                    inference = dataclasses.replace(inference, backend="torch")
                segmenter = TaskSegmenter.from_config(FALLBACK_MODEL, device=device, text_encoder=text_encoder,
                                                      inference=inference, seed=FALLBACK_SEED)
                description = FALLBACK_MODEL_NOTE.format(path=DEFAULT_MODEL_DIR)
    except StartupError:
        raise
    except Exception as exc:  # the loader's own message says which key / file / shape is wrong
        raise StartupError(EXIT_MODEL, f"cannot load {what}: {type(exc).__name__}: {exc}") from exc
    if segmenter.vocabulary.num_tasks > MAX_TASK_ID:
        # TaskStatus / TaskInstances carry the id as uint8: task 300 would be published as 44.
        raise StartupError(EXIT_MODEL, f"{checkpoint!r}: its task vocabulary ({segmenter.vocabulary.describe()}) "
                                       f"has {segmenter.vocabulary.num_tasks} tasks; the node's messages carry task "
                                       f"ids 1..{MAX_TASK_ID} (uint8 task_id)")
    if not segmenter.has_masks:
        # Detection-only checkpoints exist among the released files (which ones is not published).
        if settings["depth.enabled"]:
            raise StartupError(EXIT_PARAMETERS, f"depth.enabled is true but {what} has no mask head (a detection "
                                                "checkpoint): the 3D positions are computed from the masks; use a "
                                                "segmentation checkpoint or depth.enabled:=false")
        if settings["output.masks"]:
            warn("the model has no mask head (a detection checkpoint): its instances carry boxes only, no masks")
    if not inference.ccr and segmenter.memory_bank is not None and info is not None:
        info("ccr false: the model's memory bank is not used (no cluster-centre replacement)")
    return LoadedModel(segmenter, device, description, not checkpoint and default_dir is None)


def inference_config(settings: Any, precision: Optional[str] = None):
    """toist_core's InferenceConfig (input size, thresholds, precision, CCR) from the node's parameters."""
    from toist_core.config import InferenceConfig
    from toist_ros.params import duplicate_iou

    return InferenceConfig(short_side=int(settings["input.short_side"]) or None,  # 0: the model's own
                           max_size=int(settings["input.max_side"]) or None,
                           score_threshold=float(settings["score_threshold"]),
                           max_instances=int(settings["max_instances"]),
                           mask_threshold=float(settings["mask_threshold"]),
                           duplicate_iou=duplicate_iou(settings),
                           precision=precision or settings["precision"], backend=settings["backend"],
                           ccr=bool(settings["ccr"]))
