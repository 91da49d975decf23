"""One service call with a deadline, from a thread other than the executor's (the demo and
``toist_ros.client`` spin their node in a background thread and wait here)."""

from __future__ import annotations

import time
from typing import Any


def call_service(client: Any, request: Any, timeout: float, hint: str = "") -> Any:
    """The response of ``client`` (an rclpy client whose node is spun elsewhere) to ``request``;
    TimeoutError naming the service (and ``hint``) when it is absent or does not answer in
    ``timeout`` seconds."""
    if not client.wait_for_service(timeout_sec=timeout):
        raise TimeoutError(f"no service {client.srv_name} within {timeout:.0f} s{hint}")
    future = client.call_async(request)
    deadline = time.monotonic() + timeout
    while not future.done() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not future.done():
        raise TimeoutError(f"service {client.srv_name} did not answer within {timeout:.0f} s")
    return future.result()


__all__ = ["call_service"]
