"""Helpers for tests that use real rclpy on loopback: a context with a spinning executor."""

from __future__ import annotations

import sys
import threading
import time
import traceback
from typing import Callable

import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy is installed by `make setup`; run tests through `make test`")


class RosSession:
    """An rclpy context, the node's executor (``PerceptionExecutor``) spinning in a thread, and created nodes.

    Shuts down in the order that keeps rclpy from aborting at exit: executor, thread,
    nodes, context.
    """

    def __init__(self) -> None:
        from toist_ros.executor import PerceptionExecutor

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        # The node process's executor: a PerceptionNode added here gets its raw image callbacks
        # run in the spinning thread, as in `perception_node`.
        self.executor = PerceptionExecutor(num_threads=4, context=self.context)
        self.nodes = []
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except Exception:  # shut down while waiting; or a callback raised, which ends the spinning
            if self.context.ok() and not getattr(self.executor, "_is_shutdown", False):
                # Said, not swallowed: every later service call of the module then "did not answer".
                print("ros_support: the executor stopped spinning (a callback raised):\n" + traceback.format_exc(),
                      file=sys.stderr, flush=True)

    def node(self, name: str):
        node = rclpy.create_node(name, context=self.context)
        self.add(node)
        return node

    def add(self, node) -> None:
        self.nodes.append(node)
        self.executor.run_inline(getattr(node, "inline_callback_groups", ()))
        self.executor.run_apart(getattr(node, "waiting_callback_groups", ()))
        self.executor.add_node(node)

    def close(self) -> None:
        self.executor.shutdown()
        self._thread.join(timeout=10)
        for node in self.nodes:
            node.destroy_node()
        rclpy.shutdown(context=self.context)


@pytest.fixture(scope="module")
def ros_per_module():
    """One :class:`RosSession` shared by a module's tests (import it as ``ros``)."""
    session = RosSession()
    yield session
    session.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def random_model_dir(folder, seed: int = 0, tasks=None) -> str:
    """A model directory with the `tiny_segm` network's random weights (seed ``seed``): the node's
    plumbing tests need a model that always answers (random weights score ~0.99 everywhere),
    which the trained embedded default does not do on real photos. ``tasks``: the COCO-Tasks ids
    the directory records as trained on (None: none recorded, every task is taken as trained)."""
    from toist_core.checkpoint import save_model_dir
    from toist_core.inference import TaskSegmenter

    seg = TaskSegmenter.from_config("tiny_segm", device="cpu", seed=seed)
    return str(save_model_dir(seg.model, folder, seg.config, tasks=tasks))
