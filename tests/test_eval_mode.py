"""toist_core.model.eval_mode: eval mode for a span, each module's own flag given back; spans that
overlap (a set_task beside a predict on a model in training mode) keep eval mode until the last ends."""

import threading

from torch import nn

from toist_core.model.eval_mode import eval_mode


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.1)))
    model.train()
    model[2].eval()   # a frozen part the trainer keeps in eval mode
    return model


def _training(model: nn.Module) -> list[bool]:
    return [module.training for module in model.modules()]


def test_each_module_gets_its_own_flag_back():
    model = _model()
    before = _training(model)
    with eval_mode(model):
        assert not any(_training(model))
        with eval_mode(model):   # nested in one thread
            assert not any(_training(model))
        assert not any(_training(model))
    assert _training(model) == before == [True, True, True, False, False]


def test_a_span_ending_while_another_runs_leaves_eval_mode_on():
    """Thread A's span ends while B's is open: B's forward must not go on in training mode
    (A gave the training flags back under it: dropout on in part of B's forward)."""
    model = _model()
    before = _training(model)
    b_inside, a_done, b_may_end = threading.Event(), threading.Event(), threading.Event()
    seen_by_b = []

    def b():
        with eval_mode(model):
            b_inside.set()
            assert a_done.wait(10)
            seen_by_b.append(_training(model))
            b_may_end.wait(10)

    with eval_mode(model):
        thread = threading.Thread(target=b)
        thread.start()
        assert b_inside.wait(10)
    a_done.set()
    while not seen_by_b and thread.is_alive():
        thread.join(0.01)
    b_may_end.set()
    thread.join(10)
    assert seen_by_b == [[False] * 5]
    assert _training(model) == before


def test_a_model_put_back_into_training_mode_during_a_span_is_switched_by_the_next():
    """Only the first of overlapping spans switched modules: a model set to training mode while
    one was open (a trainer's train()) ran the next span's forward with dropout on."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model.eval()
    with eval_mode(model):
        model.train()
        with eval_mode(model):
            assert not any(_training(model))
        assert not any(_training(model))   # the outer span still open
    assert all(_training(model))           # as the caller last left it
