"""Switches and sizes of the noun-pronoun distillation (every ablation of the paper).

Defaults are the released distillation run (``scripts/train_dete_dis.sh``): CCR on, cluster
loss weight 1e4, SBTL weight 50, 1024 features per task, K = 3, "replace the closest one"
bank update, pronoun "something", 14 tasks, 256-d features.

Ablations: ``ccr`` (Table 3; the reference has no separate switch), ``cluster_loss = 0``
(CL off), ``sbtl = 0`` (SBTL off), ``update = "fifo"`` (Table 8), ``num_clusters`` (Fig.
3b; must match the checkpoint), ``bank_size``, ``pronoun`` (Table 6: "it", "them", ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ..tasks import DEFAULT_PRONOUN, NUM_TASKS, pronoun_problem


@dataclass
class DistillConfig:
    # Cluster-centre replacement of noun tokens (teacher) / pronoun token (student, inference).
    ccr: bool = True
    # Weight of the cluster loss (MSE of the pronoun feature to its nearest centre); 0 = off.
    cluster_loss: float = 1e4
    # Weight of the soft binary target loss (and of each aux layer's copy); 0 = off.
    sbtl: float = 50.0
    # Memory bank: features per task, feature size, number of tasks.
    bank_size: int = 1024  # features kept per task
    feature_dim: int = 256  # = model.transformer.d_model
    num_tasks: int = NUM_TASKS  # one bank slot per task of the data's vocabulary
    # Once the bank is full: "closest" = one-to-one L1 assignment overwrite, "fifo" = queue.
    update: Literal["closest", "fifo"] = "closest"
    # k-means: K, tolerance on (sum of centre shifts)^2, iteration cap (None = none).
    num_clusters: int = 3  # K: cluster centres per task
    kmeans_tol: float = 1e-4  # stop when (sum of centre shifts)^2 is below this
    kmeans_max_iter: Optional[int] = 1000  # iteration cap (null = none)
    # "on_change": re-run k-means of a task only when its bank changed since the last run
    # (deterministic across ranks); "every_use": re-run at every use as the reference does.
    kmeans_rerun: Literal["on_change", "every_use"] = "on_change"
    # The word standing for the object in the student's caption.
    pronoun: str = DEFAULT_PRONOUN
    # Seed of the bank / centre initialisation and of the k-means initial rows.
    seed: int = 0

    def __post_init__(self) -> None:
        # Written as `not value >= 0` so that NaN fails as well.
        if not self.cluster_loss >= 0:
            raise ValueError(f"cluster_loss: must be >= 0, got {self.cluster_loss!r}")
        if not self.sbtl >= 0:
            raise ValueError(f"sbtl: must be >= 0, got {self.sbtl!r}")
        if self.num_clusters < 1:
            raise ValueError(f"num_clusters: must be >= 1, got {self.num_clusters!r}")
        if self.bank_size < self.num_clusters:
            raise ValueError(f"bank_size: must be >= num_clusters ({self.num_clusters}), got {self.bank_size!r}")
        if self.feature_dim < 1 or self.num_tasks < 1:
            raise ValueError(f"feature_dim / num_tasks: must be >= 1, got {self.feature_dim!r} / {self.num_tasks!r}")
        if self.update not in ("closest", "fifo"):
            raise ValueError(f"update: must be 'closest' or 'fifo', got {self.update!r}")
        if self.kmeans_rerun not in ("on_change", "every_use"):
            raise ValueError(f"kmeans_rerun: must be 'on_change' or 'every_use', got {self.kmeans_rerun!r}")
        if self.kmeans_max_iter is not None and self.kmeans_max_iter < 1:
            raise ValueError(f"kmeans_max_iter: must be >= 1 or null, got {self.kmeans_max_iter!r}")
        if not self.kmeans_tol >= 0:
            raise ValueError(f"kmeans_tol: must be >= 0, got {self.kmeans_tol!r}")
        if self.kmeans_tol == 0 and self.kmeans_max_iter is None:
            # k-means stops when (sum of centre shifts)^2 < tol: never for 0 at a fixed point.
            raise ValueError("kmeans_tol: 0 with kmeans_max_iter null would never stop; "
                             "give a tolerance > 0 or an iteration cap")
        if pronoun_problem(self.pronoun):
            raise ValueError(f"pronoun: {pronoun_problem(self.pronoun)}, got {self.pronoun!r}")

    @property
    def uses_bank(self) -> bool:
        """The memory bank and k-means are needed (for CCR or the cluster loss)."""
        return self.ccr or self.cluster_loss > 0
