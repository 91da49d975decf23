"""The node's task: encoded once per change, swapped in one assignment, carrying a revision.

Control callbacks (``set_task``, the ``task`` topic, ``segment_image`` with a task of its own)
encode text here; the inference thread only reads :attr:`TaskSwitch.active`, one snapshot per
frame, so a result never mixes two tasks. No ROS and no torch here: the segmenter's
``encode_task``, the status publisher and the logger are handed in.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from toist_core.inference.warn_once import WarnOnce
from toist_core.tasks import quote

ONE_SHOT_TASK_CACHE = 8       # encoded one-shot tasks kept (segment_image with its own task text)
# The revision of a segment_image result computed for a task of its own (not the active task).
# Active tasks count from 1, so 0 cannot be mistaken for an active-task result.
ONE_SHOT_REVISION = 0
CLOSED = "the node released its model (lifecycle cleanup)"


@dataclass(frozen=True)
class ActiveTask:
    """One consistent task snapshot: a frame uses exactly one of these."""

    request: str     # what was asked ("2", "sit comfortably on", free text)
    caption: str     # what the model reads
    task_id: Optional[int]
    revision: int
    state: Any       # the segmenter's encoded task (cached text features)

    @property
    def warning(self) -> str:
        """Why this task's results mean little (the model was not trained on it), else ""."""
        return getattr(self.state, "warning", None) or ""


def loading_task(request: Any) -> ActiveTask:
    """The task asked for at start-up, before the model is there to encode it (revision 0)."""
    return ActiveTask(str(request), str(request), None, 0, None)


class TaskSwitch:
    """The active task of one node, and the encoded tasks of ``segment_image`` requests.

    ``encode``: the segmenter's ``encode_task`` (text -> encoded state; raises ValueError or
    TypeError for an unusable task). ``publish``: called with every new active task while the
    swap lock is held, so ``active_task`` messages go out in revision order. ``logger``: the
    node's logger (``info`` / ``warning`` / ``error``).
    """

    def __init__(self, encode: Callable[[Any], Any], publish: Callable[[ActiveTask], None], logger: Any) -> None:
        self._encode_task = encode
        self._publish = publish
        self._log = logger
        self._task: Optional[ActiveTask] = None
        self._lock = threading.Lock()          # task swaps (and their status messages)
        self._encode_lock = threading.Lock()
        self._one_shot_tasks: collections.OrderedDict = collections.OrderedDict()
        self._one_shot_lock = threading.Lock()
        self._warned = WarnOnce()  # tasks whose "not trained on" warning was logged (once each)
        self._closed = False       # close(): the node released its model

    @property
    def active(self) -> ActiveTask:
        return self._task

    def start(self, request: Any) -> ActiveTask:
        """Encode the start-up task as revision 1 (not published: the node does that when ready).
        Raises ValueError / TypeError for an unusable task."""
        state = self._encode(request)
        self._task = ActiveTask(str(request), _caption(state, request), _task_id(state), 1, state)
        self._warn_untrained(self._task)
        return self._task

    def publish_active(self) -> None:
        """Publish the active task again (``ready`` changed)."""
        with self._lock:
            if not self._closed:
                self._publish(self._task)

    def close(self) -> None:
        """No task change and no status message from now on (the node released its model:
        lifecycle cleanup); a change still being encoded is refused when its encoding ends."""
        with self._lock:
            self._closed = True

    def set(self, text: str) -> tuple[bool, str, int]:
        """Encode ``text`` and make it the active task; (success, message, revision).

        The active task asked for again (``ros2 topic pub`` repeats its message every second)
        changes nothing: no encoding when the text is the same, no new revision (results would
        look outdated), no log line; ``active_task`` is published again, so that a client
        watching it sees its request taken."""
        text = text.strip()
        if not text:
            return False, ("task is empty: give a task id of the model's vocabulary (COCO-Tasks: 1..14), a task name "
                           "or free text"), self._task.revision
        unchanged = self._unchanged(text, lambda active: text == active.request.strip())
        if unchanged is not None:
            return unchanged
        try:
            state = self._encode(text)
        except (ValueError, TypeError) as exc:
            return False, f"task {quote(text)} rejected: {exc}", self._task.revision
        except Exception as exc:  # never let a task request take the node down
            self._log.error(f"encoding task {quote(text)} failed: {type(exc).__name__}: {exc}")
            return False, f"encoding task {quote(text)} failed: {type(exc).__name__}: {exc}", self._task.revision
        caption, task_id = _caption(state, text), _task_id(state)
        unchanged = self._unchanged(text, lambda active: (caption, task_id) == (active.caption, active.task_id))
        if unchanged is not None:  # another name of the active task ("2" for "sit comfortably on")
            return unchanged
        with self._lock:
            if self._closed:
                return False, f"task {quote(text)} not taken: {CLOSED}", self._task.revision
            revision = self._task.revision + 1
            task = ActiveTask(text, caption, task_id, revision, state)
            self._task = task  # one assignment: a frame sees the old or the new task, never a mix
            self._publish(task)
        how = (f"task {task.task_id} of the model's vocabulary" if task.task_id is not None
               else "free text (no task id: no distillation memory bank)")
        message = f"task {quote(text)} -> caption {quote(task.caption)} ({how}); results carry revision {revision}"
        self._log.info(message)
        self._warn_untrained(task)
        if task.warning:
            message += f"; WARNING: {task.warning}"
        return True, message, revision

    def _unchanged(self, text: str, same: Callable[[ActiveTask], bool]) -> Optional[tuple[bool, str, int]]:
        """The reply to a request for the active task (``same(active)``), said again on
        ``active_task``; None when the active task is another one (changed meanwhile)."""
        with self._lock:
            active = self._task
            if self._closed:
                return False, f"task {quote(text)} not taken: {CLOSED}", active.revision
            if not same(active):
                return None
            self._publish(active)
        return True, (f"task {quote(text)} is the active task already (caption {quote(active.caption)}, revision "
                      f"{active.revision}): nothing changed"), active.revision

    def one_shot(self, text: str) -> ActiveTask:
        """The encoded task for one ``segment_image`` request (the active task stays as it is);
        the last few are cached. Its revision is :data:`ONE_SHOT_REVISION` unless ``text`` names
        the active task, however spelt ("2", "task_2", its phrase: as ``set`` judges it): then
        the active task itself. Raises what the encoder raises."""
        text = text.strip()
        if text == self._task.request.strip():
            return self._task
        with self._one_shot_lock:
            task = self._one_shot_tasks.get(text)
            if task is not None:
                self._one_shot_tasks.move_to_end(text)
        if task is None:
            state = self._encode(text)
            task = ActiveTask(text, _caption(state, text), _task_id(state), ONE_SHOT_REVISION, state)
            with self._one_shot_lock:
                self._one_shot_tasks[text] = task
                while len(self._one_shot_tasks) > ONE_SHOT_TASK_CACHE:
                    self._one_shot_tasks.popitem(last=False)
        active = self._task  # now: it may have changed while the text was encoded
        return active if (task.caption, task.task_id) == (active.caption, active.task_id) else task

    def _encode(self, task: Any) -> Any:
        """Encode a task's text once (the expensive part of a task change).

        One encoding at a time: a fast tokenizer used from two threads at once can fail
        ("Already borrowed"). Frames never wait for this lock; they use encoded states.
        """
        with self._encode_lock:
            return self._encode_task(task)

    def _warn_untrained(self, task: ActiveTask) -> None:
        """Log a WARN the first time the node's task becomes one the model was not trained on.

        Once per task (its id, or its caption for free text), as ``TaskSegmenter.set_task``
        warns: a robot that switches back and forth should not fill the log; ``active_task``
        says it on every change.
        """
        if not task.warning:
            return
        key = task.task_id if task.task_id is not None else task.caption
        if not self._warned.first(key):
            return
        self._log.warning(f"task {quote(task.request)} ({quote(task.caption)}): {task.warning}")


def _caption(state: Any, fallback: Any) -> str:
    return str(getattr(state, "caption", fallback))


def _task_id(state: Any) -> Optional[int]:
    return getattr(state, "task_id", None)


__all__ = ["ActiveTask", "ONE_SHOT_REVISION", "TaskSwitch", "loading_task"]
