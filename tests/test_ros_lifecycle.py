"""The lifecycle (managed) perception node, driven through the standard lifecycle services as a
manager drives it (nav2's lifecycle_manager, `ros2 lifecycle set`): real rclpy on loopback, the
`tiny` model's random weights as a model directory, the node in this process; and the installed
`perception_lifecycle_node` executable as a process."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ros_support import random_model_dir, wait_for
from ros_support import ros_per_module as ros  # noqa: F401 (a fixture)

pytestmark = pytest.mark.ros

ROOT = Path(__file__).resolve().parents[1]
EXECUTABLE = ROOT / "install" / "toist_ros" / "lib" / "toist_ros" / "perception_lifecycle_node"
OVERRIDES = {"device": "cpu", "input.short_side": 160, "input.max_side": 640, "task": "2", "max_instances": 5,
             "score_threshold": 0.5, "input.no_image_warning_s": 60.0, "diagnostics.period_s": 0.3}


class Manager:
    """A lifecycle manager and client of one managed node in namespace ``ns``: lifecycle
    services, images in, instances / status / diagnostics out, the node's services."""

    made = 0

    def __init__(self, ros, ns):
        from diagnostic_msgs.msg import DiagnosticArray
        from lifecycle_msgs.srv import ChangeState, GetState
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image
        from toist_ros.msg import TaskInstances, TaskStatus
        from toist_ros.srv import SegmentImage, SetTask

        Manager.made += 1
        self.ns = ns
        self.node = ros.node(f"lifecycle_manager_{Manager.made}")
        self.results, self.status, self.diagnostics = [], [], []
        self.image_pub = self.node.create_publisher(Image, f"{ns}/image", 10)
        self.node.create_subscription(TaskInstances, f"{ns}/instances", self.results.append, 10)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.node.create_subscription(TaskStatus, f"{ns}/active_task", self.status.append, latched)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)
        self.change_client = self.node.create_client(ChangeState, f"{ns}/toist_perception/change_state")
        self.state_client = self.node.create_client(GetState, f"{ns}/toist_perception/get_state")
        self.set_task_client = self.node.create_client(SetTask, f"{ns}/set_task")
        self.segment_client = self.node.create_client(SegmentImage, f"{ns}/segment_image")
        assert self.change_client.wait_for_service(timeout_sec=20) and self.state_client.wait_for_service(timeout_sec=20)

    def _on_diagnostics(self, msg):
        self.diagnostics.extend(s for s in msg.status if f"({self.ns}/toist_perception)" in s.name)

    def call(self, client, request, timeout=60.0):
        future = client.call_async(request)
        if not wait_for(future.done, timeout=timeout):
            # Seen once on a fresh clone, never reproduced: where every thread stands tells a lost
            # response from a blocked executor.
            import faulthandler
            import sys

            faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)   # fd 2 (captured too)
            pytest.fail(f"service {client.srv_name} did not answer within {timeout} s (thread stacks above)")
        return future.result()

    def transition(self, label):
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        ids = {"configure": Transition.TRANSITION_CONFIGURE, "activate": Transition.TRANSITION_ACTIVATE,
               "deactivate": Transition.TRANSITION_DEACTIVATE, "cleanup": Transition.TRANSITION_CLEANUP,
               "shutdown": Transition.TRANSITION_ACTIVE_SHUTDOWN}
        request = ChangeState.Request(transition=Transition(id=ids[label]))
        return self.call(self.change_client, request).success

    def state(self):
        from lifecycle_msgs.srv import GetState

        return self.call(self.state_client, GetState.Request()).current_state.label

    def set_task(self, text):
        from toist_ros.srv import SetTask

        assert self.set_task_client.wait_for_service(timeout_sec=20)
        return self.call(self.set_task_client, SetTask.Request(task=text))

    def segment(self, pixels):
        from toist_ros.conversions import image_from_array
        from toist_ros.srv import SegmentImage

        assert self.segment_client.wait_for_service(timeout_sec=20)
        return self.call(self.segment_client, SegmentImage.Request(image=image_from_array(pixels, "rgb8")))

    def image_subscribers(self):
        return self.image_pub.get_subscription_count()

    def roundtrip(self, pixels, timeout=30.0):
        """Publish frames until one's result arrives; the result or None."""
        from toist_ros.conversions import image_from_array

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = image_from_array(pixels, "rgb8")
            msg.header.stamp = self.node.get_clock().now().to_msg()
            msg.header.frame_id = "camera"
            self.image_pub.publish(msg)
            if wait_for(lambda: any(r.header == msg.header for r in self.results), timeout=3):
                return next(r for r in self.results if r.header == msg.header)
        return None

    def newest_diagnostic(self, since):
        assert wait_for(lambda: len(self.diagnostics) > since, timeout=10)
        return self.diagnostics[-1]


def _pixels():
    return np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return random_model_dir(tmp_path_factory.mktemp("model") / "tiny_random")


def _managed_node(ros, ns, **overrides):
    from rclpy.parameter import Parameter
    from toist_ros.lifecycle_node import ManagedPerceptionNode

    values = {**OVERRIDES, **overrides}
    node = ManagedPerceptionNode(context=ros.context, namespace=ns,
                                 parameter_overrides=[Parameter(k, value=v) for k, v in values.items()])
    ros.add(node)
    return node


def test_a_managed_node_goes_through_its_states_as_its_manager_says(ros, model_dir, capfd):
    node = _managed_node(ros, "/managed", checkpoint=model_dir)
    manager = Manager(ros, "/managed")
    # Said at once (it logged nothing until configured: it looked hung).
    assert ("lifecycle node unconfigured: configure it to load the model, then activate it "
            "(ros2 lifecycle set /managed/toist_perception configure)") in capfd.readouterr().err

    # unconfigured: parameters only; no model, no camera subscription, no services, not ready.
    assert manager.state() == "unconfigured" and node.model is None
    assert wait_for(lambda: any(not s.ready for s in manager.status), timeout=10)
    assert manager.image_subscribers() == 0 and not manager.set_task_client.wait_for_service(timeout_sec=0.5)
    report = manager.newest_diagnostic(0)
    assert report.level == b"\x00" and "unconfigured (lifecycle)" in report.message

    # configure: model loaded and warmed up, task encoded, services there; still no images taken.
    assert manager.transition("configure") and manager.state() == "inactive"
    assert node.model is not None
    reply = manager.set_task("1")
    assert reply.success and reply.revision == 2
    refused = manager.segment(_pixels())
    assert not refused.success and "inactive (lifecycle): activate it" in refused.message
    assert manager.image_subscribers() == 0
    seen = len(manager.diagnostics)
    assert "inactive (lifecycle)" in manager.newest_diagnostic(seen).message
    assert not manager.status[-1].ready and manager.status[-1].revision == 2

    # activate: images in, instances out; segment_image answers; ready.
    assert manager.transition("activate") and manager.state() == "active"
    assert wait_for(lambda: manager.status[-1].ready, timeout=10)
    result = manager.roundtrip(_pixels())
    assert result is not None and result.task_revision == 2 and len(result.instances) > 0
    assert manager.segment(_pixels()).success

    # deactivate: no subscription, inference thread ended, the model and the task stay; the ended
    # thread's malloc arena is given back (each cycle kept it: ~200 MiB over 40 cycles).
    import toist_ros.node as node_module

    trims = []
    real_trim = node_module.return_free_memory
    node_module.return_free_memory = lambda: trims.append(1) or real_trim()
    # The QoS check (a timer callback) deciding to re-subscribe just as a deactivate in another
    # thread destroys the subscriptions: it re-created one after them (it outlived the cleanup,
    # and the next activate took every frame twice).
    inputs = node._inputs
    camera = inputs.cameras[0]

    def deactivated_meanwhile(camera_, current):
        inputs.unsubscribe()
        return not current

    inputs._wanted_reliable = deactivated_meanwhile
    try:
        inputs.check()
    finally:
        del inputs._wanted_reliable
    assert camera.subscription is None
    try:
        assert manager.transition("deactivate") and manager.state() == "inactive"
    finally:
        node_module.return_free_memory = real_trim
    assert trims == [1]
    assert wait_for(lambda: manager.image_subscribers() == 0, timeout=10)
    assert not node._worker._thread.is_alive() and node.model is not None
    assert wait_for(lambda: not manager.status[-1].ready, timeout=10)
    count = len(manager.results)
    for _ in range(20):  # the camera goes on publishing during the pause
        manager.image_pub.publish(_image_msg(manager))
        time.sleep(0.02)
    time.sleep(0.5)
    assert len(manager.results) == count
    refused = manager.segment(_pixels())
    assert not refused.success and "inactive (lifecycle): activate it" in refused.message
    # Straight to the stopped worker (a request racing the deactivate): answered at once, not
    # after the service's 60 s timeout.
    from toist_ros.inference_worker import STOPPED

    started = time.monotonic()
    assert node._worker.segment(_image_msg(manager).header, _pixels(), node.active_task) == (None, STOPPED)
    assert time.monotonic() - started < 5.0

    # activate again: a new inference thread, frames processed again (a thread cannot restart);
    # what the camera sent during the pause is not "lost in transport" (no WARN for it); a frame
    # left waiting from before the pause is dropped, in the per-camera count and in the total.
    node._inputs.slots.put(0, "a frame that waited through the pause")
    replaced, camera_dropped = node.counters.get("dropped_replaced"), node._inputs.slots.dropped[0]
    warned = node.counters.get("no_image_warnings")
    assert manager.transition("activate") and manager.state() == "active"
    assert node.counters.get("dropped_replaced") == replaced + 1
    assert node._inputs.slots.dropped[0] == camera_dropped + 1
    # The no-image warning watches this activation: frames came before the pause, none since.
    node._inputs.warn_no_image()
    assert node.counters.get("no_image_warnings") == warned + 1
    assert manager.roundtrip(_pixels()) is not None
    assert node.counters.get("lost_in_transport") == 0

    # deactivate + cleanup: the model released, services gone; configure + activate again works.
    # A frame still waiting at the deactivate is counted dropped then (the cleanup throws the
    # slots away: it was never counted, received ran ahead of the other totals).
    replaced = node.counters.get("dropped_replaced")
    inputs = node._inputs
    real_unsubscribe = inputs.unsubscribe

    def unsubscribe_after_a_late_frame():   # it came after the inference thread stopped
        inputs.slots.put(0, "a frame left at the deactivate")
        real_unsubscribe()

    inputs.unsubscribe = unsubscribe_after_a_late_frame
    try:
        assert manager.transition("deactivate")
    finally:
        del inputs.unsubscribe
    assert node.counters.get("dropped_replaced") == replaced + 1
    assert manager.transition("cleanup")
    assert manager.state() == "unconfigured" and node.model is None
    # A task message whose callback runs after the cleanup is refused, not an AttributeError.
    ok, message, _ = node.set_task("3")
    assert not ok and "unconfigured (lifecycle)" in message
    assert wait_for(lambda: not manager.set_task_client.service_is_ready(), timeout=10)
    assert manager.transition("configure") and manager.transition("activate")
    result = manager.roundtrip(_pixels())
    assert result is not None and result.task_revision == 1  # the start-up task again, encoded anew

    # shutdown from active: finalized, nothing runs.
    worker = node._worker
    assert manager.transition("shutdown") and manager.state() == "finalized"
    assert not worker._thread.is_alive() and node.model is None
    assert manager.image_subscribers() == 0
    seen = len(manager.diagnostics)
    assert "finalized (lifecycle)" in manager.newest_diagnostic(seen).message


def _image_msg(manager):
    from toist_ros.conversions import image_from_array

    msg = image_from_array(_pixels(), "rgb8")
    msg.header.stamp = manager.node.get_clock().now().to_msg()
    return msg


def test_a_configure_that_fails_leaves_the_node_unconfigured_and_can_be_retried(ros, tmp_path, capfd):
    """A checkpoint that is not there (yet: the model is still being copied to the robot) fails
    the configure transition with the reason in the log; the node goes on, unconfigured, and
    configures once the file is there."""
    missing = tmp_path / "arriving_model"
    node = _managed_node(ros, "/retry", checkpoint=str(missing), **{"input.no_image_warning_s": 1.0})
    manager = Manager(ros, "/retry")
    assert not manager.transition("configure")
    error = next((line for line in capfd.readouterr().err.splitlines() if "lifecycle configure failed" in line), "")
    assert error.startswith("[ERROR]") and str(missing) in error, error
    assert manager.state() == "unconfigured" and node.model is None
    assert manager.image_subscribers() == 0 and not manager.set_task_client.service_is_ready()
    # /diagnostics says so (it said OK, "configure it to load the model", of a model that cannot load).
    report = manager.newest_diagnostic(len(manager.diagnostics))
    assert report.level == b"\x02" and "configure failed" in report.message and str(missing) in report.message
    random_model_dir(missing)
    assert manager.transition("configure") and manager.transition("activate")
    assert manager.roundtrip(_pixels()) is not None
    assert manager.newest_diagnostic(len(manager.diagnostics)).level == b"\x00"

    # A camera that stops during a pause is reported after the next activate, as at start-up.
    assert manager.transition("deactivate")
    before = node.counters.get("no_image_warnings")
    assert manager.transition("activate")
    assert wait_for(lambda: node.counters.get("no_image_warnings") == before + 1, timeout=10)


def test_a_task_change_encoding_during_cleanup_publishes_nothing_after_it():
    """`set_task` encoding while a lifecycle cleanup ran published its task over the status the
    cleanup had just published (a node without a model announcing a task)."""
    import threading

    from toist_ros.tasks import TaskSwitch

    published, encoding, release = [], threading.Event(), threading.Event()

    def encode(text):
        if text == "slow":
            encoding.set()
            release.wait(5)
        return type("State", (), {"caption": f"caption of {text}", "task_id": None})()

    log = type("Log", (), {"info": print, "warning": print, "error": print})()
    tasks = TaskSwitch(encode, published.append, log)
    tasks.start("2")
    replies = []
    thread = threading.Thread(target=lambda: replies.append(tasks.set("slow")))
    thread.start()
    assert encoding.wait(5)
    tasks.close()
    release.set()
    thread.join(5)
    assert replies and not replies[0][0] and "lifecycle cleanup" in replies[0][1]
    assert published == [] and tasks.active.revision == 1
    tasks.publish_active()
    assert published == []
    # The active task asked for again after the cleanup (a `ros2 topic pub` repeating): refused
    # as any other, not said again on active_task by a node without a model.
    ok, message, _ = tasks.set("2")
    assert not ok and "not taken" in message and "lifecycle cleanup" in message
    assert published == []


def test_the_lifecycle_executable_waits_for_its_manager_and_stops_on_sigint(ros, tmp_path, model_dir):
    """`perception_lifecycle_node` (what `lifecycle:=true` launches): unconfigured until told,
    the whole way to active over DDS, exit code 0 on SIGINT."""
    if not EXECUTABLE.exists():
        pytest.fail(f"{EXECUTABLE} is missing: run `make build`")
    log_path = tmp_path / "node.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(EXECUTABLE), "--ros-args", "-r", "__ns:=/process", "-p", "device:=cpu",
             "-p", "input.short_side:=160", "-p", "input.max_side:=640", "-p", f"checkpoint:={model_dir}"],
            stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        manager = Manager(ros, "/process")
        assert manager.state() == "unconfigured"
        assert manager.transition("configure") and manager.transition("activate"), log_path.read_text()[-3000:]
        assert manager.roundtrip(_pixels()) is not None
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            code = process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    assert "lifecycle configure: now inactive" in text and "lifecycle activate: now active" in text


def _held_model_load(monkeypatch):
    """The node's model load waits (up to 20 s) until ``release`` is set; ``loading`` is set
    when it has begun. Returns (loading, release)."""
    import threading

    import toist_ros.node as node_module

    loading, release = threading.Event(), threading.Event()
    load = node_module.load_model

    def held_load(*args, **kwargs):
        loading.set()
        release.wait(20)
        return load(*args, **kwargs)

    monkeypatch.setattr(node_module, "load_model", held_load)
    return loading, release


def test_a_stop_during_configure_ends_it_at_its_next_step(ros, model_dir, capfd, monkeypatch):
    """A configure runs in an executor thread, which a stop signal cannot interrupt: `main` asks
    the node to stop, and the configure ends after the step under way (here the model load)
    instead of going on to warm up (seconds more on a CPU, past launch's SIGKILL)."""
    import threading

    from rclpy.lifecycle import TransitionCallbackReturn

    loading, release = _held_model_load(monkeypatch)
    node = _managed_node(ros, "/stopping", checkpoint=model_dir)
    warmed = []
    monkeypatch.setattr(node, "_warm_up", lambda: warmed.append(True))
    result = []
    thread = threading.Thread(target=lambda: result.append(node.trigger_configure()))
    thread.start()
    assert loading.wait(10)
    node.request_stop()       # what perception_node's main does on SIGINT / SIGTERM
    release.set()
    thread.join(30)
    assert result == [TransitionCallbackReturn.FAILURE]
    assert not warmed and node.model is None and node._phase == "unconfigured"
    assert "lifecycle configure stopped before 'encoding the start-up task' (a stop signal)" in capfd.readouterr().err


def test_state_and_parameters_answer_while_a_transition_runs(ros, model_dir, monkeypatch):
    """The lifecycle services shared the node's default callback group with the parameter
    services: during a configure (a model load, a warm-up: tens of seconds) `ros2 lifecycle get`
    and `ros2 param get/set` got no answer."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState
    from rcl_interfaces.srv import GetParameters

    loading, release = _held_model_load(monkeypatch)
    node = _managed_node(ros, "/busy", checkpoint=model_dir)
    manager = Manager(ros, "/busy")
    try:
        configured = manager.change_client.call_async(ChangeState.Request(transition=Transition(
            id=Transition.TRANSITION_CONFIGURE)))
        assert loading.wait(20)
        state = manager.call(manager.state_client, GetState.Request(), timeout=10)
        assert state.current_state.label == "configuring"
        params = manager.node.create_client(GetParameters, "/busy/toist_perception/get_parameters")
        assert params.wait_for_service(timeout_sec=10)
        answer = manager.call(params, GetParameters.Request(names=["score_threshold"]), timeout=10)
        assert answer.values[0].double_value == 0.5
        # A second transition asked meanwhile is refused, not run beside the first.
        again = manager.call(manager.change_client, ChangeState.Request(transition=Transition(
            id=Transition.TRANSITION_CONFIGURE)), timeout=10)
        assert not again.success
    finally:
        release.set()
    assert wait_for(configured.done, timeout=60) and configured.result().success
    assert manager.state() == "inactive" and node.model is not None
    assert manager.transition("cleanup") and manager.state() == "unconfigured"


def test_a_forward_pass_outliving_deactivate_publishes_nothing_and_holds_activate_back(ros, model_dir, monkeypatch):
    """deactivate waited 30 s for the frame in progress, then said SUCCESS with the thread still
    running; activate started a second inference thread beside it."""
    import threading

    import toist_ros.inference_worker as worker_module
    from toist_ros.conversions import image_from_array

    node = _managed_node(ros, "/stuck", checkpoint=model_dir)
    manager = Manager(ros, "/stuck")
    assert manager.transition("configure") and manager.transition("activate")
    assert manager.roundtrip(_pixels()) is not None
    inside, release = threading.Event(), threading.Event()
    predict = worker_module.predict

    def stuck(*args, **kwargs):   # a hung GPU / a frame far too big for the CPU
        inside.set()
        release.wait(30)
        return predict(*args, **kwargs)

    monkeypatch.setattr(worker_module, "predict", stuck)
    monkeypatch.setattr(worker_module, "STOP_WAIT_S", 0.5)
    try:
        manager.image_pub.publish(image_from_array(_pixels(), "rgb8"))
        assert inside.wait(20)
        time.sleep(0.2)
        assert float(node.diagnostics_values()["forward pass running s"]) > 0.1   # /diagnostics sees the pass
        old = node._worker
        published = len(manager.results)
        assert manager.transition("deactivate") and manager.state() == "inactive" and old.running
        report = manager.newest_diagnostic(len(manager.diagnostics))   # not OK "inactive": a hung pass
        assert report.level == b"\x01" and "inactive (lifecycle): the previous forward pass has run for" in \
            report.message, report.message
        assert not manager.transition("activate") and manager.state() == "inactive"   # one thread at a time
        release.set()
        assert wait_for(lambda: not old.running, timeout=30)
        time.sleep(0.3)
        assert len(manager.results) == published   # its frame's result is not published
        assert node.counters.get("dropped_abandoned") == 1   # received, and counted as what became of it
        assert old._segmenter is None   # the ended worker, kept until activate, holds no model (GPU memory)
    finally:
        release.set()
    monkeypatch.setattr(worker_module, "predict", predict)
    assert manager.transition("activate") and manager.state() == "active"
    assert node._worker is not old and node._worker.running and not old.running   # one thread at a time
    assert manager.roundtrip(_pixels()) is not None
    assert manager.transition("deactivate") and manager.transition("cleanup")


def test_a_deactivate_that_fails_part_way_ends_unconfigured_not_active(ros, model_dir, monkeypatch):
    """FAILURE from a step without an undo told the manager "still active" of a node that had
    stopped its inference thread (and /diagnostics said inactive): error processing now releases
    it, and it can be configured again."""
    node = _managed_node(ros, "/halfway", checkpoint=model_dir)
    manager = Manager(ros, "/halfway")
    assert manager.transition("configure") and manager.transition("activate")
    assert manager.roundtrip(_pixels()) is not None
    worker, unsubscribe, calls = node._worker, node._inputs.unsubscribe, []

    def broken_once():   # refused the first time; error processing tries again
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the middleware refused")
        unsubscribe()

    monkeypatch.setattr(node._inputs, "unsubscribe", broken_once)
    assert not manager.transition("deactivate")
    assert manager.state() == "unconfigured" and node.model is None and node._phase == "unconfigured"
    # Released for real: no camera subscription, no inference thread (they were left running).
    assert not worker.running and wait_for(lambda: manager.image_subscribers() == 0, timeout=10)
    report = manager.newest_diagnostic(len(manager.diagnostics))   # error processing kept the reason
    assert report.level == b"\x02" and "deactivate failed: RuntimeError: the middleware refused" in report.message
    monkeypatch.undo()
    assert manager.transition("configure") and manager.transition("activate")
    assert manager.roundtrip(_pixels()) is not None
    # A shutdown that fails part-way still ends finalized (ERROR went back to unconfigured).
    cleanup = node._cleanup

    def broken_cleanup():
        cleanup()
        raise RuntimeError("the driver refused")

    monkeypatch.setattr(node, "_cleanup", broken_cleanup)
    assert not manager.transition("shutdown")
    assert manager.state() == "finalized" and node.model is None


def test_depth_inputs_follow_the_lifecycle_too(ros, model_dir):
    """With depth.enabled the depth image and CameraInfo subscriptions come with activate and go
    with deactivate, as the camera's; the markers output is there from configure on."""
    from sensor_msgs.msg import CameraInfo, Image
    from visualization_msgs.msg import MarkerArray

    node = _managed_node(ros, "/rgbd", checkpoint=model_dir, warmup=False, **{"depth.enabled": True})
    manager = Manager(ros, "/rgbd")
    depth_pub = manager.node.create_publisher(Image, "/rgbd/depth", 1)
    info_pub = manager.node.create_publisher(CameraInfo, "/rgbd/camera_info", 1)
    markers = manager.node.create_subscription(MarkerArray, "/rgbd/markers", lambda msg: None, 1)

    def subscribed():
        return (depth_pub.get_subscription_count(), info_pub.get_subscription_count())

    assert manager.transition("configure") and subscribed() == (0, 0)
    assert wait_for(lambda: markers.get_publisher_count() == 1, timeout=10)
    for _ in range(2):  # activate, deactivate, and once more: subscribed again
        assert manager.transition("activate")
        assert wait_for(lambda: subscribed() == (1, 1), timeout=10), subscribed()
        assert manager.transition("deactivate")
        assert wait_for(lambda: subscribed() == (0, 0), timeout=10), subscribed()
    assert manager.transition("cleanup")
    assert wait_for(lambda: markers.get_publisher_count() == 0, timeout=10)
    assert node.model is None
