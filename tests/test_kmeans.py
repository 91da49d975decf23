"""k-means: convergence to known centres, warm start, initialisation, stopping rule."""

import pytest
import torch

from toist_core.distill.kmeans import kmeans, kmeans_init
from toist_core.distill.memory_bank import MemoryBank

CENTRES = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 5.0]])
OFFSETS = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0], [0, 0, 1.0], [0, 0, -1.0]])


def _blobs():
    # Symmetric offsets: each blob's mean is exactly its centre.
    return torch.cat([c + OFFSETS for c in CENTRES])


def test_converges_to_known_centres_from_one_row_per_blob():
    features = _blobs()
    init = features[[1, 9, 16]]  # one (off-centre) row of each blob
    centres, assignment = kmeans(features, init)
    assert torch.allclose(centres, CENTRES, atol=1e-6)
    assert assignment.tolist() == [0] * 6 + [1] * 6 + [2] * 6


def test_random_initialisation_ends_at_a_fixed_point():
    features = _blobs() + torch.randn(18, 3, generator=torch.Generator().manual_seed(0)) * 0.1
    for seed in range(4):
        centres, assignment = kmeans(features, kmeans_init(features, 3, torch.Generator().manual_seed(seed)))
        for k in range(3):  # each centre is the mean of its members
            if (assignment == k).any():
                assert torch.allclose(centres[k], features[assignment == k].mean(0), atol=1e-5)
        again, _ = kmeans(features, centres)
        assert torch.allclose(again, centres, atol=1e-6)


def test_warm_start_converges_to_known_centres():
    features = _blobs()
    centres, assignment = kmeans(features, CENTRES + 0.7)
    assert torch.allclose(centres, CENTRES, atol=1e-6)
    assert assignment.tolist() == [0] * 6 + [1] * 6 + [2] * 6


def test_single_lloyd_step_by_hand():
    features = torch.tensor([[0.0], [1.0], [3.0]])
    centres, assignment = kmeans(features, torch.tensor([[0.0], [2.5], [100.0]]), max_iter=1)
    # squared distances to (0, 2.5, 100): 1.0 -> (1, 2.25, ...) -> centre 0
    assert assignment.tolist() == [0, 0, 1]
    assert centres.flatten().tolist() == [0.5, 3.0, 100.0]  # centre 2 had no member


def test_stopping_rule_is_squared_sum_of_centre_shifts():
    # From (0, 3) Lloyd's steps give (0.5, 5) -> (1, 6.5) -> (1.5, 10) -> (1.5, 10); the shifts
    # are (0.5 + 2)^2 = 6.25, (0.5 + 1.5)^2 = 4, (0.5 + 3.5)^2 = 16, 0.
    features = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    init = torch.tensor([[0.0], [3.0]])
    assert kmeans(features, init, tol=1e9)[0].flatten().tolist() == [0.5, 5.0]  # one step
    assert kmeans(features, init, max_iter=2)[0].flatten().tolist() == [1.0, 6.5]
    # 6.25 >= 5 continues, 4 < 5 stops (a sum of *squared* shifts, 4.25, would stop earlier)
    assert kmeans(features, init, tol=5.0)[0].flatten().tolist() == [1.0, 6.5]
    assert kmeans(features, init, tol=4.0)[0].flatten().tolist() == [1.5, 10.0]  # strict <
    centres, assignment = kmeans(features, init)
    assert centres.flatten().tolist() == [1.5, 10.0] and assignment.tolist() == [0, 0, 0, 0, 1]


def test_kmeans_init_distinct_rows_and_deterministic():
    features = torch.arange(20.0).reshape(10, 2)
    a = kmeans_init(features, 4, torch.Generator().manual_seed(1))
    b = kmeans_init(features, 4, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert len({tuple(r) for r in a.tolist()}) == 4
    assert all(any(torch.equal(r, f) for f in features) for r in a)
    with pytest.raises(ValueError, match="k <= number of rows"):
        kmeans_init(features, 11)


def _bank_with(values, centres, full):
    bank = MemoryBank(num_tasks=1, size=len(values), dim=1, num_clusters=len(centres))
    bank.load_state_dict({"feature_bank": torch.tensor(values).reshape(1, -1, 1),
                          "cluster_centers": torch.tensor(centres).reshape(1, -1, 1),
                          "update_count": torch.tensor([100.0 if full else 0.0]),
                          "full_label": torch.tensor([1.0 if full else 0.0])})
    return bank


def test_full_bank_warm_starts_from_stored_centres():
    # Points 0, 2, 4 with K = 2 have two fixed points: {0}{2,4} -> (0, 3) and {0,2}{4} -> (1, 4).
    # A full bank must keep the one its stored centres lead to.
    assert _bank_with([0.0, 2.0, 4.0], [0.1, 3.2], full=True).cluster(0).flatten().tolist() == [0.0, 3.0]
    assert _bank_with([0.0, 2.0, 4.0], [0.9, 4.2], full=True).cluster(0).flatten().tolist() == [1.0, 4.0]


def test_not_full_bank_ignores_stored_centres_and_is_reproducible():
    a = _bank_with([0.0, 2.0, 4.0, 6.0, 100.0], [1000.0, 2000.0], full=False).cluster(0)
    b = _bank_with([0.0, 2.0, 4.0, 6.0, 100.0], [-5.0, -7.0], full=False).cluster(0)
    assert torch.equal(a, b)
    assert sorted(a.flatten().tolist()) == [3.0, 100.0]


def test_cluster_result_is_stored_and_nearest_centre():
    bank = _bank_with([0.0, 2.0, 4.0], [0.1, 3.2], full=True)
    bank.cluster(0)
    assert bank.cluster_centers[0].flatten().tolist() == [0.0, 3.0]
    assert bank.nearest_centre(0, torch.tensor([2.0])).tolist() == [3.0]
    assert bank.nearest_centre(0, torch.tensor([[1.4], [1.6]])).flatten().tolist() == [0.0, 3.0]


def test_non_finite_features_are_refused_instead_of_looping_for_ever():
    """Without an iteration cap (the reference's setting) a NaN row keeps the shift NaN, which is
    never under the tolerance: k-means on a bank a diverged model wrote into never returned."""
    features = torch.randn(20, 4)
    features[3, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="1 of the 20 feature rows hold NaN/inf"):
        kmeans(features, features[:3].nan_to_num(), max_iter=None)
