"""Learning-rate schedule of the reference (MDETR ``linear_with_warmup``), as a pure function of the step.

Per parameter group kind (see :mod:`training.optim`):

* ``rest`` and ``backbone``: ``base_lr * 0.1 ** (epoch // lr_drop)``;
* ``text_encoder``: linear warm-up from 0 over ``round(warmup_fraction * total_steps)`` updates,
  then linear decay to 0 at the last update of the run.

The reference computes the rates *after* each ``optimizer.step()`` from the step just taken, so
its update ``u`` uses the rates of ``u - 1`` (and its very first update runs with the full
text-encoder rate). Here the rates of update ``u`` are a function of ``u`` itself, set before
it is taken (:meth:`LRSchedule.apply` after each ``optimizer.step()`` for the next one): the
warm-up really starts at 0 and a resumed run gets exactly the rates of an uninterrupted one
from the step count alone.
"""

from __future__ import annotations

from typing import Optional

from torch.optim import Optimizer

GROUP_KINDS = ("rest", "backbone", "text_encoder")


class LRSchedule:
    """Sets every param group's ``lr`` for update ``u`` (0-based, counted over the whole run).

    Param groups must carry ``kind`` (one of :data:`GROUP_KINDS`) and ``base_lr``, as built by
    :func:`training.optim.build_optimizer`.
    """

    def __init__(self, steps_per_epoch: int, epochs: int, lr_drop: int,
                 warmup_fraction: float = 0.01, gamma: float = 0.1):
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch: must be >= 1, got {steps_per_epoch}")
        if epochs < 1:
            raise ValueError(f"epochs: must be >= 1, got {epochs}")
        if lr_drop < 1:
            raise ValueError(f"lr_drop: must be >= 1, got {lr_drop}")
        if not 0 <= warmup_fraction < 1:
            raise ValueError(f"warmup_fraction: must be in [0, 1), got {warmup_fraction}")
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.lr_drop = lr_drop
        self.gamma = gamma
        self.total_steps = steps_per_epoch * epochs
        self.warmup_steps = round(warmup_fraction * self.total_steps)

    def factor(self, kind: str, step: int) -> float:
        """Multiplier of a group's base lr for update ``step``."""
        if kind in ("rest", "backbone"):
            return self.gamma ** ((step // self.steps_per_epoch) // self.lr_drop)
        if kind == "text_encoder":
            if step < self.warmup_steps:
                return step / self.warmup_steps
            remaining = self.total_steps - step
            return max(0.0, remaining / max(1, self.total_steps - self.warmup_steps))
        raise ValueError(f"unknown parameter group kind {kind!r} (expected one of {GROUP_KINDS})")

    def apply(self, optimizer: Optimizer, step: int) -> None:
        """Set the rates the optimizer uses for update ``step``."""
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * self.factor(group["kind"], step)

    def rates(self, optimizer: Optimizer) -> dict[str, float]:
        """Current lr per named group (for logging)."""
        return {group.get("name", str(i)): group["lr"] for i, group in enumerate(optimizer.param_groups)}

    def state_dict(self) -> dict:
        return {"steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs, "lr_drop": self.lr_drop,
                "gamma": self.gamma, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}

    def check_compatible(self, state: Optional[dict], where: str = "checkpoint") -> None:
        """Refuse to resume with a schedule other than the one the checkpoint was trained with
        (:class:`ScheduleMismatch`, naming each differing value by its config field)."""
        if not state:
            return
        mine = self.state_dict()
        differing = [k for k, v in mine.items() if k in state and state[k] != v]
        if differing:
            diffs = [f"{STATE_NAMES.get(k, k)}: checkpoint {state[k]!r} vs config {mine[k]!r}" for k in differing]
            raise ScheduleMismatch(f"{where}: learning-rate schedule differs from the configuration ("
                                   + "; ".join(diffs) + "); exact resume needs the same schedule", differing)


# How the schedule's recorded values are named in a refusal: the config field, or for the
# values derived from others, what they follow from.
STATE_NAMES = {
    "epochs": "schedule.epochs",
    "lr_drop": "schedule.lr_drop",
    "steps_per_epoch": "steps_per_epoch (updates per epoch)",
    "total_steps": "total_steps (steps_per_epoch x schedule.epochs)",
    "warmup_steps": "warmup_steps (schedule.warmup_fraction x total_steps)",
}


class ScheduleMismatch(ValueError):
    """A checkpoint's schedule differs from the configuration's; ``keys``: the differing
    :meth:`LRSchedule.state_dict` entries."""

    def __init__(self, message: str, keys: list[str]):
        super().__init__(message)
        self.keys = keys
