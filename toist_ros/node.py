"""``PerceptionNode``: camera images + a task in, ranked task instances out.

Threads and what they may do:
  * image callbacks (executor, own callback group): validate + convert to RGB (no torch),
    put into the camera's latest-frame slot, return (``camera_input``);
  * control callbacks (executor, own callback group): ``set_task``, the ``task`` topic and
    parameter changes; a task change encodes the text here, then swaps the active task
    (caption, revision, text features) in one assignment (``tasks``);
  * ``segment_image`` (executor, own callback group and threads): waits for the inference
    thread to serve the request, so it never holds up a control callback;
  * the inference thread (not an executor callback): takes the newest frame, skips it when
    older than ``input.max_age_s``, takes one snapshot of the active task, runs the model,
    publishes ``instances`` (and ``debug_image`` while someone subscribes) (``inference_worker``).
Nothing that arrives is ever queued behind inference: a frame the thread could not take is
replaced by the next one and counted as dropped.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from typing import Any, Optional

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import String

from toist_core.tasks import quote
from toist_ros import params as parameters
from toist_ros.camera_input import CameraInputs
from toist_ros.conversions import ImageError
from toist_ros.depth.geometry import warm_up as warm_up_3d
from toist_ros.detections import DetectionsUnavailable, detection_array_type
from toist_ros.depth.inputs import DepthInputs
from toist_ros.entry import NODE_NAME
from toist_ros.diagnostics import ERROR, OK, WARN, Counters, Percentiles, diagnostic_array, return_free_memory
from toist_ros.frame_limits import FrameLimits
from toist_ros.health import HealthLevel, report_values
from toist_ros.inference_worker import STOP_WAIT_S, InferenceWorker, predict
from toist_ros.model_loader import EXIT_MODEL, EXIT_PARAMETERS, StartupError, load_model
from toist_ros.msg import TaskStatus
from toist_ros.startup_status import StartupDiagnostics
from toist_ros.steady_timer import steady_timer
from toist_ros.srv import SegmentImage, SetTask
from toist_ros.tasks import ONE_SHOT_REVISION, ActiveTask, TaskSwitch, loading_task

# The node's phases, named as the lifecycle states they are in a managed node.
UNCONFIGURED, CONFIGURING, INACTIVE, ACTIVE = "unconfigured", "configuring", "inactive", "active"
FINALIZED = "finalized"


class PerceptionNode(Node):
    """The node, ready when constructed: model loaded, start-up task encoded, warmed up,
    subscribed, inference thread running. Raises :class:`StartupError` (with the exit code)
    when it cannot start.

    Its life in phases, which :class:`~toist_ros.lifecycle_node.ManagedPerceptionNode` runs one
    lifecycle transition each (this class runs them all in its constructor): ``_declare``
    (parameters, status and diagnostics), ``_configure`` (model, task, warm-up, outputs,
    services), ``_activate`` (subscriptions, inference thread), ``_deactivate``, ``_cleanup``.
    """

    MANAGED = False  # ManagedPerceptionNode: the phases wait for lifecycle transitions

    def __init__(self, stop: Optional[threading.Event] = None, argv: Optional[list[str]] = None,
                 **node_kwargs: Any) -> None:
        """``stop``: set when the process is asked to stop; the start-up ends at its next step.
        ``argv``: the command line rclpy was initialised with (default ``sys.argv``), read for
        where each start-up parameter's value came from."""
        self._argv = list(sys.argv if argv is None else argv)
        super().__init__(NODE_NAME, **node_kwargs)
        try:
            self._declare()
            if not self.MANAGED:
                period_s = self._settings["diagnostics.period_s"]
                with StartupDiagnostics(self._publish_startup_report, period_s, stop=stop) as startup:
                    self._configure(startup)
                    self._activate()
            else:   # a lifecycle node silent until configured looked hung
                self.get_logger().info(f"lifecycle node unconfigured: configure it to load the model, then activate "
                                       f"it (ros2 lifecycle set {self.get_fully_qualified_name()} configure)")
        except BaseException as exc:
            if isinstance(exc, StartupError):  # its FATAL line goes under the node's (remapped) name
                exc.logger_name = self.get_logger().name
            # Nobody holds a node whose constructor failed, so nobody else can destroy it: left to
            # the garbage collector, its publisher and parameter services were freed whenever it
            # got to them, possibly after `perception_node` had shut rclpy's context down (a CI
            # run saw a node that could not start end with SIGSEGV instead of its exit code).
            self.destroy_node()
            raise

    def _declare(self) -> None:
        """Parameters, statistics, callback groups, the task status (``ready`` false) and
        ``/diagnostics``: what the node has before it loads a model."""
        log = self.get_logger()
        try:
            self._settings = parameters.declare(self, self._argv)
        except parameters.ParameterError as exc:
            raise StartupError(EXIT_PARAMETERS, str(exc)) from None
        for warning in parameters.unknown_overrides(getattr(self, "_parameter_overrides", {})) + self._settings.notes:
            log.warning(warning)
        settings = self._settings
        self.counters = Counters()
        self.inference_ms = Percentiles()
        self.latency_ms = Percentiles()
        self.geometry_ms = Percentiles()
        self._phase = UNCONFIGURED
        # Held while a transition clears what callbacks read (the model, the inputs, the timers),
        # and by the timer callbacks that read them: a lifecycle cleanup runs beside them.
        self._state_lock = threading.Lock()
        self._stopping = threading.Event()  # request_stop(): a transition under way ends at its next step
        self._health = HealthLevel()
        self.model = self.segmenter = self._tasks = self._inputs = self._depth = self._worker = None
        self._task_sub = self._set_task_srv = self._segment_srv = None  # _create_control_io
        self._no_image_timer = None
        self._outliving_worker = None  # an inference thread deactivate could not wait for
        self._warmup_ms = float("nan")  # the warm-up forward pass (NaN: none, warmup false)
        self.transition_failure = ""  # the last lifecycle transition's failure, until one succeeds

        self._image_group = ReentrantCallbackGroup()
        self._control_group = ReentrantCallbackGroup()
        # Task messages one at a time, in arrival order: on the reentrant group the executor's
        # threads raced for the encoder and the node could end on a task published before the last.
        self._task_topic_group = MutuallyExclusiveCallbackGroup()
        self._segment_group = ReentrantCallbackGroup()  # waits for inference: threads of its own
        self._timer_group = MutuallyExclusiveCallbackGroup()

        self._status_pub = self.create_publisher(TaskStatus, "active_task", _latched_qos())
        self._publish_status(loading_task(settings["task"]))  # ready=false while the model loads
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = steady_timer(self, settings["diagnostics.period_s"], self._publish_diagnostics,
                                        self._timer_group)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        if hasattr(self, "add_pre_set_parameters_callback"):  # Iron and later
            self.add_pre_set_parameters_callback(parameters.ints_to_doubles)

    @property
    def _ready(self) -> bool:
        return self._phase == ACTIVE

    @property
    def _cameras(self) -> list:
        """The configured cameras (none before :meth:`_configure` and after :meth:`_cleanup`)."""
        return self._inputs.cameras if self._inputs is not None else []

    def _configure(self, startup: StartupDiagnostics) -> None:
        """Model, task, warm-up, outputs and services, each step reported (``startup``)."""
        log, settings = self.get_logger(), self._settings
        self._phase = CONFIGURING
        startup.step("loading the model")

        self.model = load_model(settings, log.warning, log.info)
        self.segmenter = self.model.segmenter
        size = self.segmenter.inference
        log.info(f"model: {self.model.description}; device {self.model.device}; precision {size.precision}, backend "
                 f"{size.backend}; input resized to short side {size.short_side} px, long side at most {size.max_size} px")
        if self.model.is_random_default or not settings["checkpoint"].strip():
            # The embedded model knows a synthetic world only: said at WARN, a robot's log level
            # may hide INFO, and its instances on a real camera mean nothing.
            log.warning(self.model.description)
        self._limits = FrameLimits(settings["input.max_pixels"], size.short_side, size.max_size)
        self._tasks = TaskSwitch(self.segmenter.encode_task, self._publish_status, log)
        startup.step("encoding the start-up task")
        try:
            self._tasks.start(settings["task"])
        except (ValueError, TypeError) as exc:
            raise StartupError(EXIT_PARAMETERS, f"task {quote(settings['task'])} cannot be used: {exc}") from None
        if settings["warmup"]:
            startup.step("warming up the network")
            try:
                self._warm_up()
            except Exception as exc:  # e.g. NaN weights (NonFiniteOutputError): one FATAL line, exit code 3
                raise StartupError(EXIT_MODEL, f"the warm-up forward pass failed: {type(exc).__name__}: {exc}") from None

        startup.step("opening outputs and services")
        self._inputs = CameraInputs(self, settings, self.counters, self._image_group, self._limits)
        self._inputs.create_outputs()
        if settings["output.detections"]:
            self._open_detections()
        self._depth = self._open_depth() if settings["depth.enabled"] else None
        self._create_control_io()
        self._phase = INACTIVE

    def _activate(self) -> None:
        """Subscribe the cameras (and depth), start the inference thread; ready."""
        self._inputs.subscribe()
        if self._depth is not None:
            self._depth.subscribe()
        self._worker = InferenceWorker(self, self.segmenter, self._inputs, lambda: self._tasks.active,
                                       lambda: self._settings, self.counters, self.inference_ms, self.latency_ms,
                                       self._depth, self.geometry_ms)
        self._worker.start()
        self._no_image_timer = steady_timer(self, self._settings["input.no_image_warning_s"], self._warn_no_image,
                                            self._timer_group)
        self._phase = ACTIVE
        self._tasks.publish_active()
        self.get_logger().info(f"ready: task {quote(self.active_task.caption)} "
                               f"(revision {self.active_task.revision})")

    def _deactivate(self) -> None:
        """Stop the inference thread (the frame in progress ends first) and the subscriptions;
        the model, the task, the outputs and ``set_task`` stay. Every step is tried, whatever
        the one before did (a step that raised left the thread or the subscriptions running
        under a node that said it was inactive, then released); the first error is raised after."""
        self._phase = INACTIVE
        errors = []
        for step in (self._stop_inference, self._inputs.unsubscribe,
                     self._depth.unsubscribe if self._depth is not None else None, self._destroy_no_image_timer):
            try:
                if step is not None:
                    step()
            except Exception as exc:
                errors.append(exc)
        return_free_memory()  # what the ended inference thread's arena held
        self._tasks.publish_active()
        if errors:
            raise errors[0]

    def _stop_inference(self) -> None:
        if not self.stop():
            # A forward pass longer than the wait (a hung GPU, a huge frame on a CPU): the thread
            # ends after it and publishes nothing; activate waits for it (lifecycle_node).
            self._outliving_worker = self._worker
            self.get_logger().warning(f"deactivate: the inference thread is still in a forward pass after "
                                      f"{STOP_WAIT_S:g} s; it publishes nothing when it ends, and activate is "
                                      "refused until then")

    def _destroy_no_image_timer(self) -> None:
        with self._state_lock:
            timer, self._no_image_timer = self._no_image_timer, None
        if timer is not None:
            self.destroy_timer(timer)

    def _cleanup(self) -> None:
        """Back to before :meth:`_configure`: outputs and services destroyed, the model released
        (its GPU memory with it)."""
        if self._tasks is not None:
            self._tasks.close()  # a task change encoding now publishes nothing over the status below
        if self._task_sub is not None:
            self.destroy_subscription(self._task_sub)
            self.destroy_service(self._set_task_srv)
            self.destroy_service(self._segment_srv)
            self._task_sub = self._set_task_srv = self._segment_srv = None
        if self._inputs is not None:
            self._inputs.destroy_outputs()
        device = str(getattr(self.model, "device", "cpu"))
        with self._state_lock:
            self._phase = UNCONFIGURED
            self.model = self.segmenter = self._tasks = self._inputs = self._depth = self._worker = None
        if device.startswith("cuda"):
            import torch  # the model's device was CUDA: torch is loaded already

            torch.cuda.empty_cache()
        return_free_memory()
        self._publish_status(loading_task(self._settings["task"]))

    # --- set-up ------------------------------------------------------------------------------

    def _create_control_io(self) -> None:
        """The task topic and the services (cameras: ``CameraInputs``)."""
        self._task_sub = self.create_subscription(String, "task", self._on_task_topic,
                                                  QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE),
                                                  callback_group=self._task_topic_group)
        self._set_task_srv = self.create_service(SetTask, "set_task", self._on_set_task,
                                                 callback_group=self._control_group)
        self._segment_srv = self.create_service(SegmentImage, "segment_image", self._on_segment_image,
                                                callback_group=self._segment_group)
        self.get_logger().info(
            f"task input {self._task_sub.topic_name} (std_msgs/String, reliable depth 10); services "
            f"{_resolved_name(self, self._set_task_srv)}, {_resolved_name(self, self._segment_srv)}; status "
            f"{self._status_pub.topic_name} (transient local); diagnostics {self._diag_pub.topic_name}")

    def _open_detections(self) -> None:
        """A ``detections`` publisher (vision_msgs/Detection2DArray) per camera; exit code 2 when
        vision_msgs is not installed (asked for, it must not be missing silently)."""
        try:
            detections = detection_array_type()
        except DetectionsUnavailable as exc:
            raise StartupError(EXIT_PARAMETERS, str(exc)) from None
        for camera in self._cameras:
            camera.detections_pub = self.create_publisher(detections, camera.prefix + "detections",
                                                          QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE))
            self.get_logger().info(f"detections on {camera.detections_pub.topic_name} "
                                   "(vision_msgs/Detection2DArray)")

    def _open_depth(self) -> DepthInputs:
        """The depth inputs (subscribed by :meth:`_activate`) and a ``markers`` publisher per camera."""
        from visualization_msgs.msg import MarkerArray  # only with depth: 2D users need not install it

        depth = DepthInputs(self, self._settings, self.counters, self._image_group)
        for camera in self._cameras:
            camera.markers_pub = self.create_publisher(MarkerArray, camera.prefix + "markers",
                                                       QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))
            self.get_logger().info(f"3D instances on {camera.instances_pub.topic_name}; RViz markers on "
                                   f"{camera.markers_pub.topic_name} (visualization_msgs/MarkerArray)")
        return depth

    def _warm_up(self) -> None:
        side = self.segmenter.inference.short_side
        blank = np.zeros((side, side * 4 // 3, 3), dtype=np.uint8)
        start = time.perf_counter()
        predict(self.segmenter, blank, self.active_task, self._settings)
        self._warmup_ms = 1000 * (time.perf_counter() - start)   # what a pass takes, before a frame is timed
        self.get_logger().info(f"warm-up forward pass: {self._warmup_ms:.0f} ms")
        if self._settings["depth.enabled"]:
            # The 3D step's kernel is compiled (first start on a machine, seconds) or loaded from
            # numba's cache here, not on the first frame with depth.
            self.get_logger().info(f"warm-up 3D step: {1000 * warm_up_3d():.0f} ms (numba kernel loaded or compiled)")

    def _warn_no_image(self) -> None:
        with self._state_lock:
            timer, inputs = self._no_image_timer, self._inputs
            if timer is None or inputs is None or self._phase != ACTIVE:
                return
            timer.cancel()  # one warning per activation
            inputs.warn_no_image()

    # --- tasks -------------------------------------------------------------------------------

    @property
    def active_task(self) -> ActiveTask:
        tasks = self._tasks
        return tasks.active if tasks is not None else loading_task(self._settings["task"])

    def set_task(self, text: str) -> tuple[bool, str, int]:
        """Encode ``text`` and make it the active task; (success, message, revision)."""
        tasks = self._tasks
        if tasks is None:  # a task message that came while a lifecycle cleanup ran
            return False, f"the node is {self._phase} (lifecycle): configure it to set a task", 0
        return tasks.set(text)

    def _on_set_task(self, request: Any, response: Any) -> Any:
        response.success, response.message, response.revision = self.set_task(request.task)
        return response

    def _on_task_topic(self, msg: Any) -> None:
        ok, message, _ = self.set_task(msg.data)
        if not ok:
            self.get_logger().warning(f"task topic: {message}")

    def _publish_status(self, task: ActiveTask) -> None:
        status = TaskStatus()
        status.stamp = self.get_clock().now().to_msg()
        status.task = task.caption
        status.task_id = int(task.task_id or 0)
        status.revision = task.revision
        status.ready = self._ready
        status.warning = task.warning
        self._status_pub.publish(status)

    def _on_segment_image(self, request: Any, response: Any) -> Any:
        worker, tasks = self._worker, self._tasks
        if not self._ready or worker is None or tasks is None:
            response.success, response.message = False, (f"the node is {self._phase} (lifecycle): activate it to "
                                                         "segment images")
            return response
        try:
            rgb = self._limits.image_to_rgb(request.image)
        except ImageError as exc:
            self.counters.add("rejected_service")
            self.counters.add(f"rejected_service_{exc.reason}")
            response.success, response.message = False, f"bad image: {exc}"
            return response
        text = request.task.strip()
        try:
            task = tasks.active if not text else tasks.one_shot(text)
        except (ValueError, TypeError) as exc:   # the request's task (the encoder's refusals)
            response.success, response.message = False, f"task {quote(text)} rejected: {exc}"
            return response
        except Exception as exc:  # noqa: BLE001  a fault of the node: logged with its traceback and counted
            self.callback_failed(exc)
            response.success, response.message = False, f"encoding task {quote(text)} failed: {type(exc).__name__}: {exc}"
            return response
        result, error = worker.segment(request.image.header, rgb, task)
        if result is None:
            response.success, response.message = False, error
        else:
            response.success = True
            response.message = f"{len(result.instances)} instance(s) for {quote(task.caption)}"
            if task.revision == ONE_SHOT_REVISION:
                response.message += (f" (this request's own task: task_revision {ONE_SHOT_REVISION}, "
                                     f"the active task stays revision {self.active_task.revision})")
            if task.warning:
                response.message += f"; WARNING: {task.warning}"
            response.result = result
        return response

    # --- parameters and diagnostics ----------------------------------------------------------

    def set_parameters(self, parameter_list: list) -> list:
        try:
            return super().set_parameters(parameter_list)
        finally:
            self._keep_value_types(parameter_list)

    def set_parameters_atomically(self, parameter_list: list) -> Any:
        # (The parameter services call this one, for single sets too.)
        try:
            return super().set_parameters_atomically(parameter_list)
        finally:
            self._keep_value_types(parameter_list)

    def _keep_value_types(self, params: list) -> None:
        """Dynamic typing (params.declare) lets rclpy give a stored descriptor the incoming value's
        type before any check: a refused set (by rclpy's range check of another parameter of the
        same atomic set, or by :meth:`_on_set_parameters`) left `ros2 param describe` (and rqt's
        editors) saying string for score_threshold. The type is the kept value's again."""
        for param in params:
            kept = self._descriptors.get(param.name) if param.name in parameters.SPECS else None
            if kept is not None and self.has_parameter(param.name):
                kept.type = self.get_parameter(param.name).type_.value

    def _on_set_parameters(self, params: list) -> Any:
        result = parameters.check_parameter_changes(params, self._settings.values)
        if result.successful:
            # Replace the whole settings object: the inference thread reads one consistent set.
            # (ints_to_doubles again: Humble has no pre-set callback, and `1` means 1.0 there too.)
            self._settings = self._settings.replace({p.name: parameters._plain(p.value)
                                                     for p in parameters.ints_to_doubles(params)
                                                     if p.name in parameters.SPECS})
        return result

    @property
    def inline_callback_groups(self) -> tuple:
        """The callback groups short enough to run in the spinning thread (``PerceptionExecutor``):
        the raw image and depth subscriptions (validate, convert, put into a slot: ~0.1 ms).
        Compressed images are decoded in the pool."""
        return () if self._settings["input.compressed"] else (self._image_group,)

    @property
    def waiting_callback_groups(self) -> tuple:
        """The callback groups that wait for the inference thread (``segment_image``): run in a
        pool of their own (``PerceptionExecutor``), so that requests waiting there never keep a task
        or parameter change waiting."""
        return (self._segment_group,)

    @property
    def settings(self) -> parameters.Settings:
        return self._settings

    def diagnostics_values(self) -> dict[str, Any]:
        return report_values(ready=self._ready, task=self.active_task, model=self.model, counters=self.counters,
                             inference_ms=self.inference_ms, latency_ms=self.latency_ms,
                             cameras=self._cameras, dropped=self._inputs.slots.dropped,
                             out_of_order=self._inputs.slots.out_of_order,
                             geometry_ms=self.geometry_ms if self._depth is not None else None,
                             busy_s=self._worker.busy_s() if self._worker is not None else 0.0,
                             warmup_ms=self._warmup_ms)

    def _publish_diagnostics(self) -> None:
        with self._state_lock:
            phase = self._phase
            if phase == CONFIGURING:  # StartupDiagnostics reports each step
                return
            failure = self.transition_failure
            hung = self._outliving_worker is not None and self._outliving_worker.running
            if phase in (UNCONFIGURED, FINALIZED):
                if failure:   # a model that cannot load reported OK (the plain node exits with code 3)
                    self._publish_startup_report(ERROR, f"{phase} (lifecycle): {failure}")
                elif hung:   # OK "unconfigured" said nothing of it
                    running = f"the last forward pass has run for {self._outliving_worker.busy_s():.0f} s and not ended"
                    self._publish_startup_report(WARN, f"unconfigured (lifecycle): {running}; activate is refused "
                                                 "until it does" if phase == UNCONFIGURED
                                                 else f"finalized (lifecycle): shut down; {running}")
                else:
                    self._publish_startup_report(OK, "unconfigured (lifecycle): configure it to load the model"
                                                 if phase == UNCONFIGURED else "finalized (lifecycle): shut down")
                return
            values = self.diagnostics_values()
            if phase == ACTIVE:
                level, message = self._health.judge(values, ready=True, last_error=self._worker.last_error,
                                                    receiving=self._inputs.receiving(),
                                                    cameras=[camera.subscribed_name for camera in self._cameras])
            elif failure:
                level, message = ERROR, f"inactive (lifecycle): {failure}"
            elif hung:
                # OK "inactive" said nothing of a hung pass that will refuse the next activate.
                level, message = WARN, (f"inactive (lifecycle): the previous forward pass has run for "
                                        f"{self._outliving_worker.busy_s():.0f} s and not ended (deactivate could "
                                        "not wait for it); activate is refused until it does")
            else:
                level, message = OK, "inactive (lifecycle): model loaded, no images taken until activated"
            device = self.model.device
        self._diag_pub.publish(diagnostic_array(self.get_clock().now().to_msg(), self._diagnostics_name(),
                                                device, level, message, values))

    def _publish_startup_report(self, level: int, message: str) -> None:
        """The status while the node starts (:mod:`toist_ros.startup_status`): what it was asked to load."""
        settings = self._settings
        values = {"task": settings["task"], "checkpoint": settings["checkpoint"] or "(the embedded default model)",
                  "device": settings["device"]}
        self._diag_pub.publish(diagnostic_array(self.get_clock().now().to_msg(), self._diagnostics_name(),
                                                settings["device"], level, message, values))

    def _diagnostics_name(self) -> str:
        return f"toist_ros: perception ({self.get_fully_qualified_name()})"

    def callback_failed(self, exc: BaseException) -> None:
        """A callback raised (a fault of the node: bad input each callback answers itself): logged
        with its traceback and counted in ``internal_errors``; the node goes on, as its inference
        thread does (``PerceptionExecutor``'s ``on_callback_error``). A service callback that
        raised sends no response: its client waits until its own timeout."""
        self.counters.add("internal_errors")
        self.get_logger().error("unexpected error in a callback (the node goes on): "
                                + "".join(traceback.format_exception(exc)).rstrip(), throttle_duration_sec=5.0)

    # --- shut-down ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        """A stop signal came: a lifecycle transition under way ends at its next step (the step in
        progress, e.g. a model load, ends first)."""
        self._stopping.set()

    def stop(self) -> bool:
        """Stop the inference thread (waits for the frame in progress, up to
        ``inference_worker.STOP_WAIT_S``); False when it is still in that forward pass."""
        worker, inputs = getattr(self, "_worker", None), getattr(self, "_inputs", None)
        if worker is not None:
            return worker.stop()
        if inputs is not None:
            inputs.slots.close()
        return True

    def destroy_node(self) -> None:
        self.stop()
        super().destroy_node()


def _resolved_name(node: Node, service: Any) -> str:
    """A service's full name (``/robot/set_task`` in namespace ``/robot``), as logged for topics:
    rclpy's ``service_name`` (after remapping) where it has one; older rclpy (Humble) has only
    ``srv_name``, the name as given, which is put in the node's namespace here (remapping not
    applied)."""
    name = getattr(service, "service_name", None)
    if name:
        return name
    given = service.srv_name
    return given if given.startswith("/") else f"{node.get_namespace().rstrip('/')}/{given}"


def _latched_qos() -> QoSProfile:
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)


__all__ = ["NODE_NAME", "PerceptionNode"]
