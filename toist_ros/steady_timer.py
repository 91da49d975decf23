"""Timers of the node's own housekeeping, on the steady clock rather than the node's ROS clock.

Under ``use_sim_time`` the ROS clock stands still until something publishes ``/clock`` (a
simulator not up yet, a bag played without ``--clock``): timers on it never fire, so
``/diagnostics`` would go silent, the no-image warning never come and the automatic QoS checks
never run, exactly when a user needs them to see why nothing happens.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from rclpy.clock import Clock, ClockType

__all__ = ["steady_timer"]


def steady_timer(node: Any, period_s: float, callback: Callable[[], None], callback_group: Optional[Any] = None):
    """``node.create_timer`` on the steady clock: fires every ``period_s`` seconds of real time."""
    return node.create_timer(period_s, callback, callback_group=callback_group,
                             clock=Clock(clock_type=ClockType.STEADY_TIME))
