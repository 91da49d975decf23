"""Per-task memory bank of teacher noun features and its k-means centres.

State (float32 buffers named as the reference ``ClusterCriterion``, so the official
``checkpoint["cluster_criterion"]`` loads with ``load_state_dict``):

* ``feature_bank [T, N, D]``: ``N`` features per task (initially random),
* ``cluster_centers [T, K, D]``: the k-means centres of each task's bank,
* ``update_count [T]``: features pushed while the bank was filling,
* ``full_label [T]``: 1 once the task's bank counts as full.

Update of task ``t`` with ``n`` new features (reference ``update_memory_queue``):

* while ``full_label[t] == 0``: first-in-first-out (drop the ``n`` oldest rows at the front,
  append the new ones at the end); *then* ``full_label[t] = 1`` if ``update_count[t] > N``
  (tested before ``update_count[t] += n``, so the bank turns "full" one update after the
  count exceeds ``N``, and ``update_count`` stops growing afterwards);
* once full, ``"closest"``: ``linear_sum_assignment(cdist(new, bank, p=1))``, each new feature
  overwrites its (distinct) assigned row; ``"fifo"``: keep the queue.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .. import dist
from .kmeans import assign_to_centres, kmeans, kmeans_init


class MemoryBank(nn.Module):
    """Banks of ``num_tasks`` tasks, ``size`` features of ``dim`` each, ``num_clusters`` centres
    per task; task index = task_id - 1. ``tol`` / ``max_iter`` configure k-means, ``rerun``
    when it runs (see ``cluster``)."""

    def __init__(self, num_tasks: int = 14, size: int = 1024, dim: int = 256, num_clusters: int = 3,
                 update: str = "closest", seed: int = 0, tol: float = 1e-4, max_iter: Optional[int] = None,
                 rerun: str = "on_change"):
        super().__init__()
        if update not in ("closest", "fifo"):
            raise ValueError(f"MemoryBank: update must be 'closest' or 'fifo', got {update!r}")
        if rerun not in ("on_change", "every_use"):
            raise ValueError(f"MemoryBank: rerun must be 'on_change' or 'every_use', got {rerun!r}")
        if not 1 <= num_clusters <= size:
            raise ValueError(f"MemoryBank: need 1 <= num_clusters <= size, got {num_clusters} and {size}")
        self.num_tasks, self.size, self.dim, self.num_clusters = num_tasks, size, dim, num_clusters
        self.update_rule, self.seed, self.tol, self.max_iter, self.rerun = update, seed, tol, max_iter, rerun
        # Random start as the reference, but from a seeded generator so that every process
        # (and every run) starts from the same bank without a collective.
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("feature_bank", torch.randn((num_tasks, size, dim), generator=generator))
        self.register_buffer("cluster_centers", torch.randn((num_tasks, num_clusters, dim), generator=generator))
        self.register_buffer("update_count", torch.zeros(num_tasks))
        self.register_buffer("full_label", torch.zeros(num_tasks))
        # Centres that do not belong to the current bank. Not in the state_dict (it keeps the
        # reference keys): a training checkpoint saves it beside (``stale_flags``) for an exact
        # resume. Fresh banks and loaded states start stale.
        self.register_buffer("_stale", torch.ones(num_tasks, dtype=torch.bool), persistent=False)

    def _check_task(self, task_index: int) -> int:
        task_index = int(task_index)
        if not 0 <= task_index < self.num_tasks:
            raise ValueError(f"MemoryBank: task index {task_index} out of range 0..{self.num_tasks - 1} "
                             f"(task index = task_id - 1)")
        return task_index

    def is_full(self, task_index: int) -> bool:
        return bool(self.full_label[self._check_task(task_index)] != 0)

    @torch.no_grad()
    def update(self, features: Tensor, task_indices: Union[Tensor, Sequence[int]]) -> None:
        """Push ``features [n, D]`` (row ``i`` belongs to task ``task_indices[i]``; -1 = skip).

        Rows of one task are applied together, in their order. Every process must call this
        with the same (gathered) features to keep the banks identical.
        """
        features = features.detach().to(self.feature_bank)
        task_indices = torch.as_tensor(task_indices, dtype=torch.int64).reshape(-1).cpu()
        if features.ndim != 2 or features.shape[1] != self.dim or features.shape[0] != task_indices.shape[0]:
            raise ValueError(f"MemoryBank.update: expected features [n, {self.dim}] with n task indices, got "
                             f"{tuple(features.shape)} and {tuple(task_indices.shape)}")
        finite = torch.isfinite(features).all(dim=1) | (task_indices < 0).to(features.device)
        if not bool(finite.all()):
            # Before any row is stored: a full bank's matching (linear_sum_assignment) failed on
            # them with scipy's "matrix contains invalid numeric entries", and a filling bank kept
            # them until k-means refused them.
            raise FloatingPointError(f"MemoryBank.update: {int((~finite).sum())} of the {features.shape[0]} noun "
                                     "feature rows hold NaN/inf (a diverged model: the teacher's noun features); "
                                     "the bank is left as it was")
        for task in task_indices.unique().tolist():
            if task < 0:
                continue
            task = self._check_task(task)
            self._update_task(task, features[(task_indices == task).nonzero().squeeze(1).to(features.device)])
            self._stale[task] = True
        if self.rerun == "on_change":
            # Re-cluster right away every task whose bank changed (or whose centres are stale):
            # every process applies the same updates, so every process runs the same k-means
            # from the same warm start and the centres stay identical across processes.
            for task in self._stale.nonzero().squeeze(1).tolist():
                self._recluster(task)

    def _update_task(self, task: int, new: Tensor) -> None:
        n = new.shape[0]
        bank = self.feature_bank[task]
        if self.full_label[task] == 0:
            self._push_fifo(task, new)
            if self.update_count[task] > self.size:  # before the increment, as the reference
                self.full_label[task] = 1
            self.update_count[task] += n
        elif self.update_rule == "fifo":
            self._push_fifo(task, new)
        else:
            cost = torch.cdist(new, bank, p=1).cpu()
            rows, cols = linear_sum_assignment(cost.numpy())
            rows = torch.as_tensor(rows, device=bank.device)
            cols = torch.as_tensor(cols, device=bank.device)
            bank[cols] = new[rows]

    def _push_fifo(self, task: int, new: Tensor) -> None:
        # More new rows than slots: only the newest `size` survive (the reference would fail).
        new = new[-self.size:]
        self.feature_bank[task] = torch.cat([self.feature_bank[task][new.shape[0]:], new], dim=0)

    @torch.no_grad()
    def cluster(self, task_index: int) -> Tensor:
        """The k-means centres ``[K, D]`` of the task's bank (stored in ``cluster_centers``).

        ``rerun="on_change"``: k-means runs when the bank changes (inside ``update``) or, after
        construction / loading, at the first use; otherwise the stored centres are returned.
        ``rerun="every_use"``: k-means runs at every call, as the reference.

        Initial centres: ``K`` random distinct bank rows while the bank is not full (drawn from
        a generator seeded by ``(seed, task, update_count)``, so the same bank state gives the
        same rows on every process), the stored centres once it is full (warm start).
        """
        task = self._check_task(task_index)
        if self.rerun == "every_use" or self._stale[task]:
            self._recluster(task)
        return self.cluster_centers[task]

    def _recluster(self, task: int) -> None:
        features = self.feature_bank[task]
        if self.full_label[task] == 0:
            generator = torch.Generator().manual_seed(self._init_seed(task))
            init = kmeans_init(features, self.num_clusters, generator)
        else:
            init = self.cluster_centers[task]
        centres, _ = kmeans(features, init, tol=self.tol, max_iter=self.max_iter)
        self.cluster_centers[task] = centres
        self._stale[task] = False

    def _init_seed(self, task: int) -> int:
        return (self.seed * 1_000_003 + task * 100_003 + int(self.update_count[task].item())) % (2 ** 63)

    def nearest_centre_index(self, task_index: int, query: Tensor) -> Tensor:
        """Index ``[n]`` of the stored centre nearest (squared L2) to ``query [D]`` or ``[n, D]``."""
        task = self._check_task(task_index)
        return assign_to_centres(query.detach(), self.cluster_centers[task])

    def nearest_centre(self, task_index: int, query: Tensor) -> Tensor:
        """The stored centre(s) nearest to ``query``: ``[D]`` for a ``[D]`` query, else ``[n, D]``."""
        centres = self.cluster_centers[self._check_task(task_index)]
        chosen = centres[self.nearest_centre_index(task_index, query)]
        return chosen[0] if query.ndim == 1 else chosen

    @torch.no_grad()
    def synchronize(self, src: int = 0) -> None:
        """Copy the whole state from rank ``src`` to all ranks (e.g. after a rank-0-only load)."""
        for buffer in (self.feature_bank, self.cluster_centers, self.update_count, self.full_label):
            dist.broadcast_(buffer, src)
        self._mark_stale()

    def _mark_stale(self) -> None:
        self._stale.fill_(True)

    def stale_flags(self) -> Tensor:
        """``[T]`` bool, True for the tasks whose stored centres k-means has not yet recomputed for
        their bank. Save it with the state_dict: k-means with few iterations (``max_iter``) moves
        centres it runs on again, so a resumed bank must re-cluster exactly the tasks the saved one would."""
        return self._stale.clone()

    def load_stale_flags(self, flags: Optional[Tensor]) -> None:
        """Restore :meth:`stale_flags` after ``load_state_dict``; None (a file without them): every
        task stale, as ``load_state_dict`` leaves them."""
        if flags is None:
            self._mark_stale()
            return
        if tuple(flags.shape) != (self.num_tasks,):
            raise ValueError(f"MemoryBank.load_stale_flags: expected [{self.num_tasks}] flags, "
                             f"got {tuple(flags.shape)}")
        self._stale.copy_(flags.to(self._stale))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # Loaded centres may not belong to the loaded bank: re-run k-means at first use.
        self._mark_stale()

    def extra_repr(self) -> str:
        return (f"num_tasks={self.num_tasks}, size={self.size}, dim={self.dim}, num_clusters={self.num_clusters}, "
                f"update={self.update_rule!r}, rerun={self.rerun!r}")
