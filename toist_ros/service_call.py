"""A client's executor spun in a background thread, and one service call with a deadline from
another thread (the demo and ``toist_ros.client`` both work this way)."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional


def spin_in_background(executor: Any) -> threading.Thread:
    """Start a daemon thread that spins ``executor`` until it is shut down (the exception rclpy
    raises when the context goes away while it waits ends the thread quietly)."""

    def spin() -> None:
        try:
            executor.spin()
        except Exception:  # shut down while waiting
            pass

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    return thread


class ServerGone(RuntimeError):
    """The process serving a call ended before it answered."""


def call_service(client: Any, request: Any, timeout: float, hint: str = "",
                 server_gone: Optional[Callable[[], Optional[str]]] = None) -> Any:
    """The response of ``client`` (an rclpy client whose node is spun elsewhere) to ``request``;
    TimeoutError naming the service (and ``hint``) when it does not appear within ``timeout``
    seconds, or, once it is there, does not answer within ``timeout`` seconds more (each phase
    has its own: a node still loading its model must not eat the time of the call). ``server_gone``,
    polled while waiting, says why the server is gone (e.g. its process exited) or None:
    :class:`ServerGone` then at once, not at the timeout. A call given up is withdrawn from the
    client (its late answer is dropped, not kept for ever)."""

    def check_server() -> None:
        reason = server_gone() if server_gone is not None else None
        if reason:
            raise ServerGone(f"service {client.srv_name}: {reason}")

    deadline = time.monotonic() + timeout
    while not client.wait_for_service(timeout_sec=min(0.5, max(0.0, deadline - time.monotonic()))):
        check_server()
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no service {client.srv_name} within {timeout:g} s{hint}")
    future = client.call_async(request)
    deadline = time.monotonic() + timeout
    while not future.done() and time.monotonic() < deadline:
        check_server()
        time.sleep(0.02)
    if not future.done():
        withdraw = getattr(client, "remove_pending_request", None)
        if withdraw is not None:
            withdraw(future)
        raise TimeoutError(f"service {client.srv_name} did not answer within {timeout:g} s")
    return future.result()


__all__ = ["ServerGone", "call_service", "spin_in_background"]
