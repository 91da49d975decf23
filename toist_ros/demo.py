"""`make demo`: the real perception node, a camera stand-in, over DDS.

    python -m toist_ros.demo                       # embedded default model (synthetic world)
    python -m toist_ros.demo --checkpoint toist.pth

1. starts the perception node as its own process (the installed ``perception_node`` with the
   package's ``config/perception.yaml``, its ``image`` remapped to the stand-in camera),
2. waits for ``active_task`` to say ready, sets the task through the ``set_task`` service,
3. publishes, in turn and in every supported encoding: with the embedded default model,
   held-out synthetic scenes (the test split of the world it was trained on) and then
   scikit-image's sample photos (coffee, chelsea, astronaut, rocket, camera), where it will
   find little; with a checkpoint, the photos; and collects ``instances`` carrying the new
   revision,
4. asks the one-shot service ``segment_image`` for images with other tasks: with the embedded
   default model, as many held-out scenes of each of its other tasks (so the report covers every
   task it knows); with a checkpoint, one photo,
5. writes an overlay per result (drawn from the received messages: boxes, mask crops put
   back in place) and a report under ``out/demo/``: per frame the task, the instances and, on
   synthetic scenes, whether they are the right objects (IoU >= 0.5 with a preferred object);
   the model's synthetic test mAP; latency p50/p95; with the embedded model, the node runs with
   ``depth.enabled`` and the stand-in publishes a depth image and CameraInfo with each synthetic
   scene (a 3D layout of its shapes, ``toist_ros.demo_depth``): the report gives every instance's
   3D centroid next to the true one of the object it covers,
6. stops the node (SIGINT) and exits 0 when everything above worked. Stopped by Ctrl-C or
   SIGTERM it stops the node the same way; killed outright, its node gets a SIGTERM from Linux.

ROS traffic stays on this machine (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST unless set) in a
random ROS_DOMAIN_ID unless one is set.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Optional

import numpy as np

from toist_core.json_text import dumps_null_for_nan
from toist_core.listing import listing
from toist_core.parent_death import signal_when_parent_dies
from toist_ros.arg_types import at_least, positive_rate, seconds
from toist_ros.service_call import ServerGone

# One namespace per run: two demos in one ROS domain took each other's results.
NAMESPACE = f"/toist_demo_{os.getpid()}"
CAMERA_TOPIC = f"{NAMESPACE}/camera/image"
# The embedded model knows the recipe's tasks only (toist_core/assets/default_model/MODEL_CARD.md).
DEPTH_TOPIC, CAMERA_INFO_TOPIC = f"{NAMESPACE}/camera/depth", f"{NAMESPACE}/camera/camera_info"
DEFAULT_TASK = "sit comfortably on"
CHECKPOINT_TASK, CHECKPOINT_ONE_SHOT_TASK = "place flowers in", "open bottle of beer with"
ONE_SHOT_PHOTO = "astronaut"
# Synthetic scenes are ~100 px: overlays are drawn this many times larger to be readable.
SCENE_OVERLAY_SCALE = 4
# In --out: the files a demo run writes (recorded as it writes them, so that a run stopped half-way
# is known too), the only ones a later run removes or replaces.
WRITTEN_LIST = ".toist_demo_files"
REPORT_FILES = ("report.md", "report.json", "node.log")


@dataclass
class _OneShot:
    """An image sent to ``segment_image`` with a task; ``scene`` when it is a held-out scene."""

    task: str
    name: str
    pixels: np.ndarray
    scene: Optional[Any] = None


class _Plan:
    """What the demo shows: the model, the tasks, the frames and what is known about them."""

    def __init__(self, args: argparse.Namespace) -> None:
        from toist_core.tasks import resolve_task, task_phrase
        from toist_ros.camera_standin import load_photos
        from toist_ros.demo_scenes import held_out_scenes, model_metrics
        from toist_ros.model_loader import default_model_dir

        model_dir = None if args.checkpoint else default_model_dir()
        self.metrics = model_metrics(model_dir) if model_dir is not None else None
        trained_default = self.metrics is not None
        self.task = args.task or (DEFAULT_TASK if trained_default else CHECKPOINT_TASK)
        self.one_shot_task = args.one_shot_task or CHECKPOINT_ONE_SHOT_TASK
        # The node's start-up task ("" = its params file's, task 2): another of the model's tasks,
        # so that set_task switches for real and the results of the task before are told apart.
        self.start_task = ""
        self.scenes = {}
        self.one_shots: list[_OneShot] = []
        self.short_side = args.short_side
        self.photos = dict(load_photos())
        if trained_default:
            settings = self.metrics["settings"]
            task_id = resolve_task(self.task).task_id
            self.start_task = next((str(t) for t in settings["tasks"] if t != task_id), "")
            if task_id is not None:
                self.scenes = {s.name: s for s in held_out_scenes(settings, task_id, args.scenes)}
            # The same number of held-out scenes of every other task the model knows (or of the
            # --one-shot-task alone), so the verdict is not that of one task.
            others = ([resolve_task(args.one_shot_task).task_id] if args.one_shot_task
                      else [t for t in settings["tasks"] if t != task_id])
            for other in (t for t in others if t is not None):
                self.one_shots += [_OneShot(task_phrase(other), s.name, s.pixels, s)
                                   for s in held_out_scenes(settings, other, args.scenes)]
        elif not args.checkpoint:
            self.short_side = self.short_side or 320  # the random fallback: any size shows the plumbing
        if not self.one_shots:
            self.one_shots = [_OneShot(self.one_shot_task, ONE_SHOT_PHOTO, self.photos[ONE_SHOT_PHOTO])]
        self.frames = [(s.name, s.pixels) for s in self.scenes.values()] + list(self.photos.items())
        # A 3D layout for each camera scene: depth image, camera, true object centroids.
        from toist_ros.demo_depth import scene_depth

        self.depth = {name: scene_depth(s.objects, *s.pixels.shape[:2]) for name, s in self.scenes.items()}
        self.frame_count = args.frames or len(self.frames)

    def pixels(self, name: str) -> Optional[np.ndarray]:
        if name in self.scenes:
            return self.scenes[name].pixels
        return self.photos.get(name)


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m toist_ros.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="", help="TOIST .pth or model directory (default: embedded model)")
    parser.add_argument("--text-encoder", default="", help="tokenizer/text encoder for an official .pth")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--task", default="", help="task set through the set_task service (default: "
                        f"{DEFAULT_TASK!r} with the embedded model, {CHECKPOINT_TASK!r} with a checkpoint)")
    parser.add_argument("--one-shot-task", default="", help="task of the segment_image calls (default: every "
                        "other task of the embedded model, on its held-out scenes; with a checkpoint "
                        f"{CHECKPOINT_ONE_SHOT_TASK!r} on a photo)")
    parser.add_argument("--scenes", type=at_least(0), default=5,
                        help="held-out synthetic scenes per task (embedded model only)")
    parser.add_argument("--frames", type=at_least(0), default=0,
                        help="frames the camera stand-in publishes (default: every scene and photo once)")
    parser.add_argument("--rate", type=positive_rate, default=5.0, help="camera frame rate (Hz)")
    parser.add_argument("--short-side", type=at_least(0), default=0,
                        help="model input short side (default: the size the model was trained at, which a "
                             "model directory records; 800 for an official .pth)")
    parser.add_argument("--out", default="out/demo", help="output directory")
    parser.add_argument("--ready-timeout", type=seconds, default=600.0, help="seconds to wait for the model to load")
    return parser.parse_args(argv)


MAX_DOMAIN_ID = 232  # the highest id whose DDS ports fit (ROS 2 docs, "The ROS_DOMAIN_ID")


def _ros_environment() -> None:
    """Loopback discovery and a random domain unless the environment names them; ValueError for
    a domain id DDS cannot use (Fast DDS ended the process from C, the node left running)."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    if not os.environ.get("ROS_DOMAIN_ID", "").strip():  # unset or empty (rcl's domain 0): a random one
        os.environ["ROS_DOMAIN_ID"] = str(random.randint(1, 100))
    domain = os.environ["ROS_DOMAIN_ID"].strip()
    if not (domain.isascii() and domain.isdigit()) or int(domain) > MAX_DOMAIN_ID:
        raise ValueError(f"ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']!r}: a domain id is a whole number "
                         f"0..{MAX_DOMAIN_ID}")


def _raise_system_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _node_command(args: argparse.Namespace, short_side: int, depth: bool = False, start_task: str = "") -> list[str]:
    """The installed perception_node (what `ros2 run toist_ros perception_node` runs) with its params file."""
    try:
        from ament_index_python.packages import get_package_prefix, get_package_share_directory

        executable = Path(get_package_prefix("toist_ros")) / "lib" / "toist_ros" / "perception_node"
        params = Path(get_package_share_directory("toist_ros")) / "config" / "perception.yaml"
        command = [sys.executable, str(executable)]
    except Exception:  # not colcon-installed: run the module from the source tree
        params = Path(__file__).resolve().parents[1] / "config" / "perception.yaml"
        command = [sys.executable, "-m", "toist_ros.perception_node"]
    ros_args = ["--ros-args", "--params-file", str(params), "-r", f"__ns:={NAMESPACE}", "-r", f"image:={CAMERA_TOPIC}",
                "-p", f"device:={args.device}", "-p", "input.max_age_s:=0.0",
                # Reliable camera and subscription: raw photos of ~1 MB over best-effort UDP between
                # processes can be lost entirely on machines with small socket buffers (docs/ros.md).
                "-p", "input.reliability:=reliable"]
    if short_side:
        ros_args += ["-p", f"input.short_side:={short_side}", "-p", f"input.max_side:={2 * short_side}"]
    if args.checkpoint:
        ros_args += ["-p", f"checkpoint:={_yaml_string(os.path.abspath(args.checkpoint))}"]
    if args.text_encoder:
        ros_args += ["-p", f"text_encoder:={_yaml_string(args.text_encoder)}"]
    if depth:
        ros_args += ["-p", "depth.enabled:=true", "-r", f"depth:={DEPTH_TOPIC}", "-r", f"camera_info:={CAMERA_INFO_TOPIC}"]
    if start_task:   # a string parameter: "1", not the integer 1
        ros_args += ["-p", f"task:={_yaml_string(start_task)}"]
    return command + ros_args


def _yaml_string(text: str) -> str:
    """``text`` as a YAML double-quoted string, the form a ``-p name:=value`` keeps whole: rcl
    reads the value as YAML ("runs/exp #1" lost its "#1" as a comment, "a: b" did not parse, a
    task with a quote broke its single quotes). JSON's string escapes are YAML's; characters are
    kept as they are (an emoji as JSON's surrogate-pair escapes is no YAML rcl reads), except
    those YAML does not take in a stream (DEL, the C1 controls: refused, or NEL read as a line
    break), which go as escapes."""
    import json
    import re

    return re.sub("[\x7f-\x9f\ufffe\uffff]", lambda found: f"\\u{ord(found[0]):04x}",
                  json.dumps(text, ensure_ascii=False))


class _Client:
    """The demo's own ROS side: status, results, services, and the camera stand-in."""

    def __init__(self, args: argparse.Namespace, plan: _Plan) -> None:
        import rclpy
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from toist_ros.camera_standin import CameraStandIn
        from toist_ros.msg import TaskInstances, TaskStatus
        from toist_ros.srv import SegmentImage, SetTask

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("toist_demo_client", context=self.context)
        self.lock = threading.Lock()
        self.status: list = []
        self.results: list[tuple[float, Any]] = []
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.node.create_subscription(TaskStatus, f"{NAMESPACE}/active_task", self._keep_status, latched)
        self.node.create_subscription(TaskInstances, f"{NAMESPACE}/instances", self._keep_result, 50)
        self.set_task_client = self.node.create_client(SetTask, f"{NAMESPACE}/set_task")
        self.segment_client = self.node.create_client(SegmentImage, f"{NAMESPACE}/segment_image")
        self.camera = CameraStandIn(plan.frames, CAMERA_TOPIC, args.rate, plan.frame_count,
                                    frame_id="standin_camera", reliable=True, start=False, context=self.context,
                                    depth={name: (d.depth_mm, d.camera) for name, d in plan.depth.items()},
                                    depth_topic=DEPTH_TOPIC, camera_info_topic=CAMERA_INFO_TOPIC)
        self.executor = MultiThreadedExecutor(num_threads=3, context=self.context)
        self.executor.add_node(self.node)
        self.executor.add_node(self.camera)
        from toist_ros.service_call import spin_in_background

        self._thread = spin_in_background(self.executor)

    def _keep_status(self, msg: Any) -> None:
        with self.lock:
            self.status.append(msg)

    def _keep_result(self, msg: Any) -> None:
        with self.lock:
            self.results.append((time.time(), msg))

    def call(self, client: Any, request: Any, timeout: float, node: subprocess.Popen) -> Any:
        """``request``'s response; :class:`ServerGone` at once when the ``node`` process exits."""
        from toist_ros.service_call import call_service

        return call_service(client, request, timeout, server_gone=lambda: (
            f"the node exited with code {node.returncode} before answering" if node.poll() is not None else None))

    def close(self) -> None:
        import rclpy

        self.executor.shutdown()
        self._thread.join(timeout=10)
        self.camera.destroy_node()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)


def _wait(predicate, timeout: float, process: subprocess.Popen, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(interval)
    return predicate()


def _overlay(rgb: np.ndarray, msg: Any, note: str = "", scale: int = 1) -> np.ndarray:
    """RGB overlay of a received TaskInstances: boxes, scores and the mask crops put back in
    place; drawn ``scale`` times larger (nearest-neighbour) for small synthetic scenes."""
    from toist_core.visualize import draw_instances
    from toist_ros.instances import full_mask

    height, width = rgb.shape[:2]
    boxes = np.array([list(i.box) for i in msg.instances], dtype=np.float32).reshape(-1, 4) * scale
    scores = np.array([i.score for i in msg.instances], dtype=np.float32)
    masks = None
    # An instance without a mask (a box clamped to nothing) draws none; the others still do.
    if any(i.mask.width > 0 for i in msg.instances):
        masks = np.stack([full_mask(i, width, height) for i in msg.instances])
        masks = masks.repeat(scale, axis=1).repeat(scale, axis=2)
    rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
    return draw_instances(rgb, boxes, scores, masks, title=f"{msg.task} (revision {msg.task_revision}){note}")


def _as_rgb(pixels: np.ndarray) -> np.ndarray:
    return pixels if pixels.ndim == 3 else np.repeat(pixels[:, :, None], 3, axis=2)


def _quantiles(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    p50, p95 = np.quantile(np.asarray(values, dtype=np.float64), [0.5, 0.95])
    return float(p50), float(p95)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    try:
        _ros_environment()
    except ValueError as exc:
        print(f"toist demo: error: {exc}", file=sys.stderr)
        return 2
    # SIGTERM ends the demo as Ctrl-C does: through the clean-up below, which stops the node
    # (it was left running, orphaned).
    signal.signal(signal.SIGTERM, _raise_system_exit)
    out = Path(args.out)
    from toist_ros.model_loader import DEFAULT_MODEL_NOTE, FALLBACK_MODEL_NOTE, DEFAULT_MODEL_DIR

    print(f"toist demo: ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']}, "
          f"discovery {os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE']}; outputs in {out}/")
    try:
        plan = _Plan(args)
    except ValueError as exc:  # e.g. --task 15 for a model of 14 tasks
        print(f"toist demo: error: {exc}", file=sys.stderr)
        return 2
    problem = _out_problem(out)
    if problem:   # a user's pictures there were deleted, their report.md replaced
        print(f"toist demo: error: {problem}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    for name in _written_before(out):   # an earlier run's files only
        (out / name).unlink(missing_ok=True)
    _record_written(out, *REPORT_FILES, fresh=True)
    if not args.checkpoint:
        note = DEFAULT_MODEL_NOTE if plan.metrics is not None else FALLBACK_MODEL_NOTE.format(path=DEFAULT_MODEL_DIR)
        print(f"toist demo: NOTE: {note}.")
    command = _node_command(args, plan.short_side, depth=bool(plan.depth), start_task=plan.start_task)
    log_path = out / "node.log"
    print("toist demo: starting the node:", " ".join(command))
    log = open(log_path, "w")
    node, client = None, None
    code = 1
    try:  # from the node's start: a stop signal at any point after it stops the node too
        node = _start_node(command, log)
        client = _Client(args, plan)
        code = _run(args, plan, client, node, out)
    except KeyboardInterrupt:
        code = 130
    except (TimeoutError, ServerGone) as exc:  # a service call the node did not answer: the summary below says why
        print(f"toist demo: {exc}", file=sys.stderr)
        code = 1
    finally:
        if client is not None:
            client.close()
        if node is not None and node.poll() is None:
            node.send_signal(signal.SIGINT)
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        log.close()
    node_code = node.returncode
    if code == 0 and node_code != 0:
        print(f"toist demo: the node exited with code {node_code}; see {log_path}", file=sys.stderr)
        code = 1
    if code != 0:
        tail = log_path.read_text()[-3000:]
        print(f"toist demo: FAILED (exit {code}). Last node output ({log_path}):\n{tail}", file=sys.stderr)
    return code


def _start_node(command: list[str], log: IO[str]) -> subprocess.Popen:
    """The node process, sent SIGTERM (its normal stop) when the demo exits however it exits: a
    demo killed outright (SIGKILL) runs no clean-up and left its node running, orphaned."""
    demo = os.getpid()

    def end_with_the_demo() -> None:   # in the child, before exec
        if not signal_when_parent_dies(signal.SIGTERM, demo):
            os._exit(128 + signal.SIGTERM)

    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=end_with_the_demo)


def _run(args: argparse.Namespace, plan: _Plan, client: _Client, node: subprocess.Popen, out: Path) -> int:
    from toist_ros.conversions import image_from_array
    from toist_ros.srv import SegmentImage, SetTask

    start = time.monotonic()
    print("toist demo: waiting for the node to load the model ...", flush=True)
    if not _wait(lambda: any(s.ready for s in client.status), args.ready_timeout, node):
        exited = f" (exit code {node.returncode})" if node.poll() is not None else ""
        print(f"toist demo: the node did not become ready{exited}", file=sys.stderr)
        return 1
    print(f"toist demo: node ready after {time.monotonic() - start:.1f} s")

    response = client.call(client.set_task_client, SetTask.Request(task=plan.task), timeout=60, node=node)
    if not response.success:
        print(f"toist demo: set_task refused: {response.message}", file=sys.stderr)
        return 1
    revision = response.revision
    print(f"toist demo: set_task -> {response.message}")

    if not _wait(lambda: client.camera.publisher.get_subscription_count() > 0, 30, node):
        print("toist demo: the node does not subscribe to the camera topic", file=sys.stderr)
        return 1
    client.camera.start()
    _wait(client.camera.done.is_set, plan.frame_count / args.rate + 30, node)

    def last_frame_answered():
        with client.lock:
            stamps = {(m.header.stamp.sec, m.header.stamp.nanosec) for _, m in client.results}
        return bool(client.camera.sent) and max(client.camera.sent) in stamps
    # The node always processes the newest frame, so the last one published gets its result.
    _wait(last_frame_answered, 120, node)

    with client.lock:  # (this run's namespace: no other demo's results reach it)
        results = [(t, m) for t, m in client.results if m.task_revision == revision]
        stale = sum(1 for _, m in client.results if m.task_revision != revision)
    if not results:
        print("toist demo: no result carried the revision set_task returned", file=sys.stderr)
        return 1

    note = " - RANDOM WEIGHTS, meaningless" if not args.checkpoint and plan.metrics is None else ""
    # The embedded model knows synthetic scenes only: a photo's overlay, shared without the
    # report, must not look like a real detection.
    photo_note = note or (" - synthetic-only model: meaningless on photos" if not args.checkpoint else "")
    rows, latencies, node_latencies, inference = [], [], [], []
    for index, (received, msg) in enumerate(results):
        name = client.camera.sent.get((msg.header.stamp.sec, msg.header.stamp.nanosec), "?")
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        latencies.append(1000.0 * (received - stamp))
        node_latencies.append(msg.latency_ms)
        inference.append(msg.inference_ms)
        row = {"frame": index, "image": name, "size": f"{msg.image_width}x{msg.image_height}",
               "latency_ms": round(latencies[-1], 1), "overlay": "", **_result_cells(msg, plan.scenes.get(name)),
               "positions": _positions(msg, plan.scenes.get(name), plan.depth.get(name))}
        pixels = plan.pixels(name)
        if pixels is not None:
            row["overlay"] = f"frame_{index:02d}_{name}.png"
            _save_overlay(out / row["overlay"], pixels, msg, note, row, photo_note)
        rows.append(row)

    one_shot_rows = []
    for index, shot in enumerate(plan.one_shots):
        request = SegmentImage.Request(image=image_from_array(_as_rgb(shot.pixels), "rgb8"), task=shot.task)
        request.image.header.frame_id = "standin_camera"
        request.image.header.stamp = client.node.get_clock().now().to_msg()
        answer = client.call(client.segment_client, request, timeout=120, node=node)
        if not answer.success:
            print(f"toist demo: segment_image failed: {answer.message}", file=sys.stderr)
            return 1
        row = {"call": index, "image": shot.name, "overlay": f"oneshot_{index:02d}_{shot.name}.png",
               **_result_cells(answer.result, shot.scene)}
        _save_overlay(out / row["overlay"], shot.pixels, answer.result, note, row, photo_note)
        one_shot_rows.append(row)

    model = _model_line(out / "node.log", bool(args.checkpoint))
    p50, p95 = _quantiles(latencies)
    n50, n95 = _quantiles(node_latencies)
    i50, i95 = _quantiles(inference)
    judged = [r for r in rows + one_shot_rows if r.get("top_right") is not None]
    report = {
        "model": model, "checkpoint": args.checkpoint or None, "device": args.device,
        "random_weights": not args.checkpoint and plan.metrics is None,
        "task": {"requested": plan.task, "caption": results[-1][1].task, "revision": revision},
        "frames_published": client.camera.published, "results": len(results),
        "results_of_the_previous_task": stale,
        "instances_per_frame": [r["instances"] for r in rows],
        # Held-out scenes of the camera and of segment_image together.
        "synthetic_frames": len(judged),
        "synthetic_top_right": sum(1 for r in judged if r["top_right"]),
        "synthetic_tasks": sorted({r["task"] for r in judged}),
        "synthetic_test_map50": _test_map(plan),
        "latency_ms": {"p50": round(p50, 1), "p95": round(p95, 1)},
        "node_latency_ms": {"p50": round(n50, 1), "p95": round(n95, 1)},
        "inference_ms": {"p50": round(i50, 1), "p95": round(i95, 1)},
        "one_shots": one_shot_rows,
        "frames": rows,
        "depth": _depth_summary(rows, results, bool(plan.depth)),
    }
    (out / "report.json").write_text(dumps_null_for_nan(report, indent=2) + "\n")  # null: no latency measured
    text = _report_text(report)
    (out / "report.md").write_text(text)
    print(text)
    return 0


def _result_cells(msg: Any, scene: Optional[Any]) -> dict:
    """The report's columns of one TaskInstances answer (camera frame or ``segment_image`` call)."""
    return {"task": msg.task, "instances": len(msg.instances),
            "best_score": round(msg.instances[0].score, 4) if msg.instances else None,
            "inference_ms": round(msg.inference_ms, 1), **_judgement(scene, msg)}


def _positions(msg: Any, scene: Optional[Any], depth: Optional[Any]) -> list[dict]:
    """Per instance with 3D: its centroid and the true centroid of the scene object its box
    overlaps most (``toist_ros.demo_depth``); empty without depth."""
    from toist_ros.demo_scenes import box_iou

    if scene is None or depth is None or not len(scene.boxes):
        return []
    out = []
    for inst in msg.instances:
        if not inst.has_3d:
            continue
        overlaps = box_iou(np.array([list(inst.box)], dtype=np.float64), scene.boxes)[0]
        if overlaps.max() <= 0:
            continue  # on no object (the background): no truth to compare with
        target = int(np.argmax(overlaps))
        got = np.array([inst.centroid.x, inst.centroid.y, inst.centroid.z])
        truth = depth.centroids[target]
        out.append({"rank": int(inst.rank), "centroid_m": [round(float(v), 3) for v in got],
                    "object": target, "box_iou": round(float(overlaps[target]), 2),
                    "truth_m": [round(float(v), 3) for v in truth],
                    "error_cm": round(100.0 * float(np.linalg.norm(got - truth)), 1)})
    return out


def _judgement(scene: Optional[Any], msg: Any) -> dict:
    """On a synthetic scene: whether the top instance hits a preferred object, and how many of the
    preferred objects some instance hits ("right": two instances on one object count once)."""
    from toist_ros.demo_scenes import IOU_RIGHT, box_iou

    if scene is None:
        return {"top_right": None, "right": None}
    boxes = np.array([list(i.box) for i in msg.instances], dtype=np.float64).reshape(-1, 4)
    if not len(boxes) or not len(scene.preferred_boxes):
        return {"top_right": False, "right": 0, "preferred": len(scene.preferred_boxes)}
    overlaps = box_iou(boxes, scene.preferred_boxes)  # [instances, preferred objects]
    hits = overlaps.max(axis=1) >= IOU_RIGHT
    found = {int(row.argmax()) for row, hit in zip(overlaps, hits) if hit}
    return {"top_right": bool(hits[0]), "right": len(found), "preferred": len(scene.preferred_boxes)}


def _written_before(out: Path) -> list[str]:
    """The files an earlier demo run wrote into ``out``: its record, else (runs before the record)
    the overlays its report.json lists; [] for none."""
    record = out / WRITTEN_LIST
    if record.is_file():
        return [name for name in record.read_text(encoding="utf-8").splitlines() if name and "/" not in name]
    report = _demo_report(out)
    rows = (report.get("frames") or []) + (report.get("one_shots") or []) if report is not None else []
    return [row["overlay"] for row in rows if isinstance(row, dict) and isinstance(row.get("overlay"), str)
            and row["overlay"] and "/" not in row["overlay"]]


def _demo_report(out: Path) -> Optional[dict]:
    """``out``'s report.json when a demo run wrote it (a mapping with its "frames" list), else None:
    a report.json of the user's own does not make the folder a demo's."""
    import json

    try:
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and isinstance(report.get("frames"), list) else None


def _out_problem(out: Path) -> str:
    """Why ``out`` cannot take this run's files ("" when it can): a file, or a folder holding files
    no demo run wrote (new, empty, or an earlier demo's folder are fine)."""
    if out.exists() and not out.is_dir():
        return f"--out {out}: a file, not a folder"
    if not out.is_dir() or (out / WRITTEN_LIST).is_file() or _demo_report(out) is not None:
        return ""   # new, or an earlier demo's (whose other files are left as they are)
    foreign = sorted(entry.name for entry in out.iterdir())
    if not foreign:
        return ""
    return (f"--out {out}: holds files no demo run wrote ({listing(foreign)}); nothing was removed: give a new or empty "
            "folder, or an earlier demo's")


def _record_written(out: Path, *names: str, fresh: bool = False) -> None:
    """Add ``names`` to ``out``'s record of the files this run writes (``fresh``: a new record)."""
    with open(out / WRITTEN_LIST, "w" if fresh else "a", encoding="utf-8") as record:
        record.writelines(f"{name}\n" for name in names)


def _save_overlay(path: Path, pixels: np.ndarray, msg: Any, note: str, row: dict, photo_note: str = "") -> None:
    """The overlay of one answer; on a judged (synthetic, ~100 px) scene enlarged and titled
    with its verdict; on a photo titled with ``photo_note``."""
    _record_written(path.parent, path.name)
    from toist_core.visualize import save_rgb

    judged = row["top_right"] is not None
    note = note if judged else photo_note
    verdict = f" - top {'RIGHT' if row['top_right'] else 'wrong'}" if judged else ""
    save_rgb(path, _overlay(_as_rgb(pixels), msg, note + verdict, SCENE_OVERLAY_SCALE if judged else 1))


def _judged_cells(row: dict) -> tuple[str, str]:
    """The report table's "right / preferred" and "top right" cells."""
    right = "-" if row["right"] is None else f"{row['right']} / {row['preferred']}"
    return right, "-" if row["top_right"] is None else ("yes" if row["top_right"] else "no")


def _depth_summary(rows: list[dict], results: list, enabled: bool) -> Optional[dict]:
    """How the 3D step went over the camera frames: statuses, and centroid errors of the
    instances that cover an object well (box IoU >= 0.5) and of all."""
    if not enabled:
        return None
    statuses = [m.depth_status for _, m in results]
    good = [p["error_cm"] for r in rows for p in r["positions"] if p["box_iou"] >= 0.5]
    every = [p["error_cm"] for r in rows for p in r["positions"]]
    return {"frames_paired": statuses.count(1), "frames_missing": statuses.count(2),
            "frames_unsynced": statuses.count(3), "instances_3d": len(every),
            "median_error_cm_box_iou_0.5": round(float(np.median(good)), 1) if good else None,
            "instances_box_iou_0.5": len(good),
            "median_error_cm_all": round(float(np.median(every)), 1) if every else None}


def _test_map(plan: _Plan) -> Optional[dict]:
    """The default model's synthetic test mAP@0.5 (its metrics.json), box and mask."""
    if plan.metrics is None:
        return None
    row = plan.metrics["rows"].get("distilled student", {})
    return {"box": row.get("mAP50/bbox"), "mask": row.get("mAP50/segm"), "tasks": plan.metrics.get("tasks")}


def _model_line(log_path: Path, has_checkpoint: bool) -> str:
    from toist_ros.model_loader import DEFAULT_MODEL_NOTE

    for line in log_path.read_text().splitlines():
        if "model: " in line:
            return line.split("model: ", 1)[1]
    return "checkpoint" if has_checkpoint else DEFAULT_MODEL_NOTE


def _report_text(report: dict) -> str:
    lines = ["# toist demo report", "", f"- model: {report['model']}"]
    if report["random_weights"]:
        lines.append("- **the boxes and masks below come from random weights: they are meaningless**; "
                     "run `make default-model`, or `make demo CHECKPOINT=<TOIST .pth or model dir>`")
    test_map = report["synthetic_test_map50"]
    if test_map is not None:
        mask = "-" if test_map["mask"] is None else f"{test_map['mask']:.3f}"
        lines.append(f"- the model's mAP@0.5 on the synthetic test split (its metrics.json, tasks {test_map['tasks']}): "
                     f"box {test_map['box']:.3f}, mask {mask}")
    lines += [
        f"- task (set through `set_task`): {report['task']['requested']!r} -> caption "
        f"{report['task']['caption']!r}, revision {report['task']['revision']}",
        f"- frames published by the camera stand-in: {report['frames_published']}; results with that revision: "
        f"{report['results']} (the node skips frames it cannot keep up with and always takes the newest)",
    ]
    if report["synthetic_frames"]:
        lines.append(f"- held-out synthetic scenes (camera and `segment_image`, {len(report['synthetic_tasks'])} "
                     f"tasks): the top instance is a right object (IoU >= 0.5 with an object the task prefers) "
                     f"on **{report['synthetic_top_right']} of {report['synthetic_frames']}**; the real photos are "
                     "outside the model's world")
    lines += [
        f"- latency publish -> result received, ms: p50 {report['latency_ms']['p50']}, "
        f"p95 {report['latency_ms']['p95']} (node's latency_ms field: p50 {report['node_latency_ms']['p50']}, "
        f"p95 {report['node_latency_ms']['p95']})",
        f"- inference (model) ms: p50 {report['inference_ms']['p50']}, p95 {report['inference_ms']['p95']}",
        "",
        "Camera frames (task set through `set_task`):",
        "",
        "| frame | image | task | size | instances | right / preferred | top right | best score | inference ms "
        "| latency ms | overlay |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["frames"]:
        right, top = _judged_cells(r)
        lines.append(f"| {r['frame']} | {r['image']} | {r['task']} | {r['size']} | {r['instances']} | "
                     f"{right} | {top} | {r['best_score']} | {r['inference_ms']} | {r['latency_ms']} | {r['overlay']} |")
    depth = report.get("depth")
    if depth is not None:
        lines += ["", "3D positions (depth.enabled; the scene's depth image and CameraInfo published with each "
                  "synthetic frame, toist_ros/demo_depth.py): each instance's centroid next to the true centroid of "
                  "the object its box overlaps most, metres in the camera's optical frame (x right, y down, z ahead)."
                  f" Frames with depth paired {depth['frames_paired']}; the photos come without depth: "
                  f"{depth['frames_missing']} missing, {depth['frames_unsynced']} unsynced (only older depth "
                  "images in the node's ring), with their 2D results all the same; median centroid error "
                  f"{depth['median_error_cm_box_iou_0.5']} cm over the {depth['instances_box_iou_0.5']} instances "
                  f"that cover their object (box IoU >= 0.5), {depth['median_error_cm_all']} cm over all "
                  f"{depth['instances_3d']} (a mask that covers two objects is measured on the nearer). The "
                  "synthetic depth is exact (no sensor noise, no holes): these errors come from the masks, and "
                  "check the 3D plumbing, not a depth camera's accuracy (docs/ros.md, \"3D instances\").", "",
                  "| frame | image | rank | centroid (m) | object | box IoU | true centroid (m) | error cm |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report["frames"]:
            for p in r.get("positions", []):
                lines.append(f"| {r['frame']} | {r['image']} | {p['rank']} | {_xyz(p['centroid_m'])} | {p['object']} "
                             f"| {p['box_iou']} | {_xyz(p['truth_m'])} | {p['error_cm']} |")
    lines += ["", "One-shot `segment_image` calls (image and task in the request):", "",
              "| call | image | task | instances | right / preferred | top right | best score | inference ms | overlay |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report["one_shots"]:
        right, top = _judged_cells(r)
        lines.append(f"| {r['call']} | {r['image']} | {r['task']} | {r['instances']} | {right} | {top} | "
                     f"{r['best_score']} | {r['inference_ms']} | {r['overlay']} |")
    return "\n".join(lines) + "\n"


def _xyz(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:+.3f}" for v in values) + ")"


if __name__ == "__main__":
    sys.exit(main())
