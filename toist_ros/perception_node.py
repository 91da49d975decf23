"""The toist perception node: camera images + a task in, ranked task instances out.

Threads and what they may do:
  * image callbacks (executor, own callback group): validate + convert to RGB (no torch),
    put into the camera's latest-frame slot, return;
  * control callbacks (executor, own callback group): ``set_task``, the ``task`` topic,
    ``segment_image``; a task change encodes the text here, then swaps the active task
    (caption, revision, text features) in one assignment;
  * the inference thread (not an executor callback): takes the newest frame, skips it when
    older than ``input.max_age_s``, takes one snapshot of the active task, runs the model,
    publishes ``instances`` (and ``debug_image`` while someone subscribes).
Nothing that arrives is ever queued behind inference: a frame the thread could not take is
replaced by the next one and counted as dropped.
"""

from __future__ import annotations

import collections
import dataclasses
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from rclpy.time import Time
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from toist_ros import params as parameters
from toist_ros.conversions import ImageError, compressed_to_rgb, image_from_array, image_to_rgb
from toist_ros.diagnostics import (ERROR, OK, WARN, Counters, Percentiles, RateMeter, device_memory, diagnostic_array,
                                   fmt_ms)
from toist_ros.frame_slot import FrameSlots
from toist_ros.instances import rank_instances, task_instances_msg, to_instance_msgs
from toist_ros.model_loader import EXIT_PARAMETERS, StartupError, load_model
from toist_ros.msg import TaskInstances, TaskStatus
from toist_ros.srv import SegmentImage, SetTask

NODE_NAME = "toist_perception"
SERVICE_TIMEOUT_S = 60.0      # segment_image gives up waiting for the inference thread after this
ONE_SHOT_TASK_CACHE = 8       # encoded one-shot tasks kept (segment_image with its own task text)
SPIN_POLL_S = 0.1             # the main thread looks for a stop signal at least this often


@dataclass(frozen=True)
class ActiveTask:
    """One consistent task snapshot: a frame uses exactly one of these."""

    request: str     # what was asked ("2", "sit comfortably on", free text)
    caption: str     # what the model reads
    task_id: Optional[int]
    revision: int
    state: Any       # the segmenter's encoded task (cached text features)


@dataclass
class _Frame:
    header: Any
    rgb: np.ndarray          # [H, W, 3] uint8
    arrival: Time            # node clock at arrival (age fallback for unstamped images)


@dataclass
class _OneShot:
    """A segment_image request travelling to the inference thread and back."""

    header: Any
    rgb: np.ndarray
    task: ActiveTask
    done: threading.Event
    result: Any = None
    error: str = ""


class _Camera:
    """One input topic and its outputs (``image`` -> ``instances``; ``front/image`` -> ``front/instances``)."""

    def __init__(self, index: int, topic: str) -> None:
        self.index = index
        self.topic = topic
        self.prefix = topic[: topic.rfind("/") + 1]  # "" for "image", "front/" for "front/image"
        self.input_rate = RateMeter()
        self.output_rate = RateMeter()
        self.subscription = None
        self.subscribed_name = ""
        self._last_sequence: dict[Any, int] = {}
        self._sequence_lock = threading.Lock()
        self.instances_pub = None
        self.debug_pub = None

    def lost_before(self, info: Any) -> int:
        """Messages a publisher sent that never reached this subscription (gaps in its sequence numbers).

        The image subscription keeps only the newest message (depth 1), so DDS itself drops
        what the executor did not take in time; this makes those drops visible too.
        """
        sequence = info.get("publication_sequence_number") if info else None
        if not sequence:
            return 0
        gid = info.get("publisher_gid")
        key = bytes(gid["data"]) if isinstance(gid, dict) and "data" in gid else repr(gid)
        with self._sequence_lock:
            last = self._last_sequence.get(key)
            self._last_sequence[key] = max(sequence, last or 0)
        return max(0, sequence - last - 1) if last is not None else 0


class PerceptionNode(Node):
    def __init__(self, **node_kwargs: Any) -> None:
        super().__init__(NODE_NAME, **node_kwargs)
        log = self.get_logger()
        try:
            self._settings = parameters.declare(self)
        except parameters.ParameterError as exc:
            raise StartupError(EXIT_PARAMETERS, str(exc)) from None
        settings = self._settings
        self.counters = Counters()
        self.inference_ms = Percentiles()
        self.latency_ms = Percentiles()
        self._ready = False
        self._stopping = threading.Event()
        self._task_lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._one_shot_tasks: collections.OrderedDict = collections.OrderedDict()
        self._one_shot_lock = threading.Lock()
        self._last_error = ""
        self._previous_arrivals = (0, 0)  # (arrived, lost) at the last diagnostics report

        self._status_pub = self.create_publisher(TaskStatus, "active_task", _latched_qos())
        self._task = ActiveTask(str(settings["task"]), str(settings["task"]), None, 0, None)
        self._publish_status()  # ready=false while the model loads

        self.model = load_model(settings, log.warning)
        self.segmenter = self.model.segmenter
        size = self.segmenter.inference
        log.info(f"model: {self.model.description}; device {self.model.device}; input resized to short side "
                 f"{size.short_side} px, long side at most {size.max_size} px")
        if self.model.is_random_default:
            log.warning(self.model.description)
        try:
            state = self._encode(settings["task"])
        except (ValueError, TypeError) as exc:
            raise StartupError(EXIT_PARAMETERS, f"task {settings['task']!r} cannot be used: {exc}") from None
        self._task = ActiveTask(str(settings["task"]), _caption(state, settings["task"]), _task_id(state), 1, state)
        if settings["warmup"]:
            self._warm_up()

        self._cameras = [_Camera(i, topic) for i, topic in enumerate(settings["input.topics"])]
        self._slots = FrameSlots(len(self._cameras))
        self._image_group = ReentrantCallbackGroup()
        self._control_group = ReentrantCallbackGroup()
        self._timer_group = MutuallyExclusiveCallbackGroup()
        self._create_io()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        if hasattr(self, "add_pre_set_parameters_callback"):  # Iron and later
            self.add_pre_set_parameters_callback(parameters.ints_to_doubles)

        self._worker = threading.Thread(target=self._inference_loop, name="toist_inference", daemon=True)
        self._worker.start()
        self._ready = True
        with self._task_lock:
            self._publish_status()
        log.info(f"ready: task {self._task.caption!r} (revision {self._task.revision})")

    # --- set-up ------------------------------------------------------------------------------

    def _create_io(self) -> None:
        settings = self._settings
        log = self.get_logger()
        image_qos = _image_qos(settings["input.reliable"])
        events = _qos_events(self)
        for camera in self._cameras:
            if settings["input.compressed"]:
                name, kind, convert = _compressed_topic(self, camera.topic), CompressedImage, compressed_to_rgb
            else:
                name, kind, convert = camera.topic, Image, image_to_rgb
            camera.subscription = self.create_subscription(
                kind, name, _image_callback(self._on_image, camera, convert), image_qos,
                callback_group=self._image_group, event_callbacks=events)
            kind = f"sensor_msgs/{kind.__name__}"
            camera.subscribed_name = camera.subscription.topic_name
            camera.instances_pub = self.create_publisher(TaskInstances, camera.prefix + "instances",
                                                         QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE))
            camera.debug_pub = self.create_publisher(Image, camera.prefix + "debug_image",
                                                     QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))
            log.info(f"input {camera.subscribed_name} ({kind}, QoS {_qos_text(image_qos)}) -> "
                     f"{camera.instances_pub.topic_name}, {camera.debug_pub.topic_name}")

        self._task_sub = self.create_subscription(String, "task", self._on_task_topic,
                                                  QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE),
                                                  callback_group=self._control_group)
        self._set_task_srv = self.create_service(SetTask, "set_task", self._on_set_task,
                                                 callback_group=self._control_group)
        self._segment_srv = self.create_service(SegmentImage, "segment_image", self._on_segment_image,
                                                callback_group=self._control_group)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(settings["diagnostics.period_s"], self._publish_diagnostics,
                                             callback_group=self._timer_group)
        self._no_image_timer = self.create_timer(settings["input.no_image_warning_s"], self._warn_no_image,
                                                 callback_group=self._timer_group)
        log.info(f"task input {self._task_sub.topic_name} (std_msgs/String, reliable depth 10); services "
                 f"{self._set_task_srv.srv_name}, {self._segment_srv.srv_name}; status "
                 f"{self._status_pub.topic_name} (transient local); diagnostics {self._diag_pub.topic_name}")

    def _warm_up(self) -> None:
        side = self.segmenter.inference.short_side
        blank = np.zeros((side, side * 4 // 3, 3), dtype=np.uint8)
        start = time.perf_counter()
        self._predict(blank, self._task, self._settings)
        self.get_logger().info(f"warm-up forward pass: {1000 * (time.perf_counter() - start):.0f} ms")

    # --- model adapters (the only places that call the segmenter) ----------------------------

    def _encode(self, task: str) -> Any:
        """Encode a task's text once (the expensive part of a task change).

        One encoding at a time: a fast tokenizer used from two threads at once can fail
        ("Already borrowed"). Frames never wait for this lock; they use encoded states.
        """
        with self._encode_lock:
            return self.segmenter.encode_task(task)

    def _predict(self, rgb: np.ndarray, task: ActiveTask, settings: Any) -> Any:
        """One forward pass (inference thread only) with the thresholds of ``settings``; the
        mask head runs only when masks are published."""
        import torch

        config = self.segmenter.inference
        if config.mask_threshold != settings["mask_threshold"]:
            # Run-time change: swap in a new config object (the segmenter reads it per call).
            self.segmenter.inference = dataclasses.replace(config, mask_threshold=settings["mask_threshold"])
        with torch.inference_mode():
            return self.segmenter.predict(rgb, task_state=task.state, score_threshold=settings["score_threshold"],
                                          max_instances=settings["max_instances"],
                                          with_masks=settings["output.masks"])

    # --- image input -------------------------------------------------------------------------

    def _on_image(self, msg: Any, camera: _Camera, convert: Any, info: Any = None) -> None:
        camera.input_rate.tick()
        lost = camera.lost_before(info)
        if lost:
            self.counters.add("lost_in_transport", lost)
        try:
            rgb = convert(msg)
        except ImageError as exc:
            self._reject(camera, exc)
            return
        self._accept(camera, msg.header, rgb)

    def _accept(self, camera: _Camera, header: Any, rgb: np.ndarray) -> None:
        self.counters.add("received")
        if self._slots.put(camera.index, _Frame(header, rgb, self.get_clock().now())):
            self.counters.add("dropped_replaced")

    def _reject(self, camera: _Camera, exc: ImageError) -> None:
        self.counters.add("rejected")
        self.counters.add(f"rejected_{exc.reason}")
        self.get_logger().warning(f"rejected an image on {camera.subscribed_name}: {exc}", throttle_duration_sec=5.0)

    def _warn_no_image(self) -> None:
        self._no_image_timer.cancel()
        for camera in self._cameras:
            if self._slots.received[camera.index] or self.counters.get("rejected"):
                continue
            self.counters.add("no_image_warnings")
            publishers = self.get_publishers_info_by_topic(camera.subscribed_name)
            offered = "; ".join(f"{p.node_namespace.rstrip('/')}/{p.node_name} offers {_qos_text(p.qos_profile)}"
                                for p in publishers) or "no publisher on this topic (check the remapping)"
            hint = ""
            if publishers and not self._settings["input.reliable"]:
                hint = ("; if the QoS match, large raw images over best-effort UDP may be lost entirely (one VGA "
                        f"frame is 0.9 MB, this machine's UDP receive buffer is {_receive_buffer_text()}): use "
                        "input.reliable:=true with a reliable camera, input.compressed:=true, or a DDS set-up for "
                        "large data (Fast DDS: FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA)")
            self.get_logger().warning(
                f"no image on {camera.subscribed_name} after {self._settings['input.no_image_warning_s']:.0f} s; "
                f"this node asks for {_qos_text(_image_qos(self._settings['input.reliable']))}; {offered}{hint}")

    # --- task changes ------------------------------------------------------------------------

    def set_task(self, text: str) -> tuple[bool, str, int]:
        """Encode ``text`` and make it the active task; (success, message, revision)."""
        text = text.strip()
        if not text:
            return False, "task is empty: give a COCO-Tasks id (1..14), a task name or free text", self._task.revision
        try:
            state = self._encode(text)
        except (ValueError, TypeError) as exc:
            return False, f"task {text!r} rejected: {exc}", self._task.revision
        except Exception as exc:  # never let a task request take the node down
            self.get_logger().error(f"encoding task {text!r} failed: {type(exc).__name__}: {exc}")
            return False, f"encoding task {text!r} failed: {type(exc).__name__}: {exc}", self._task.revision
        with self._task_lock:
            revision = self._task.revision + 1
            task = ActiveTask(text, _caption(state, text), _task_id(state), revision, state)
            self._task = task  # one assignment: a frame sees the old or the new task, never a mix
            self._publish_status()
        how = (f"COCO-Tasks task {task.task_id}" if task.task_id is not None
               else "free text (no COCO-Tasks id: no distillation memory bank)")
        message = f"task {text!r} -> caption {task.caption!r} ({how}); results carry revision {revision}"
        self.get_logger().info(message)
        return True, message, revision

    def _on_set_task(self, request: Any, response: Any) -> Any:
        response.success, response.message, response.revision = self.set_task(request.task)
        return response

    def _on_task_topic(self, msg: Any) -> None:
        ok, message, _ = self.set_task(msg.data)
        if not ok:
            self.get_logger().warning(f"task topic: {message}")

    def _publish_status(self) -> None:
        status = TaskStatus()
        status.stamp = self.get_clock().now().to_msg()
        status.task = self._task.caption
        status.revision = self._task.revision
        status.ready = self._ready
        self._status_pub.publish(status)

    @property
    def active_task(self) -> ActiveTask:
        return self._task

    # --- one-shot service --------------------------------------------------------------------

    def _on_segment_image(self, request: Any, response: Any) -> Any:
        try:
            rgb = image_to_rgb(request.image)
        except ImageError as exc:
            self.counters.add("rejected_service")
            response.success, response.message = False, f"bad image: {exc}"
            return response
        text = request.task.strip()
        try:
            task = self._task if not text else self._one_shot_task(text)
        except Exception as exc:
            response.success, response.message = False, f"task {text!r} rejected: {exc}"
            return response
        job = _OneShot(request.image.header, rgb, task, threading.Event())
        self._slots.put_request(job)
        if not job.done.wait(SERVICE_TIMEOUT_S):
            response.success, response.message = False, f"no result within {SERVICE_TIMEOUT_S:.0f} s"
        elif job.error:
            response.success, response.message = False, job.error
        else:
            response.success = True
            response.message = f"{len(job.result.instances)} instance(s) for {task.caption!r}"
            response.result = job.result
        return response

    def _one_shot_task(self, text: str) -> ActiveTask:
        active = self._task
        if text == active.request:
            return active
        with self._one_shot_lock:
            cached = self._one_shot_tasks.get(text)
            if cached is not None:
                self._one_shot_tasks.move_to_end(text)
                return cached
        state = self._encode(text)
        task = ActiveTask(text, _caption(state, text), _task_id(state), active.revision, state)
        with self._one_shot_lock:
            self._one_shot_tasks[text] = task
            while len(self._one_shot_tasks) > ONE_SHOT_TASK_CACHE:
                self._one_shot_tasks.popitem(last=False)
        return task

    # --- inference thread --------------------------------------------------------------------

    def _inference_loop(self) -> None:
        while not self._stopping.is_set():
            item = self._slots.take(timeout=0.5)
            if item is None:
                continue
            kind, payload, source = item
            try:
                if kind == "request":
                    self._serve_one_shot(payload)
                else:
                    self._process_frame(payload, self._cameras[source])
            except Exception as exc:  # last line of defence: the thread must keep running
                self.counters.add("internal_errors")
                self.get_logger().error(f"unexpected error in the inference thread: {type(exc).__name__}: {exc}",
                                        throttle_duration_sec=5.0)
        for job in self._slots.pending_requests():
            job.error = "the node is shutting down"
            job.done.set()

    def _process_frame(self, frame: _Frame, camera: _Camera) -> None:
        settings = self._settings
        now = self.get_clock().now()
        stamp = Time.from_msg(frame.header.stamp, clock_type=now.clock_type)
        stamped = stamp.nanoseconds > 0
        age_s = (now - (stamp if stamped else frame.arrival)).nanoseconds * 1e-9
        max_age = settings["input.max_age_s"]
        if max_age > 0 and age_s > max_age:
            self.counters.add("skipped_stale")
            self.get_logger().warning(
                f"skipped a frame from {camera.subscribed_name}: {age_s:.2f} s old > input.max_age_s {max_age} "
                "(camera and node clocks in sync? use_sim_time?)", throttle_duration_sec=5.0)
            return
        task = self._task  # one snapshot for the whole frame
        result = self._run_model(frame.rgb, frame.header, task, settings)
        if result is None:
            return
        msg, ranked = result
        end = stamp if stamped else frame.arrival
        msg.latency_ms = (self.get_clock().now() - end).nanoseconds * 1e-6
        camera.instances_pub.publish(msg)
        camera.output_rate.tick()
        self.counters.add("processed")
        self.latency_ms.add(msg.latency_ms)
        if settings["output.debug_image"] and camera.debug_pub.get_subscription_count() > 0:
            self._publish_debug(camera, frame, ranked, task)

    def _serve_one_shot(self, job: _OneShot) -> None:
        try:
            result = self._run_model(job.rgb, job.header, job.task, self._settings)
            if result is None:
                job.error = f"inference failed: {self._last_error}"
            else:
                job.result = result[0]
        finally:
            job.done.set()

    def _run_model(self, rgb: np.ndarray, header: Any, task: ActiveTask, settings: Any):
        """(TaskInstances, ranked) or None when inference failed (counted and logged)."""
        start = time.perf_counter()
        try:
            prediction = self._predict(rgb, task, settings)
        except Exception as exc:
            self._inference_failed(exc)
            return None
        elapsed_ms = 1000.0 * (time.perf_counter() - start)
        self.inference_ms.add(elapsed_ms)
        height, width = rgb.shape[:2]
        ranked = rank_instances(prediction.boxes, prediction.scores, prediction.masks, (width, height),
                                settings["score_threshold"], settings["max_instances"])
        msg = task_instances_msg(header, (width, height), task.caption, task.revision, elapsed_ms,
                                 to_instance_msgs(ranked, header))
        return msg, ranked

    def _inference_failed(self, exc: Exception) -> None:
        import torch

        self._last_error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            self.counters.add("cuda_oom")
            torch.cuda.empty_cache()
            self.get_logger().error(f"CUDA out of memory; frame dropped ({exc})", throttle_duration_sec=5.0)
        else:
            self.counters.add("inference_errors")
            self.get_logger().error(f"inference failed; frame dropped: {self._last_error}", throttle_duration_sec=5.0)

    def _publish_debug(self, camera: _Camera, frame: _Frame, ranked: list, task: ActiveTask) -> None:
        from toist_ros.overlay import draw_overlay

        try:
            bgr = draw_overlay(frame.rgb, ranked, f"{task.caption} (rev {task.revision})")
            camera.debug_pub.publish(image_from_array(bgr, "bgr8", frame.header, source_order="bgr"))
            self.counters.add("debug_images")
        except Exception as exc:
            self.counters.add("debug_errors")
            self.get_logger().warning(f"debug image failed: {type(exc).__name__}: {exc}", throttle_duration_sec=10.0)

    # --- parameters and diagnostics ----------------------------------------------------------

    def _on_set_parameters(self, params: list) -> Any:
        result = parameters.check_parameter_changes(params)
        if result.successful:
            # Replace the whole settings object: the inference thread reads one consistent set.
            self._settings = self._settings.replace({p.name: parameters._plain(p.value) for p in params
                                                     if p.name in parameters.SPECS})
        return result

    @property
    def settings(self) -> parameters.Settings:
        return self._settings

    def diagnostics_values(self) -> dict[str, Any]:
        counts = self.counters.snapshot()
        inf50, inf95 = self.inference_ms.quantiles(0.5, 0.95)
        lat50, lat95 = self.latency_ms.quantiles(0.5, 0.95)
        task = self._task
        values: dict[str, Any] = {
            "ready": self._ready, "task": task.caption, "task revision": task.revision,
            "model": self.model.description, "device": self.model.device,
            "inference ms p50": fmt_ms(inf50), "inference ms p95": fmt_ms(inf95),
            "latency ms p50": fmt_ms(lat50), "latency ms p95": fmt_ms(lat95),
        }
        for camera in self._cameras:
            name = camera.subscribed_name
            values[f"{name} input Hz"] = f"{camera.input_rate.rate():.2f}"
            values[f"{name} output Hz"] = f"{camera.output_rate.rate():.2f}"
            values[f"{name} dropped (replaced)"] = self._slots.dropped[camera.index]
        for key in ("received", "processed", "dropped_replaced", "skipped_stale", "lost_in_transport", "rejected",
                    "inference_errors", "cuda_oom", "rejected_service", "internal_errors", "qos_incompatible"):
            values[key] = counts.get(key, 0)
        for key in sorted(k for k in counts if k.startswith("rejected_") and k != "rejected_service"):
            values[key] = counts[key]
        values.update(device_memory(self.model.device))
        return values

    def _publish_diagnostics(self) -> None:
        values = self.diagnostics_values()
        arrived, lost = values["received"] + values["rejected"], values["lost_in_transport"]
        previous, self._previous_arrivals = self._previous_arrivals, (arrived, lost)
        recent_arrived, recent_lost = arrived - previous[0], lost - previous[1]
        if not self._ready:
            level, message = ERROR, "not ready"
        elif recent_lost > max(recent_arrived, 2):
            level, message = WARN, (f"most images never reached the node ({recent_lost} lost, {recent_arrived} "
                                    "arrived since the last report): DDS transport or QoS (see docs/ros.md)")
        elif self._last_error and self.counters.get("inference_errors") + self.counters.get("cuda_oom"):
            level, message = WARN, f"inference errors (last: {self._last_error})"
        elif not any(c.input_rate.rate() > 0 for c in self._cameras):
            level, message = WARN, "no input images"
        else:
            level, message = OK, "running"
        self._diag_pub.publish(diagnostic_array(self.get_clock().now().to_msg(),
                                                f"toist_ros: perception ({self.get_fully_qualified_name()})",
                                                self.model.device, level, message, values))

    # --- shut-down ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the inference thread (waits for the frame in progress)."""
        self._stopping.set()
        if hasattr(self, "_slots"):
            self._slots.close()
        worker = getattr(self, "_worker", None)
        if worker is not None and worker.is_alive() and worker is not threading.current_thread():
            worker.join(timeout=30)
            for job in self._slots.pending_requests():
                job.error = "the node is shutting down"
                job.done.set()

    def destroy_node(self) -> None:
        self.stop()
        super().destroy_node()


# --- helpers ---------------------------------------------------------------------------------

def _caption(state: Any, fallback: str) -> str:
    return str(getattr(state, "caption", fallback))


def _task_id(state: Any) -> Optional[int]:
    return getattr(state, "task_id", None)


def _receive_buffer_text() -> str:
    try:
        with open("/proc/sys/net/core/rmem_default") as f:
            return f"{int(f.read()) // 1024} KiB (net.core.rmem_default)"
    except (OSError, ValueError):
        return "unknown"


def _image_qos(reliable: bool) -> QoSProfile:
    """Sensor-data QoS (best effort, keep last 1) by default; reliable keep-last-1 on request."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, durability=DurabilityPolicy.VOLATILE,
                      reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT)


def _latched_qos() -> QoSProfile:
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)


def _qos_text(qos: Any) -> str:
    reliability = getattr(qos.reliability, "name", str(qos.reliability)).lower().replace("_", " ")
    durability = getattr(qos.durability, "name", str(qos.durability)).lower().replace("_", " ")
    depth = f", depth {qos.depth}" if qos.depth else ""  # discovery does not tell a publisher's depth
    return f"{reliability}, {durability}{depth}"


def _qos_events(node: Node):
    """Warn when a publisher's QoS cannot match ours (the classic "runs but receives nothing")."""
    from rclpy.event_handler import SubscriptionEventCallbacks

    def incompatible(event: Any) -> None:
        policy = str(getattr(event.last_policy_kind, "name", event.last_policy_kind)).replace("RMW_QOS_POLICY_", "")
        node.counters.add("qos_incompatible")
        node.get_logger().warning(
            f"an image publisher's QoS is incompatible with this subscription (policy {policy}); "
            f"set input.reliable:={'false' if node.settings['input.reliable'] else 'true'} to match it",
            throttle_duration_sec=10.0)

    return SubscriptionEventCallbacks(incompatible_qos=incompatible)


def _image_callback(handler: Any, camera: _Camera, convert: Any) -> Any:
    """The subscription callback; with message info (sequence numbers) where rclpy offers it (Jazzy+)."""
    from rclpy.subscription import Subscription

    if hasattr(Subscription, "CallbackType"):
        return lambda msg, info: handler(msg, camera, convert, info)
    return lambda msg: handler(msg, camera, convert)


def _compressed_topic(node: Node, topic: str) -> str:
    """``<resolved image topic>/compressed`` (image_transport's name), unless ``<topic>/compressed`` is remapped."""
    name = topic.rstrip("/") + "/compressed"
    remapped = node.resolve_topic_name(name)
    if remapped != node.resolve_topic_name(name, only_expand=True):
        return remapped
    return node.resolve_topic_name(topic) + "/compressed"


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``perception_node``: exit code 0 after a normal shut-down, non-zero on start-up failure.

    SIGINT/SIGTERM only set an event (rclpy's own signal handlers are not installed): with
    them a signal raised KeyboardInterrupt at an arbitrary point of the main thread while
    rclpy's signal thread was still triggering the executor's SIGINT guard condition, which
    ``executor.shutdown()`` frees; that race ended the process with SIGSEGV now and then.
    Here the main thread polls the event between short spins and then shuts down in the
    order rclpy needs: our inference thread joined, executor (and its threads) shut down,
    node destroyed, context shut down.
    """
    argv = sys.argv if argv is None else argv
    try:
        rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
    except Exception as exc:  # e.g. UnknownROSArgsError for a malformed --ros-args
        print(f"{NODE_NAME}: cannot start: bad ROS arguments: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_PARAMETERS
    stop_requested = threading.Event()
    previous_handlers = _install_stop_handlers(stop_requested)
    node = None
    executor = None
    code = 0
    try:
        node = PerceptionNode()
        executor = MultiThreadedExecutor(num_threads=4)
        executor.add_node(node)
        while not stop_requested.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=SPIN_POLL_S)
    except StartupError as exc:
        rclpy.logging.get_logger(NODE_NAME).fatal(f"cannot start: {exc}")
        code = exc.code
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.stop()
        if executor is not None:
            executor.shutdown()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
        _restore_handlers(previous_handlers)
    return code


def _install_stop_handlers(stop_requested: threading.Event) -> dict:
    """SIGINT and SIGTERM set ``stop_requested`` (main thread only; returns the previous handlers)."""
    def request_stop(signum: int, frame: Any) -> None:
        stop_requested.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, request_stop)
    return previous


def _restore_handlers(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
