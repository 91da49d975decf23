"""The inference thread: the one thread that runs the model.

It takes a ``segment_image`` request (served first, never dropped) or the newest frame of the
camera that has waited longest, skips a frame older than ``input.max_age_s``, takes one snapshot
of the active task, runs the model under ``torch.inference_mode()`` and publishes ``instances``
(and ``debug_image`` while someone subscribes). With ``depth.enabled`` it then pairs the frame with
its camera's depth image (``toist_ros.depth.pairing``), adds each instance's 3D fields and
publishes ``markers`` while someone subscribes. It is not an executor callback, so nothing is
ever queued behind inference and the GPU is used by one thread at a time.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
from rclpy.node import Node
from rclpy.time import Time

from toist_ros import params as parameters
from toist_ros.camera_input import Camera, CameraInputs, Frame
from toist_ros.conversions import image_from_array
from toist_ros.depth.geometry import DepthLimits
from toist_ros.depth.inputs import DepthInputs
from toist_ros.depth.instances3d import add_3d, frame_problem, registration_problem
from toist_ros.depth.markers import instance_markers, marker_lifetime_s
from toist_ros.depth.pairing import MAX_FRAMES, MISSING, PAIRED, Pairing, stamp_ns
from toist_ros.detections import detection_array
from toist_ros.diagnostics import Counters, Percentiles
from toist_ros.instances import rank_instances, task_instances_msg, to_instance_msgs
from toist_ros.tasks import ActiveTask

SERVICE_TIMEOUT_S = 60.0      # segment_image gives up waiting for the inference thread after this (or longer
                              # for a slow model: see segment)
STOP_WAIT_S = 30.0            # stop() waits this long for the forward pass in progress
STOPPED = "the inference thread stopped (the node is shutting down or was deactivated)"


@dataclass
class _OneShot:
    """A segment_image request travelling to the inference thread and back."""

    header: Any
    rgb: np.ndarray          # [H, W, 3] uint8
    task: ActiveTask
    done: threading.Event
    result: Any = None
    error: str = ""
    # Set when the caller stopped waiting (SERVICE_TIMEOUT_S): nobody would read the result.
    abandoned: bool = False


def predict(segmenter: Any, rgb: np.ndarray, task: ActiveTask, settings: Any) -> Any:
    """One forward pass with the thresholds of ``settings``; the mask head runs only when masks
    are published. Together with the task encoding, the only place that calls the segmenter."""
    import torch

    config = segmenter.inference
    duplicate_iou = parameters.duplicate_iou(settings)
    if (config.mask_threshold, config.duplicate_iou) != (settings["mask_threshold"], duplicate_iou):
        # Run-time change: swap in a new config object (the segmenter reads it per call).
        segmenter.inference = dataclasses.replace(config, mask_threshold=settings["mask_threshold"],
                                                  duplicate_iou=duplicate_iou)
    with torch.inference_mode():
        # 3D needs the masks even when they are not published.
        return segmenter.predict(rgb, task_state=task.state, score_threshold=settings["score_threshold"],
                                 max_instances=settings["max_instances"],
                                 with_masks=settings["output.masks"] or settings["depth.enabled"])


class InferenceWorker:
    """The inference thread of one node.

    ``active_task`` and ``settings`` are read once per frame (each returns one immutable
    snapshot, replaced as a whole on a change); the statistics are shared with diagnostics.
    ``depth``: the node's depth inputs (None when ``depth.enabled`` is false); ``geometry_ms``:
    the 3D step's time per frame.
    """

    def __init__(self, node: Node, segmenter: Any, inputs: CameraInputs, active_task: Callable[[], ActiveTask],
                 settings: Callable[[], Any], counters: Counters, inference_ms: Percentiles,
                 latency_ms: Percentiles, depth: Optional[DepthInputs] = None,
                 geometry_ms: Optional[Percentiles] = None) -> None:
        self._node = node
        self._segmenter = segmenter
        self._cameras = inputs.cameras
        self._slots = inputs.slots
        self._active_task = active_task
        self._settings = settings
        self._counters = counters
        self._inference_ms = inference_ms
        self._latency_ms = latency_ms
        self._depth = depth
        self._geometry_ms = geometry_ms if geometry_ms is not None else Percentiles()
        self._frames_warned: set[int] = set()  # cameras whose accepted frame_id mismatch was warned about
        self._stopping = threading.Event()
        self._abandoned = threading.Event()   # stop() gave up waiting: the frame's result is not published
        self.last_error = ""
        self._clock_warned = False
        self._busy_since: Optional[float] = None   # monotonic start of the forward pass in progress
        self._thread = threading.Thread(target=self._loop, name="toist_inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> bool:
        """Stop the thread (waits up to ``STOP_WAIT_S`` for the frame in progress); pending
        requests fail. True when the thread has ended; False when it is still in its forward pass
        (it ends after it, publishing nothing)."""
        self._stopping.set()
        self._slots.close()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=STOP_WAIT_S)
            if self._thread.is_alive():
                self._abandoned.set()
        self._fail_pending()
        return not self.running

    def busy_s(self) -> float:
        """Seconds the forward pass in progress has run (0 when none is): a pass that never ends
        (a hung device) otherwise looked like a slow model on /diagnostics, the frames replaced."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def running(self) -> bool:
        """Whether the thread is still running (a forward pass that outlived :meth:`stop`)."""
        return self._thread.is_alive() and self._thread is not threading.current_thread()

    def segment(self, header: Any, rgb: np.ndarray, task: ActiveTask) -> tuple[Any, str]:
        """One image through the inference thread (from a service callback; waits for it):
        (TaskInstances, "") or (None, why it failed)."""
        job = _OneShot(header, rgb, task, threading.Event())
        ahead = self._slots.put_request(job)
        if ahead is None:
            return None, STOPPED
        # The pass in progress (maybe a request: then a camera frame comes before the next), each
        # request queued before this one and the camera frame served after it, then this one: a
        # slow model (a paper-size one on a small CPU) timed out at a fixed 60 s.
        typical_s = self._inference_ms.quantiles(0.95)[0] / 1000.0
        wait_s = (max(SERVICE_TIMEOUT_S, (2 * ahead + 3) * typical_s) if typical_s == typical_s
                  else SERVICE_TIMEOUT_S)
        if not job.done.wait(wait_s):
            job.abandoned = True  # still queued: the inference thread skips it
            self._counters.add("service_timeouts")
            return None, f"no result within {wait_s:.0f} s"
        return (None, job.error) if job.error else (job.result, "")

    def _loop(self) -> None:
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
                self._counters.add("internal_errors")
                # With its traceback, as a callback's (a bare "KeyError: 'x'" named no line).
                self._node.get_logger().error(
                    "unexpected error in the inference thread (the node goes on): "
                    + "".join(traceback.format_exception(exc)).rstrip(), throttle_duration_sec=5.0)
        self._fail_pending()
        # Ended: a worker kept after it (a pass that outlived deactivate) must not keep the model
        # (GPU memory) alive beside the one a later configure loads.
        self._segmenter = None

    def _fail_pending(self) -> None:
        for job in self._slots.pending_requests():
            job.error = STOPPED
            job.done.set()

    def _process_frame(self, frame: Frame, camera: Camera) -> None:
        settings = self._settings()
        clock = self._node.get_clock()
        now = clock.now()
        # Time 0: the node runs on sim time and /clock has not ticked yet. Ages and latencies
        # against it would be nonsense (-1.8e12 ms), so no frame is skipped as stale and
        # latency_ms is NaN (unknown) until the clock runs.
        clock_running = now.nanoseconds > 0
        if not clock_running:
            self._warn_clock_stopped()
        stamp = Time.from_msg(frame.header.stamp, clock_type=now.clock_type)  # sec >= 0: FrameLimits
        stamped = stamp.nanoseconds > 0
        age_s = (now - (stamp if stamped else frame.arrival)).nanoseconds * 1e-9
        max_age = settings["input.max_age_s"]
        if clock_running and max_age > 0 and age_s > max_age:
            self._counters.add("skipped_stale")
            camera.skipped_stale += 1
            self._node.get_logger().warning(
                f"skipped a frame from {camera.subscribed_name}: {age_s:.2f} s old > input.max_age_s {max_age} "
                "(camera and node clocks in sync? use_sim_time?)", throttle_duration_sec=5.0)
            return
        task = self._active_task()  # one snapshot for the whole frame
        result = self._run_model(frame.rgb, frame.header, task, settings)
        if result is None:
            return
        msg, ranked = result
        if self._abandoned.is_set():   # stop() stopped waiting for this forward pass: nothing more
            self._counters.add("dropped_abandoned")   # received, so counted somewhere
            return
        if self._depth is not None:
            self._add_depth(msg, ranked, camera, settings)
        msg.latency_ms = latency_ms(clock, stamp if stamped else frame.arrival)
        if msg.latency_ms < 0:
            # Stamped ahead of the node's clock: published as measured (it shows the skew), kept
            # out of the latency percentiles, which it would drag below the model time.
            self._counters.add("future_stamped")
            self._node.get_logger().warning(
                f"a frame from {camera.subscribed_name} is stamped {-msg.latency_ms / 1000.0:.3f} s ahead of the "
                "node's clock at publish (camera and node clocks in sync? use_sim_time?); its latency_ms is "
                "negative and left out of the latency percentiles", throttle_duration_sec=5.0)
        elif np.isfinite(msg.latency_ms):
            self._latency_ms.add(msg.latency_ms)
        camera.instances_pub.publish(msg)
        if camera.detections_pub is not None:
            camera.detections_pub.publish(detection_array(msg.header, msg.instances, task.caption))
        camera.output_rate.tick()
        self._counters.add("processed")
        if settings["output.debug_image"] and camera.debug_pub.get_subscription_count() > 0:
            self._publish_debug(camera, frame, ranked, task)
        if self._depth is not None and settings["output.markers"] and camera.markers_pub.get_subscription_count() > 0:
            lifetime = marker_lifetime_s(self._inference_ms.quantiles(0.95)[0], camera.output_rate.rate())
            camera.markers_pub.publish(instance_markers(msg.header, msg.instances, task.caption, lifetime))

    def _add_depth(self, msg: Any, ranked: list, camera: Camera, settings: Any) -> None:
        """Pair the frame with its depth image and fill the 3D fields (counted: depth_paired,
        depth_missing, depth_unsynced; the time goes to ``geometry_ms``)."""
        pairing = self._depth.buffers[camera.index].pair(stamp_ns(msg.header.stamp), settings["depth.max_dt_s"],
                                                          settings["depth.wait_s"])
        if pairing.status == PAIRED:
            pairing = self._registered(pairing, msg.header.frame_id, (int(msg.image_width), int(msg.image_height)),
                                       camera, settings["depth.same_frame"])
        elif pairing.evicted:
            self._counters.add("depth_evicted")
            self._node.get_logger().warning(
                f"no 3D for a frame of {camera.subscribed_name}: its depth image was dropped from the buffer (at most "
                f"{settings['depth.buffer_mb']} MiB and {MAX_FRAMES} images per camera) before the model finished "
                "with the frame; raise depth.buffer_mb, or send smaller depth images (16UC1, lower resolution), or "
                f"fewer (at most {MAX_FRAMES} are kept: a lower depth rate)",
                throttle_duration_sec=10.0)
        self._counters.add(f"depth_{pairing.status}")
        camera.depth_outcomes[pairing.status] += 1
        start = time.perf_counter()
        limits = DepthLimits(settings["depth.min_m"], settings["depth.max_m"])
        self._counters.add("instances_3d", add_3d(msg, ranked, pairing, limits))
        if pairing.camera is not None:
            self._geometry_ms.add(1000.0 * (time.perf_counter() - start))

    def _registered(self, pairing: Pairing, image_frame: str, colour_size: tuple[int, int], camera: Camera,
                    same_frame: bool) -> Pairing:
        """``pairing``, or MISSING when its depth image or CameraInfo is not of the colour image's
        view: in another ``frame_id`` (``depth.same_frame``: the raw depth stream or the depth
        camera's CameraInfo, which gave 3D positions centimetres off without a word; counted as
        ``depth_rejected_frame``) or of another aspect ratio (``depth_rejected_aspect``)."""
        frames = frame_problem(image_frame, pairing.depth.frame_id, pairing.camera.frame_id)
        problem, reason = (frames, "frame") if frames and same_frame else ("", "")
        if frames and not same_frame and camera.index not in self._frames_warned:
            self._frames_warned.add(camera.index)
            self._node.get_logger().warning(f"{camera.subscribed_name}: {frames} (used anyway: depth.same_frame is "
                                            "false)")
        if not problem:
            problem, reason = registration_problem(colour_size, pairing.depth.size,
                                                   (pairing.camera.intrinsics.width,
                                                    pairing.camera.intrinsics.height)), "aspect"
        if not problem:
            return pairing
        self._counters.add("depth_rejected")
        self._counters.add(f"depth_rejected_{reason}")
        # Throttled per call site: one for each reason, so that one problem does not hide the other.
        log = self._node.get_logger()
        if reason == "frame":
            log.warning(f"no 3D for {camera.subscribed_name}: {problem}; depth.same_frame:=false if the driver "
                        "labels registered depth with another frame", throttle_duration_sec=10.0)
        else:
            log.warning(f"no 3D for {camera.subscribed_name}: {problem}", throttle_duration_sec=10.0)
        return Pairing(MISSING)

    def _warn_clock_stopped(self) -> None:
        if self._clock_warned:
            return
        self._clock_warned = True
        self._node.get_logger().warning(
            "the node's clock reads 0: use_sim_time is true and nothing publishes /clock yet; frames are not "
            "skipped for age and latency_ms is NaN (unknown) until the clock runs")

    def _serve_one_shot(self, job: _OneShot) -> None:
        if job.abandoned:
            return
        self._counters.add("service_calls")
        try:
            result = self._run_model(job.rgb, job.header, job.task, self._settings())
            if result is None:
                job.error = f"inference failed: {self.last_error}"
            else:
                job.result = result[0]
                clock = self._node.get_clock()
                # The request's own stamp (FrameLimits refused negative ones); unknown (NaN) without one.
                job.result.latency_ms = latency_ms(clock, Time.from_msg(job.header.stamp, clock_type=clock.clock_type))
        finally:
            job.done.set()

    def _run_model(self, rgb: np.ndarray, header: Any, task: ActiveTask, settings: Any):
        """(TaskInstances, ranked) or None when inference failed (counted and logged)."""
        start = time.perf_counter()
        height, width = rgb.shape[:2]
        self._busy_since = time.monotonic()
        try:
            try:
                prediction = predict(self._segmenter, rgb, task, settings)
            finally:
                self._busy_since = None
            elapsed_ms = 1000.0 * (time.perf_counter() - start)  # model time (inference_ms): before ranking
            ranked = rank_instances(prediction.boxes, prediction.scores, prediction.masks, (width, height),
                                    settings["score_threshold"], settings["max_instances"])
        except Exception as exc:
            self._inference_failed(exc)
            return None
        self._inference_ms.add(elapsed_ms)
        msg = task_instances_msg(header, (width, height), task.caption, task.revision, elapsed_ms,
                                 to_instance_msgs(ranked, header, with_masks=settings["output.masks"]),
                                 task_id=task.task_id)
        return msg, ranked

    def _inference_failed(self, exc: Exception) -> None:
        import torch

        self.last_error = f"{type(exc).__name__}: {exc}"
        log = self._node.get_logger()
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            self._counters.add("cuda_oom")
            torch.cuda.empty_cache()
            log.error(f"CUDA out of memory; frame dropped ({exc})", throttle_duration_sec=5.0)
        else:
            self._counters.add("inference_errors")
            log.error(f"inference failed; frame dropped: {self.last_error}", throttle_duration_sec=5.0)

    def _publish_debug(self, camera: Camera, frame: Frame, ranked: list, task: ActiveTask) -> None:
        from toist_ros.overlay import draw_overlay

        try:
            bgr = draw_overlay(frame.rgb, ranked, f"{task.caption} (rev {task.revision})")
            camera.debug_pub.publish(image_from_array(bgr, "bgr8", frame.header, source_order="bgr"))
            self._counters.add("debug_images")
        except Exception as exc:
            self._counters.add("debug_errors")
            self._node.get_logger().warning(f"debug image failed: {type(exc).__name__}: {exc}",
                                            throttle_duration_sec=10.0)


def latency_ms(clock: Any, since: Time) -> float:
    """Milliseconds from ``since`` to now on ``clock``; NaN (unknown) when either is time 0 (no
    stamp, or sim time before /clock ticked)."""
    now = clock.now()
    if now.nanoseconds <= 0 or since.nanoseconds <= 0:
        return float("nan")
    return (now - since).nanoseconds * 1e-6


__all__ = ["InferenceWorker", "SERVICE_TIMEOUT_S", "latency_ms", "predict"]
