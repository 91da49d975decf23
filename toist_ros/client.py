"""Talk to a running perception node without the `ros2` CLI (the development environment has
rclpy but no ros2cli): set the task, publish a task, segment one image, read ``instances`` or
``active_task``.

    python -m toist_ros.client set-task 3
    python -m toist_ros.client publish-task "open bottle of beer with"
    python -m toist_ros.client segment photo.jpg [--task 8]
    python -m toist_ros.client instances [--count 3]
    python -m toist_ros.client status

``--ns /front`` addresses a node started in a namespace. Exit status 0 on success, 1 when the
node refused or did not answer within ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Optional, Sequence

from toist_ros.arg_types import at_least, seconds


def _topic(namespace: str, name: str) -> str:
    return f"{namespace.rstrip('/')}/{name}" if namespace.strip("/") else name


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class _Session:
    """rclpy context + one node spinning in a background thread."""

    def __init__(self) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("toist_client", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        from toist_ros.service_call import spin_in_background

        self._thread = spin_in_background(self.executor)

    def call(self, kind: Any, name: str, request: Any, timeout: float) -> Any:
        from toist_ros.service_call import call_service

        return call_service(self.node.create_client(kind, name), request, timeout,
                            hint=" (is the node running, in this namespace and ROS_DOMAIN_ID?)")

    def close(self) -> None:
        import rclpy

        self.executor.shutdown()
        self._thread.join(timeout=5)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def set_task(session: _Session, namespace: str, text: str, timeout: float) -> int:
    from toist_ros.srv import SetTask

    response = session.call(SetTask, _topic(namespace, "set_task"), SetTask.Request(task=text), timeout)
    print(f"{'ok' if response.success else 'refused'}: {response.message}")
    return 0 if response.success else 1


def publish_task(session: _Session, namespace: str, text: str, timeout: float) -> int:
    """Publish on the task topic, then watch the latched ``active_task`` for the message that
    says the node took it (a new revision, or the active task said again when it was asked for):
    a topic has no reply, and a refused task changes nothing there."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from std_msgs.msg import String

    from toist_core.tasks import names_task

    statuses = _latched_status(session, namespace)
    publisher = session.node.create_publisher(String, _topic(namespace, "task"),
                                              QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
    if not _wait(lambda: publisher.get_subscription_count() > 0 and bool(statuses), timeout):
        print(f"nobody subscribes {publisher.topic_name}, or no active_task, within {timeout:g} s "
              "(is the node running?)", file=sys.stderr)
        return 1
    seen = len(statuses)
    publisher.publish(String(data=text))
    # A status after the publish that names the task asked for (a new revision, or the active
    # task said again): any new revision passed, and a lifecycle node activating published its
    # start-up task's, so a refused task read "ok".
    if not _wait(lambda: len(statuses) > seen and names_task(text, statuses[-1].task_id, statuses[-1].task),
                 timeout):
        print(f"published {text!r} on {publisher.topic_name}, but the node did not take it within {timeout:g} s "
              "(refused: its log says why; `set-task` answers with the reason)", file=sys.stderr)
        return 1
    print(f"ok: {_status_text(statuses[-1])}")
    return 0


def segment(session: _Session, namespace: str, path: str, task: str, timeout: float) -> int:
    from toist_core.visualize import load_rgb
    from toist_ros.conversions import image_from_array
    from toist_ros.srv import SegmentImage

    try:
        rgb = load_rgb(path)  # the pixels `toist predict` and training read (EXIF orientation ignored)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    request = SegmentImage.Request(image=image_from_array(rgb, "rgb8"), task=task)
    request.image.header.frame_id = "toist_client"
    response = session.call(SegmentImage, _topic(namespace, "segment_image"), request, timeout)
    print(f"{'ok' if response.success else 'refused'}: {response.message}")
    if not response.success:
        return 1
    print(_instances_text(response.result))
    return 0


def read_instances(session: _Session, namespace: str, count: int, timeout: float) -> int:
    from toist_ros.msg import TaskInstances

    received: list = []
    session.node.create_subscription(TaskInstances, _topic(namespace, "instances"), received.append, 10)
    if not _wait(lambda: len(received) >= count, timeout):
        print(f"{len(received)} of {count} TaskInstances messages within {timeout:g} s (is a camera "
              "publishing on the node's image topic?)", file=sys.stderr)
    for msg in received[:count]:
        print(_instances_text(msg))
    return 0 if len(received) >= count else 1


def _latched_status(session: _Session, namespace: str) -> list:
    """The ``active_task`` messages as they arrive (the latched one first)."""
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    from toist_ros.msg import TaskStatus

    received: list = []
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    session.node.create_subscription(TaskStatus, _topic(namespace, "active_task"), received.append, latched)
    return received


def _status_text(msg: Any) -> str:
    if not msg.ready and msg.revision == 0:  # the start-up task, before the model has encoded it
        return (f"task {msg.task!r} (not ready: the model is loading, or a lifecycle node waits to be "
                "configured)")
    return (f"task {msg.task!r} (id {msg.task_id or 'none: free text'}), revision {msg.revision}, "
            f"ready {msg.ready}" + (f"; WARNING: {msg.warning}" if msg.warning else ""))


def status(session: _Session, namespace: str, timeout: float) -> int:
    received = _latched_status(session, namespace)
    if not _wait(lambda: bool(received), timeout):
        print(f"no active_task within {timeout:g} s (is the node running?)", file=sys.stderr)
        return 1
    print(_status_text(received[-1]))
    return 0


def _instances_text(msg: Any) -> str:
    lines = [f"{msg.header.frame_id or '-'} {msg.image_width}x{msg.image_height}: task {msg.task!r} "
             f"(id {msg.task_id}, revision {msg.task_revision}), {len(msg.instances)} instance(s), "
             f"inference {msg.inference_ms:.0f} ms"]
    for inst in msg.instances:
        box = ", ".join(f"{v:.0f}" for v in inst.box)
        lines.append(f"  #{inst.rank} score {inst.score:.3f} box [{box}] mask {inst.mask_area} px")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toist_ros.client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ns", default="", help="the node's namespace (e.g. /front)")
    parser.add_argument("--timeout", type=seconds, default=20.0,
                        help="seconds to wait for the node, per wait: a service call waits this long for the "
                             "service, then this long for its answer (inf: no limit)")
    # The same two options after the command too (`segment photo.jpg --timeout 120` was refused);
    # SUPPRESS: a command that is not given them leaves the values above as they are.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ns", default=argparse.SUPPRESS, help="the node's namespace (e.g. /front)")
    common.add_argument("--timeout", type=seconds, default=argparse.SUPPRESS,
                        help="seconds to wait for the node, per wait (see the main --help)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("set-task", help="call set_task", parents=[common]).add_argument("task")
    commands.add_parser("publish-task", help="publish on the task topic (exit 1 if the node does not take it "
                        "within --timeout)", parents=[common]).add_argument("task")
    seg = commands.add_parser("segment", help="call segment_image on an image file", parents=[common])
    seg.add_argument("image")
    seg.add_argument("--task", default="", help="a task for this image only (default: the active task)")
    inst = commands.add_parser("instances", help="print TaskInstances messages", parents=[common])
    inst.add_argument("--count", type=at_least(1), default=1)
    commands.add_parser("status", help="print the latched active_task", parents=[common])
    args = parser.parse_args(argv)
    from rclpy.exceptions import NameValidationException

    session = _Session()
    try:
        if args.command == "set-task":
            return set_task(session, args.ns, args.task, args.timeout)
        if args.command == "publish-task":
            return publish_task(session, args.ns, args.task, args.timeout)
        if args.command == "segment":
            return segment(session, args.ns, args.image, args.task, args.timeout)
        if args.command == "instances":
            return read_instances(session, args.ns, args.count, args.timeout)
        return status(session, args.ns, args.timeout)
    except TimeoutError as exc:
        hint = (f"; give it more time with --timeout SECONDS (a paper-size model on a CPU takes tens of seconds "
                "a frame)" if "did not answer" in str(exc) else "")
        print(f"{exc}{hint}", file=sys.stderr)
        return 1
    except NameValidationException as exc:
        print(f"--ns {args.ns!r}: not a usable ROS namespace ({exc})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # Ctrl-C while waiting (--timeout inf, a wrong namespace): no traceback
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        session.close()


if __name__ == "__main__":
    sys.exit(main())
