"""Tiny ``torch.distributed`` helpers that are no-ops in a single process.

Everything here works without an initialised process group (one process, CPU or GPU) and
with any backend (gloo on CPU, nccl on GPU): tensors stay on the device they came from, so
with nccl the caller passes CUDA tensors and with gloo CPU tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
from torch import Tensor


def is_initialized() -> bool:
    """True when a default process group exists."""
    return torch_dist.is_available() and torch_dist.is_initialized()


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def all_gather_variable(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor [n_r, ...]`` of every rank along dim 0, in rank order.

    The first dimension may differ between ranks (also 0); the trailing dimensions and the
    dtype must agree. Every rank receives the same result. One process: returned unchanged.
    """
    if not is_initialized() or world_size() == 1:
        return tensor
    device = tensor.device
    size = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    torch_dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    # all_gather needs equal shapes: pad to the longest, trim afterwards.
    padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(world_size())]
    torch_dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:n] for g, n in zip(gathered, counts)], dim=0)


def average_num_boxes(num_boxes: float, device: torch.device | str = "cpu") -> float:
    """Loss normaliser: the number of target boxes averaged over processes, at least 1.

    As DETR/MDETR: all-reduce (sum) the local count, divide by the world size, clamp at 1.
    """
    count = torch.as_tensor([float(num_boxes)], dtype=torch.float32, device=device)
    if is_initialized():
        torch_dist.all_reduce(count)
    return float(torch.clamp(count / world_size(), min=1).item())


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """In-place broadcast of ``tensor`` from rank ``src``; no-op in one process."""
    if is_initialized() and world_size() > 1:
        torch_dist.broadcast(tensor, src)
    return tensor
