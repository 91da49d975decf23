"""Lloyd's k-means with squared Euclidean distance, as the reference ``models/kmeans.py``.

Iterate: assign every row to its nearest centre (ties -> lowest index), move each centre to
the mean of its members (a centre without members keeps its value), stop when
``(sum_k ||c_k - c_k_prev||_2)^2 < tol``. The assignment returned is the one of the last
iteration, i.e. computed against the centres *before* their last move (as the reference).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def squared_distances(x: Tensor, centres: Tensor) -> Tensor:
    """``[N, D]`` x ``[K, D]`` -> ``[N, K]`` squared Euclidean distances.

    Computed from explicit differences (not ``|x|^2 - 2xc + |c|^2``), which has no
    cancellation error and matches the reference bit for bit.
    """
    return ((x[:, None, :] - centres[None, :, :]) ** 2).sum(-1)


def assign_to_centres(x: Tensor, centres: Tensor) -> Tensor:
    """Index ``[N]`` of the nearest centre of each row of ``x [N, D]`` (or of ``x [D]``: ``[1]``)."""
    return squared_distances(x.reshape(-1, centres.shape[-1]).to(centres), centres).argmin(1)


def kmeans_init(features: Tensor, k: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """``k`` distinct random rows of ``features [N, D]`` (a copy) as initial centres ``[k, D]``.

    ``generator`` is a CPU ``torch.Generator``: the same seed gives the same rows everywhere.
    """
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans_init: need 1 <= k <= number of rows, got k={k} for {n} rows")
    rows = torch.randperm(n, generator=generator)[:k]
    return features[rows.to(features.device)].clone()


def kmeans(features: Tensor, init_centres: Tensor, tol: float = 1e-4,
           max_iter: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Run k-means from ``init_centres [K, D]`` on ``features [N, D]``.

    Returns ``(centres [K, D], assignment [N])``. ``max_iter=None`` iterates until the tolerance
    is met (the reference has no cap; Lloyd's iterations always reach a fixed point).
    """
    if features.ndim != 2 or init_centres.ndim != 2 or features.shape[1] != init_centres.shape[1]:
        raise ValueError(f"kmeans: expected features [N, D] and centres [K, D], got "
                         f"{tuple(features.shape)} and {tuple(init_centres.shape)}")
    x = features.float()
    if not bool(torch.isfinite(x).all()):
        # A NaN row never lets the centres settle: with no iteration cap this loop would not end.
        bad = int((~torch.isfinite(x)).any(1).sum())
        raise FloatingPointError(f"kmeans: {bad} of the {x.shape[0]} feature rows hold NaN/inf (a diverged model "
                                 "wrote them into the memory bank)")
    centres = init_centres.to(x).clone()
    num_clusters = centres.shape[0]
    iteration = 0
    while True:
        assignment = squared_distances(x, centres).argmin(1)
        previous = centres
        counts = torch.bincount(assignment, minlength=num_clusters)
        sums = torch.zeros_like(centres).index_add_(0, assignment, x)
        means = sums / counts.clamp(min=1).unsqueeze(1).to(x)
        centres = torch.where((counts > 0).unsqueeze(1), means, previous)
        shift = ((centres - previous) ** 2).sum(1).sqrt().sum()
        iteration += 1
        if shift ** 2 < tol:
            break
        if max_iter is not None and iteration >= max_iter:
            break
    return centres, assignment
