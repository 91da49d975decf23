"""Memory bank: state layout, FIFO filling, the "full" rule, closest / FIFO replacement."""

import pytest
import torch

from toist_core.distill.memory_bank import MemoryBank


def _bank(**kwargs):
    defaults = dict(num_tasks=2, size=4, dim=2, num_clusters=2, update="closest", seed=0)
    defaults.update(kwargs)
    return MemoryBank(**defaults)


def _rows(*values):
    return torch.tensor([[float(v), -float(v)] for v in values])


def test_state_dict_uses_reference_names_and_loads_strictly():
    bank = MemoryBank()
    state = bank.state_dict()
    assert list(state) == ["feature_bank", "cluster_centers", "update_count", "full_label"]
    assert state["feature_bank"].shape == (14, 1024, 256) and state["cluster_centers"].shape == (14, 3, 256)
    assert all(v.dtype == torch.float32 for v in state.values())
    # A reference-like state (random bank, full tasks) loads with strict=True.
    official = {"feature_bank": torch.randn(14, 1024, 256), "cluster_centers": torch.randn(14, 3, 256),
                "update_count": torch.full((14,), 2000.0), "full_label": torch.ones(14)}
    other = MemoryBank()
    other.load_state_dict(official, strict=True)
    assert torch.equal(other.feature_bank, official["feature_bank"]) and other.is_full(13)
    # Loaded centres need not belong to the loaded bank: every task re-clusters at first use.
    other.cluster(13)
    assert not other.stale_flags()[13]
    other.load_state_dict(official, strict=True)
    assert other.stale_flags().all()
    assert not torch.equal(other.cluster(13), official["cluster_centers"][13])


def test_seeded_initialisation_agrees_between_instances():
    assert torch.equal(_bank(seed=3).feature_bank, _bank(seed=3).feature_bank)
    assert not torch.equal(_bank(seed=3).feature_bank, _bank(seed=4).feature_bank)


def test_fifo_fill_and_full_flag_after_count_exceeds_size():
    bank = _bank()
    start = bank.feature_bank[0].clone()
    other_task = bank.feature_bank[1].clone()

    bank.update(_rows(1, 2), [0, 0])
    assert torch.equal(bank.feature_bank[0], torch.cat([start[2:], _rows(1, 2)]))
    assert bank.update_count[0] == 2 and bank.full_label[0] == 0

    bank.update(_rows(3, 4), [0, 0])
    assert torch.equal(bank.feature_bank[0], _rows(1, 2, 3, 4))
    assert bank.update_count[0] == 4 and bank.full_label[0] == 0  # 4 is not > 4 yet

    bank.update(_rows(5, 6), [0, 0])
    assert torch.equal(bank.feature_bank[0], _rows(3, 4, 5, 6))
    assert bank.update_count[0] == 6 and bank.full_label[0] == 0  # tested before the increment

    bank.update(_rows(7, 8), [0, 0])  # still FIFO; 6 > 4 -> full now
    assert torch.equal(bank.feature_bank[0], _rows(5, 6, 7, 8))
    assert bank.update_count[0] == 8 and bank.full_label[0] == 1

    # Once full, "closest" replacement and the count no longer grows.
    bank.update(_rows(5.2), [0])
    assert torch.equal(bank.feature_bank[0], _rows(5.2, 6, 7, 8))
    assert bank.update_count[0] == 8
    assert torch.equal(bank.feature_bank[1], other_task)  # task 1 never touched


def _full_bank(values, update="closest", **kwargs):
    bank = _bank(update=update, **kwargs)
    state = bank.state_dict()
    state["feature_bank"][0] = _rows(*values)
    state["full_label"][0] = 1
    state["update_count"][0] = 10
    bank.load_state_dict(state)
    return bank


def test_closest_replacement_is_a_one_to_one_assignment():
    bank = _full_bank([0, 10, 20, 30])
    # Both 9 and 12 are nearest to slot 1 (value 10); the one-to-one minimum-L1 assignment puts
    # 9 in slot 1 and 12 in slot 2 (total 2 + 16 = 18, versus 18 + 4 = 22 the other way).
    bank.update(_rows(9, 12), [0, 0])
    assert torch.equal(bank.feature_bank[0], _rows(0, 9, 12, 30))


def test_fifo_after_full_keeps_the_queue():
    bank = _full_bank([0, 10, 20, 30], update="fifo")
    bank.update(_rows(9, 12), [0, 0])
    assert torch.equal(bank.feature_bank[0], _rows(20, 30, 9, 12))


def test_mixed_tasks_and_skipped_rows():
    bank = _bank()
    before = bank.feature_bank.clone()
    bank.update(_rows(1, 2, 3), [1, -1, 1])
    assert torch.equal(bank.feature_bank[0], before[0])
    assert torch.equal(bank.feature_bank[1], torch.cat([before[1][2:], _rows(1, 3)]))
    assert bank.update_count.tolist() == [0.0, 2.0]


def test_more_new_rows_than_slots_keeps_the_newest():
    bank = _bank()
    bank.update(_rows(1, 2, 3, 4, 5, 6), [0] * 6)
    assert torch.equal(bank.feature_bank[0], _rows(3, 4, 5, 6))
    assert bank.update_count[0] == 6


def test_bank_receives_no_gradient():
    bank = _bank()
    features = _rows(1, 2).requires_grad_(True)
    bank.update(features * 2, [0, 0])
    assert not bank.feature_bank.requires_grad and bank.feature_bank.grad_fn is None
    assert not bank.cluster_centers.requires_grad


def test_bad_input_is_rejected():
    bank = _bank()
    with pytest.raises(ValueError, match="task index 2"):
        bank.update(_rows(1), [2])
    with pytest.raises(ValueError, match=r"features \[n, 2\]"):
        bank.update(torch.zeros(1, 3), [0])
    with pytest.raises(ValueError, match="update must be"):
        MemoryBank(update="nearest")


@pytest.mark.parametrize("bank_state", ["filling", "full_closest", "full_fifo_every_use"])
def test_non_finite_features_are_refused_before_anything_is_stored(bank_state):
    """A diverged teacher's NaN noun features: a full bank's one-to-one matching failed with scipy's
    "matrix contains invalid numeric entries" (no word of a diverged model), a filling one stored
    them first and k-means refused them later (bank damaged in memory); under every_use one
    process raised and another stored the same gathered rows without a word."""
    if bank_state == "filling":
        bank = _bank()
    elif bank_state == "full_closest":
        bank = _full_bank([0, 10, 20, 30])
    else:
        bank = _full_bank([0, 10, 20, 30], update="fifo", rerun="every_use")
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    rows = _rows(5, 6, 7)
    rows[1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"^MemoryBank.update: 1 of the 3 noun feature rows hold NaN/inf "
                                                 r"\(a diverged model.*the bank is left as it was$"):
        bank.update(rows, [0, 0, 1])
    assert all(torch.equal(before[k], v) for k, v in bank.state_dict().items())
    bank.update(rows, [0, -1, 1])   # a row that is skipped is not stored, NaN or not
    assert torch.isfinite(bank.feature_bank).all()


def test_saved_stale_flags_make_a_reloaded_bank_continue_exactly():
    """k-means with few iterations (here 1) moves centres each time it runs: a reloaded bank must
    re-run it on exactly the tasks the saved one would (after the last update, none), not on all."""
    legacy_differs = 0
    for seed in range(12):
        torch.manual_seed(seed)
        kwargs = dict(num_tasks=2, size=16, dim=4, num_clusters=3, max_iter=1, tol=1e-4)
        bank = MemoryBank(**kwargs)
        while not (bank.is_full(0) and bank.is_full(1)):
            bank.update(torch.randn(4, 4), [0, 0, 1, 1])
        bank.update(torch.randn(4, 4), [0, 0, 1, 1])
        restored, legacy = MemoryBank(**kwargs), MemoryBank(**kwargs)
        restored.load_state_dict(bank.state_dict())
        restored.load_stale_flags(bank.stale_flags())
        legacy.load_state_dict(bank.state_dict())
        legacy.load_stale_flags(None)   # a checkpoint from before the flags were saved
        assert not bank.stale_flags().any() and legacy.stale_flags().all()
        new = torch.randn(2, 4)
        for other in (bank, restored, legacy):
            other.update(new, [0, 0])    # a batch of task 0 only: task 1's centres must stay
        assert torch.equal(restored.cluster_centers, bank.cluster_centers)
        legacy_differs += not torch.equal(legacy.cluster_centers[1], bank.cluster_centers[1])
    assert legacy_differs > 0   # what the flags are for: without them task 1 is re-clustered
    with pytest.raises(ValueError, match=r"expected \[2\] flags"):
        restored.load_stale_flags(torch.zeros(3, dtype=torch.bool))
