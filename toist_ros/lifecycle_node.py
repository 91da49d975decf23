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

from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from toist_ros.model_loader import StartupError
from toist_ros.node import ACTIVE, FINALIZED, UNCONFIGURED, PerceptionNode
from toist_ros.startup_status import StartupDiagnostics, StartupStopped


class ManagedPerceptionNode(PerceptionNode, LifecycleNode):
    """The perception node in lifecycle states; see the module docstring."""

    MANAGED = True

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        def configure() -> None:
            with StartupDiagnostics(self._publish_startup_report, self._settings["diagnostics.period_s"],
                                    stop=self._stopping) as startup:
                self._configure(startup)

        return self._transition("configure", configure, undo=self._cleanup)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition("activate", self._activate, undo=self._deactivate)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition("deactivate", self._deactivate)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition("cleanup", self._cleanup)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        def shut_down() -> None:
            self._release()
            self._phase = FINALIZED

        return self._transition("shutdown", shut_down)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """After a transition raised: release everything and go back to *unconfigured*."""
        return self._transition("error processing", self._release)

    def _release(self) -> None:
        """Stop whatever runs and release the model, from any state."""
        if self._phase == ACTIVE:
            self._deactivate()
        if self._phase != UNCONFIGURED:
            self._cleanup()

    def _transition(self, name: str, step: Callable[[], None],
                    undo: Optional[Callable[[], None]] = None) -> TransitionCallbackReturn:
        """Run one transition's step; on an error log why at ERROR, undo what the step had done
        (the node is then as it was before the transition) and report FAILURE."""
        log = self.get_logger()
        try:
            step()
        except Exception as exc:
            if isinstance(exc, StartupStopped):
                log.info(f"lifecycle {name} {exc}")
            else:
                reason = str(exc) if isinstance(exc, StartupError) else f"{type(exc).__name__}: {exc}"
                log.error(f"lifecycle {name} failed: {reason}")
            if undo is not None:
                try:
                    undo()
                except Exception as undo_exc:  # the node is in an unknown state: say so; ERROR -> on_error
                    log.error(f"undoing the failed {name} failed too: {type(undo_exc).__name__}: {undo_exc}")
                    return TransitionCallbackReturn.ERROR
            return TransitionCallbackReturn.FAILURE
        log.info(f"lifecycle {name}: now {self._phase}")
        return TransitionCallbackReturn.SUCCESS


__all__ = ["ManagedPerceptionNode"]
