"""The node's start-up report thread (toist_ros.startup_status): no ROS needed."""

import os
import signal
import threading
import time

import pytest

from toist_core.stop_signals import StopSignals
from toist_ros.health import ERROR
from toist_ros.startup_status import StartupDiagnostics


def test_each_step_is_reported_at_once_and_then_every_period():
    reports = []
    with StartupDiagnostics(lambda level, message: reports.append((level, message)), period_s=0.05) as startup:
        startup.step("loading the model")
        assert reports[-1] == (ERROR, "starting: loading the model")
        time.sleep(0.3)
        startup.step("warming up the network")
    count = len(reports)
    time.sleep(0.15)
    assert len(reports) == count                                       # nothing after the block
    assert reports.count((ERROR, "starting: loading the model")) >= 3  # repeated while it lasted
    assert reports[-1] == (ERROR, "starting: warming up the network")


def test_a_stop_signal_during_the_join_still_waits_for_the_thread():
    """Ctrl-C interrupts start-up (StopSignals.raising): arriving while the block's end waits for
    a report in progress, it left the thread publishing through a node being destroyed."""
    reporting, release, finished = threading.Event(), threading.Event(), threading.Event()

    def slow_report(level, message):
        if message.endswith("slow"):
            reporting.set()
            release.wait(5)
            finished.set()

    with StopSignals() as stop, stop.raising():
        startup = StartupDiagnostics(slow_report, period_s=0.01)
        with pytest.raises(KeyboardInterrupt):
            with startup:
                startup._step = "slow"
                assert reporting.wait(5)
                threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
                threading.Timer(0.6, release.set).start()
    assert stop.signum == signal.SIGINT
    assert finished.is_set()   # (Thread.is_alive cannot tell after an interrupted join: Python 3.11)
