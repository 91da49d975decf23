"""Process-group set-up for one process or many (torchrun), seeding and determinism.

One device needs no launcher: without torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``) training runs as a single process with no process group. Under ``torchrun``
(one node: ``--standalone --nproc_per_node N``; several: ``--nnodes M --rdzv-backend c10d
--rdzv-endpoint host:port``) the default group is created with NCCL on GPUs and gloo on CPU,
also for a single process (``--nproc_per_node 1``): a one-process torchrun job then runs the
code path of N processes (process group, DDP, collectives), which is what a one-GPU check of a
multi-GPU set-up needs.
"""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None  # None: no process group (single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> the local GPU when there is one, else CPU; ``cuda`` -> ``cuda:<local_rank>``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("runtime.device: 'cuda' requested but no CUDA device is available "
                             "(use 'auto' or 'cpu')")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """Read torchrun's environment and create the default process group if it asks for one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    # torchrun (and torch.distributed.launch) always set both, also for one process; a plain
    # `python -m training.train` sets neither. World size 1 under torchrun still gets a group:
    # NCCL / gloo and DDP work with one rank, so `--nproc_per_node 1` runs the code of N GPUs.
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv(device=dev)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not torch_dist.is_initialized():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        torch_dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend)


def cleanup_distributed() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        torch_dist.barrier()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices). The reference seeds with ``42 + rank``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool, device: torch.device) -> None:
    """Ask torch for deterministic kernels where it has them (a warning where it has not).

    On CUDA, cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` before its first use; it is set here when
    the user has not set it.
    """
    if not enabled:
        torch.use_deterministic_algorithms(False)
        return
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def wrap_ddp(module: nn.Module, env: DistEnv, find_unused_parameters: bool = True,
             broadcast_buffers: bool = True) -> nn.Module:
    """DistributedDataParallel around ``module`` in a process group; the module itself otherwise.

    ``find_unused_parameters`` defaults to True: RoBERTa's pooler (kept for key compatibility)
    and, depending on the stage, other trainable parameters get no gradient in a step.
    Parameters are broadcast from rank 0 once, here, and so are buffers unless
    ``broadcast_buffers=False``, which also skips the per-step buffer broadcast (for buffers kept
    identical by other means). torch 2.13 calls ``broadcast_buffers`` deprecated and warns in every
    process at every start; its replacement (``forward_sync_buffers``) still syncs buffers at start
    and older torch lacks it, so the argument stays and that one warning is left out.
    """
    if not env.distributed or not any(p.requires_grad for p in module.parameters()):
        return module
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids,
                                                   find_unused_parameters=find_unused_parameters,
                                                   broadcast_buffers=broadcast_buffers)


def all_gather_objects(obj, env: DistEnv) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if not env.distributed:
        return [obj]
    gathered = [None] * env.world_size
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, env: DistEnv, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]
