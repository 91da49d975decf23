"""The node's executor: raw image callbacks in the spinning thread, callbacks that wait for the
inference thread in a pool of their own, every other callback in a pool.

rclpy's ``MultiThreadedExecutor`` hands each ready callback to a thread pool; the worker then
waits for the GIL while the spinning thread rebuilds its wait set. For a 640x480 frame that
hand-over cost ~2 ms between the camera's publish and the callback (bare rclpy subscriptions, one
run each: single-threaded 3.0-3.6 ms, multi-threaded 5.0-5.4 ms; docs/performance.md, "Node
overhead"). The raw image callbacks only validate, convert and put the frame into its slot
(~0.1 ms), so they run right where the wait returned them. Everything that may block stays in a
pool: ``set_task`` encodes a caption and compressed images are decoded (several ms each; cameras
decode in parallel) in the control pool; ``segment_image`` holds its thread until the inference
thread has served it (a second per request on a slow device), so its calls get a pool of their own:
requests piling up there never keep a task change, a parameter change or ``/diagnostics`` waiting.

Built on rclpy's public ``Executor.wait_for_ready_callbacks``, its task run the way
``SingleThreadedExecutor`` runs it; ``_spin_once_until_future_complete`` is the one private name,
the hook that ``Executor.spin_until_future_complete`` calls in Jazzy and later.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Optional

from rclpy.exceptions import InvalidHandle
from rclpy.executors import (ConditionReachedException, Executor, ExternalShutdownException, ShutdownException,
                             TimeoutException)


# Wait sets in a row that may meet an entity another thread is destroying (a race lasts one
# build); more means one stays invalid, which is raised rather than spun on.
MAX_INVALID_IN_A_ROW = 100


class PerceptionExecutor(Executor):
    """Runs the callbacks of ``inline_groups`` in the thread that calls ``spin_once``, those of
    ``waiting_groups`` in a pool of ``waiting_threads`` threads, and every other callback in a pool
    of ``num_threads`` threads. What any of them raises is raised by a later ``spin_once``, as
    rclpy's executors do, or given to ``on_callback_error`` when there is one (the node process:
    logged and counted, the node goes on)."""

    def __init__(self, inline_groups: Iterable[Any] = (), num_threads: int = 4, *, context: Any = None,
                 waiting_groups: Iterable[Any] = (), waiting_threads: int = 4,
                 on_callback_error: Optional[Callable[[BaseException], None]] = None) -> None:
        super().__init__(context=context)
        self._inline_groups = tuple(inline_groups)
        self._waiting_groups = tuple(waiting_groups)
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="toist_callbacks")
        self._waiting_pool = ThreadPoolExecutor(waiting_threads, thread_name_prefix="toist_waiting")
        self._on_callback_error = on_callback_error
        self._invalid_in_a_row = 0   # wait sets that met a destroyed entity, one after the other
        # rclpy Tasks handed to a pool, by id: (the Task, the pool's future of that hand-over). The
        # Task, not the future, holds what the callback raised (Task.__call__ catches it; the
        # future only ever holds None); the future says whether the hand-over has run.
        self._pending: dict[int, tuple[Any, Future]] = {}

    def spin_once(self, timeout_sec: Optional[float] = None) -> None:
        self._spin_once(timeout_sec)

    def spin_once_until_future_complete(self, future: Any, timeout_sec: Optional[float] = None) -> None:
        future.add_done_callback(lambda _future: self.wake())
        self._spin_once(timeout_sec, future.done)

    def _spin_once_until_future_complete(self, future: Any, timeout_sec: Any = None) -> None:
        # The hook rclpy's Executor.spin_until_future_complete calls (which wakes on the future itself).
        self._spin_once(timeout_sec, future.done)

    def _spin_once(self, timeout_sec: Optional[float], condition: Callable[[], bool] = lambda: False) -> None:
        try:
            handler, entity, _node = self.wait_for_ready_callbacks(timeout_sec, None, condition)
        except (TimeoutException, ConditionReachedException):
            self._invalid_in_a_row = 0   # a wait set was built: none of its entities was invalid
            self._reap()
            return
        except (ExternalShutdownException, ShutdownException):
            return
        except InvalidHandle:
            # rclpy adds a waitable (a subscription's QoS event handler) to the wait set unguarded:
            # one destroyed meanwhile by another thread (a lifecycle deactivate unsubscribing the
            # cameras) raised here and ended the process. The next call builds the set anew; an
            # entity that stays invalid (destroyed the wrong way) would spin here for ever, idle.
            self._invalid_in_a_row += 1
            if self._invalid_in_a_row > MAX_INVALID_IN_A_ROW:
                raise
            return
        self._invalid_in_a_row = 0
        group = getattr(entity, "callback_group", None)
        submitted = self._pending.get(id(handler))
        if submitted is not None and not submitted[1].done():
            # rclpy yields a task again after every wait until it runs: this one waits in a busy
            # pool's queue already. Submitted again, it was reported once per copy (one exception
            # counted 41 times while a slow callback held the pool). (A coroutine paused at an
            # await, its hand-over done, is handed over again below to resume.)
            pass
        elif any(group is inline for inline in self._inline_groups):
            handler()
            self._finished(handler)
        else:
            pool = self._waiting_pool if any(group is waiting for waiting in self._waiting_groups) else self._pool
            self._pending[id(handler)] = (handler, pool.submit(handler))
        self._reap()

    def _reap(self) -> None:
        """Report the pooled callbacks that have finished (after every wait, one that timed out too)."""
        for key, (task, _future) in list(self._pending.items()):
            if task.done():
                del self._pending[key]
                self._finished(task)

    def _finished(self, task: Any) -> None:
        """Raise (or hand to ``on_callback_error``) what the callback of a done ``task`` raised."""
        exception = task.exception()
        if exception is None or isinstance(exception, InvalidHandle):
            return   # the latter: its entity destroyed by another thread while the callback took from it
        if self._on_callback_error is None:
            raise exception
        self._on_callback_error(exception)

    def run_inline(self, groups: Iterable[Any]) -> None:
        """Also run the callbacks of ``groups`` in the spinning thread (a node added later)."""
        self._inline_groups += tuple(groups)

    def run_apart(self, groups: Iterable[Any]) -> None:
        """Also run the callbacks of ``groups`` in the waiting pool (a node added later)."""
        self._waiting_groups += tuple(groups)

    def shutdown(self, timeout_sec: Optional[float] = None) -> bool:
        done = super().shutdown(timeout_sec)
        self._pool.shutdown(wait=True)
        self._waiting_pool.shutdown(wait=True)
        return done


__all__ = ["PerceptionExecutor"]
