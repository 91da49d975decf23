"""Where and how the model runs: the device, autocast precision, and the one-time preparation of
models the segmenter builds itself (a module it is given is used as it is)."""

from __future__ import annotations

import functools
import itertools
import warnings
from typing import Optional, Union

import torch

from ..config import InferenceConfig


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, or such a
    ``torch.device`` (checked the same way: a CUDA device on a machine without one failed only
    at the first tensor moved, after the model had loaded)."""
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return dev


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device; use bf16 on CPU")
        return torch.float16
    if device.type == "cpu" and cpu_computes_bf16() is False:
        warnings.warn(EMULATED_BF16, SlowPrecisionWarning, stacklevel=2)
    return torch.bfloat16


class SlowPrecisionWarning(UserWarning):
    """The precision asked for is emulated on this machine: slower than fp32, no faster."""


EMULATED_BF16 = ("precision bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX-BF16): emulated, slower than "
                 "fp32 (docs/performance.md); use precision fp32 on this CPU")


@functools.lru_cache(maxsize=1)
def cpu_computes_bf16() -> Optional[bool]:
    """Whether this CPU has bf16 instructions (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo);
    None where that cannot be read (not Linux): unknown, nothing is said."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), None)
    except OSError:
        return None
    if flags is None:
        return None
    names = set(flags.split(":", 1)[-1].split())
    return bool(names & {"avx512_bf16", "amx_bf16"})


def prepared(model: torch.nn.Module, device: torch.device, inference: Optional[InferenceConfig]) -> torch.nn.Module:
    """A model the segmenter built itself, made ready for inference once: on ``device``, in
    eval mode, its frozen BatchNorms folded into the convolutions before them
    (:func:`~toist_core.model.fold_batchnorm.fold_batchnorm`: the same outputs to fp32 rounding,
    one pass less over every backbone activation; the ``state_dict`` keeps its keys and values,
    the folded kernels are extra non-persistent buffers) and (``inference.channels_last``, the default) with channels-last conv
    weights. Only for modules the segmenter owns: a module it is given is never changed."""
    from ..model.fold_batchnorm import fold_batchnorm

    model = model.to(device).eval()
    fold_batchnorm(model)
    if (inference or InferenceConfig()).channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def check_on_device(model: torch.nn.Module, device: torch.device) -> None:
    """Refuse a module that is not on ``device`` (its first tensor tells: modules move as a whole)."""
    first = next(itertools.chain(model.named_parameters(), model.named_buffers()), None)
    if first is None:
        return
    name, tensor = first
    if tensor.device.type != device.type or (device.index is not None and tensor.device.index != device.index):
        raise ValueError(f"model: {name} is on {tensor.device}, the segmenter's device is {device}; "
                         "TaskSegmenter never moves a module it is given: move it first (model.to(device))")


def is_channels_last(model: torch.nn.Module) -> bool:
    """Whether the model's first 4-D weight is stored channels-last (inputs then follow suit)."""
    for param in model.parameters():
        if param.dim() == 4:
            return param.is_contiguous(memory_format=torch.channels_last)
    return False
