"""``ManagedPerceptionNode``: the perception node as a ROS 2 lifecycle (managed) node.

Started by ``perception_lifecycle_node`` (launch argument ``lifecycle:=true``), it waits in
*unconfigured* with its parameters declared, and a lifecycle manager (nav2's
``lifecycle_manager``, ``ros2 lifecycle set``, launch_ros' ``ChangeState``) moves it on:

  configure   load the model, encode the start-up task, warm up; create the outputs and the
              ``set_task`` / ``segment_image`` services and the ``task`` topic -> *inactive*
  activate    subscribe the cameras (and depth), start the inference thread -> *active*
  deactivate  stop the inference thread and unsubscribe (no camera traffic, no GPU work); the
              model and the active task stay, ``set_task`` still works -> *inactive*
  cleanup     release the model (and its GPU memory), destroy outputs and services -> *unconfigured*
  shutdown    whatever is running stops -> *finalized*

A transition that cannot be made (a checkpoint that does not load, an unusable start-up task)
logs the reason at ERROR, undoes what it had done and fails: the node stays where it was, and
can try again (a checkpoint still being copied is taken once it is there). Parameters marked
read-only (``checkpoint``, ``device``, ``task``, ...) cannot be changed at run time in either
mode; they come from the command line or params file.
"""

from __future__ import annotations

from typing import Callable, Optional

from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleNodeMixin, LifecycleState, TransitionCallbackReturn
from rclpy.node import Node

from toist_ros.model_loader import StartupError
from toist_ros.node import FINALIZED, UNCONFIGURED, PerceptionNode
from toist_ros.startup_status import StartupDiagnostics, StartupStopped


class _LifecycleServicesApart(LifecycleNode):
    """``LifecycleNode`` whose lifecycle services have a reentrant callback group of their own.

    rclpy puts them in the node's default group, where the parameter services are, and runs a
    transition inside the ``change_state`` callback: for the whole of a configure (a model load
    and a warm-up, tens of seconds) `ros2 lifecycle get` and `ros2 param get/set` got no answer.
    A ``change_state`` asked while a transition runs is refused by the state machine (no such
    transition from a transition state: rclpy with ros2/rclpy#1319 answers it ``success: false``;
    an older one, as it does for any transition the state does not have, logs the error and
    answers nothing), so the transitions still run one at a time."""

    def __init__(self, node_name: str, *, enable_communication_interface: bool = True, **kwargs) -> None:
        Node.__init__(self, node_name, **kwargs)
        LifecycleNodeMixin.__init__(self, enable_communication_interface=enable_communication_interface,
                                    callback_group=ReentrantCallbackGroup())


class ManagedPerceptionNode(PerceptionNode, _LifecycleServicesApart):
    """The perception node in lifecycle states; see the module docstring."""

    MANAGED = True

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        def configure() -> None:
            with StartupDiagnostics(self._publish_startup_report, self._settings["diagnostics.period_s"],
                                    stop=self._stopping) as startup:
                self._configure(startup)

        return self._transition("configure", configure, undo=self._cleanup)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        old = self._outliving_worker
        if old is not None and old.running:   # two threads on the GPU, or a second model call at once
            self.transition_failure = ("activate refused: the previous inference thread is still in its forward "
                                       "pass (deactivate could not wait for it); activate again when it ends")
            self.get_logger().error(f"lifecycle {self.transition_failure}")
            return TransitionCallbackReturn.FAILURE
        self._outliving_worker = None
        return self._transition("activate", self._activate, undo=self._deactivate)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition("deactivate", self._deactivate)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition("cleanup", self._cleanup)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        def shut_down() -> None:
            try:
                self._release()
            finally:
                self._phase = FINALIZED

        # A shutdown that fails part-way reports FAILURE, which ends *finalized* too (ERROR would
        # go through error processing back to *unconfigured*: a node asked to end, configurable).
        return self._transition("shutdown", shut_down, undo=lambda: None)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """After a transition raised: release everything and go back to *unconfigured*."""
        return self._transition("error processing", self._release)

    def _release(self) -> None:
        """Stop whatever runs and release the model, from any state, whatever the phase says
        (a deactivate that failed part-way says inactive; its steps are tried again)."""
        if self._phase != UNCONFIGURED:
            try:
                if self._inputs is not None:   # (a configure that failed early has none)
                    self._deactivate()
            except Exception as exc:   # what it could stop is stopped; the model is released below
                self.get_logger().error(f"releasing: {type(exc).__name__}: {exc}")
            self._cleanup()

    def _transition(self, name: str, step: Callable[[], None],
                    undo: Optional[Callable[[], None]] = None) -> TransitionCallbackReturn:
        """Run one transition's step; on an error log why at ERROR, undo what the step had done
        (the node is then as it was before the transition) and report FAILURE. A step without an
        undo (deactivate, cleanup, shutdown) that fails part-way reports ERROR: the node is in
        neither state, and error processing (:meth:`on_error`) releases everything (FAILURE told
        the manager "still active" of a node without its inference thread)."""
        log = self.get_logger()
        try:
            step()
        except Exception as exc:
            if isinstance(exc, StartupStopped):
                log.info(f"lifecycle {name} {exc}")
            else:
                reason = str(exc) if isinstance(exc, StartupError) else f"{type(exc).__name__}: {exc}"
                log.error(f"lifecycle {name} failed: {reason}")
                self.transition_failure = f"{name} failed: {reason}"   # on /diagnostics, at ERROR
            if undo is None:
                return TransitionCallbackReturn.ERROR
            try:
                undo()
            except Exception as undo_exc:  # the node is in an unknown state: say so; ERROR -> on_error
                log.error(f"undoing the failed {name} failed too: {type(undo_exc).__name__}: {undo_exc}")
                return TransitionCallbackReturn.ERROR
            return TransitionCallbackReturn.FAILURE
        log.info(f"lifecycle {name}: now {self._phase}")
        if name != "error processing":   # the failure that led to it stays on /diagnostics
            self.transition_failure = ""
        return TransitionCallbackReturn.SUCCESS


__all__ = ["ManagedPerceptionNode"]
