"""The toist perception node's entry points (``ros2 run toist_ros perception_node``,
``python -m toist_ros.perception_node``; ``perception_lifecycle_node`` for the lifecycle
(managed) node): camera images + a task in, ranked task instances out.

The node is made of one file per idea:
  * ``node``             ``PerceptionNode``: start-up, wiring, services, parameters, shut-down;
  * ``lifecycle_node``   ``ManagedPerceptionNode``: the same in lifecycle states, moved by a manager;
  * ``model_loader``     device choice, checkpoint loading, start-up errors and exit codes;
  * ``tasks``            the active task: encoded once per change, swapped with a revision;
  * ``camera_input``     image subscriptions, latest-frame slots (``frame_slot``), QoS warnings;
  * ``inference_worker`` the inference thread: frames and ``segment_image`` requests -> results;
  * ``health``           the ``/diagnostics`` report and its level (statistics: ``diagnostics``);
  * ``executor``         raw image callbacks in the spinning thread, the others in a thread pool;
SIGINT / SIGTERM are a stop request (``toist_core.stop_signals``), acted on by ``main``; while
the node starts (model loading, warm-up) they interrupt it at once.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.signals import SignalHandlerOptions

from toist_core.stop_signals import StopSignals
from toist_ros.executor import PerceptionExecutor
from toist_ros.model_loader import EXIT_PARAMETERS, StartupError
from toist_ros.node import NODE_NAME, PerceptionNode
from toist_ros.startup_status import StartupStopped

SPIN_POLL_S = 0.1             # the main thread looks for a stop signal at least this often


def main(argv: Optional[list[str]] = None, managed: bool = False) -> int:
    """Entry point of ``perception_node``: exit code 0 after a normal shut-down, non-zero on start-up failure.

    ``managed``: a :class:`~toist_ros.lifecycle_node.ManagedPerceptionNode`, which starts
    unconfigured and loads its model when a lifecycle manager configures it (a failed
    transition is the manager's to handle: the process goes on); a stop signal during a
    configure ends it at its next step (the step under way, e.g. the model load, ends first).

    SIGINT/SIGTERM are recorded (while the node starts they also interrupt it:
    ``StopSignals.raising``); rclpy's own signal handlers are not installed: with them a
    signal raised KeyboardInterrupt at an arbitrary point of the main thread while rclpy's signal
    thread was still triggering the executor's SIGINT guard condition, which
    ``executor.shutdown()`` frees; that race ended the process with SIGSEGV now and then. The main
    thread looks for a stop request between short spins and then shuts down in the order rclpy
    needs: our inference thread joined, executor (and its threads) shut down, node destroyed,
    context shut down.
    """
    argv = sys.argv if argv is None else argv
    try:
        rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
    except Exception as exc:  # e.g. UnknownROSArgsError for a malformed --ros-args
        print(f"{NODE_NAME}: cannot start: bad ROS arguments: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_PARAMETERS
    with StopSignals() as stop:
        node = None
        executor = None
        code = 0
        try:
            # Loading and warming up the model has no point at which to look for a stop request:
            # Ctrl-C there waited for the whole start-up (a launch file's SIGKILL came first).
            with stop.raising():
                node = _managed_node(argv) if managed else PerceptionNode(stop=stop.event, argv=argv)
            executor = node_executor(node)
            while not stop.requested and rclpy.ok():
                executor.spin_once(timeout_sec=SPIN_POLL_S)
        except StartupError as exc:
            if node is None and stop.requested:
                # The signal's KeyboardInterrupt, raised inside a library's native code (safetensors
                # reading the weights), came out as another error: "not a readable safetensors
                # file ... damaged?", a FATAL for a Ctrl-C.
                rclpy.logging.get_logger(NODE_NAME).info(f"stopped while starting (stop signal; it left: {exc})")
            else:
                rclpy.logging.get_logger(exc.logger_name or NODE_NAME).fatal(f"cannot start: {exc}")
                code = exc.code
        except (KeyboardInterrupt, StartupStopped):  # the latter: a step saw the signal's event
            if node is None:  # stopped while starting: say so, the log would end without a word
                rclpy.logging.get_logger(NODE_NAME).info("stopped while starting (stop signal)")
        except ExternalShutdownException:
            pass
        finally:
            if node is not None:
                node.request_stop()  # a lifecycle transition under way ends at its next step
                node.stop()
            if executor is not None:
                executor.shutdown()
            if node is not None:
                node.destroy_node()
            rclpy.try_shutdown()
    return code


def node_executor(node: PerceptionNode, context: Any = None) -> PerceptionExecutor:
    """The process's executor for ``node``: its image callbacks in the spinning thread, its
    waiting ones apart; a callback that raises is logged and counted (``callback_failed``) and
    the node goes on."""
    executor = PerceptionExecutor(node.inline_callback_groups, num_threads=4, context=context,
                                  waiting_groups=node.waiting_callback_groups,
                                  on_callback_error=node.callback_failed)
    executor.add_node(node)
    return executor


def lifecycle_main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``perception_lifecycle_node`` (the lifecycle node; launch ``lifecycle:=true``)."""
    return main(argv, managed=True)


def _managed_node(argv: list[str]) -> PerceptionNode:
    from toist_ros.lifecycle_node import ManagedPerceptionNode  # rclpy.lifecycle: only when asked for

    return ManagedPerceptionNode(argv=argv)


__all__ = ["NODE_NAME", "PerceptionNode", "lifecycle_main", "main"]

if __name__ == "__main__":
    sys.exit(main())
