"""toist_ros.executor.PerceptionExecutor with real rclpy on loopback: inline groups run in the
spinning thread, the others in its pool; a blocked pool callback does not hold up the inline ones;
errors surface from spin_once."""

import contextlib
import threading
import time

import pytest

from ros_support import rclpy, wait_for  # noqa: F401  (skips without rclpy)

pytestmark = pytest.mark.ros


@pytest.fixture
def setup():
    from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
    from toist_ros.executor import PerceptionExecutor

    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("executor_probe", context=context)
    inline, pooled = ReentrantCallbackGroup(), MutuallyExclusiveCallbackGroup()
    executor = PerceptionExecutor([inline], num_threads=2, context=context)
    executor.add_node(node)
    yield node, inline, pooled, executor
    executor.shutdown()
    node.destroy_node()
    rclpy.shutdown(context=context)


def _spin_until(executor, predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.05)
    return predicate()


@contextlib.contextmanager
def _reporting_executor(name, num_threads=2):
    """A node with an inline group, and a PerceptionExecutor that hands callback errors to a list
    (as the node process does): yields (node, inline group, executor, errors)."""
    from rclpy.callback_groups import ReentrantCallbackGroup
    from toist_ros.executor import PerceptionExecutor

    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node(name, context=context)
    inline, errors = ReentrantCallbackGroup(), []
    executor = PerceptionExecutor([inline], num_threads=num_threads, context=context, on_callback_error=errors.append)
    executor.add_node(node)
    try:
        yield node, inline, executor, errors
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)


def test_inline_group_runs_in_the_spinning_thread_and_others_in_the_pool(setup):
    from std_msgs.msg import String

    node, inline, pooled, executor = setup
    threads = {"inline": [], "pooled": []}
    node.create_subscription(String, "/exec/inline", lambda m: threads["inline"].append(threading.current_thread()),
                             10, callback_group=inline)
    node.create_subscription(String, "/exec/pooled", lambda m: threads["pooled"].append(threading.current_thread()),
                             10, callback_group=pooled)
    pubs = [node.create_publisher(String, f"/exec/{name}", 10) for name in ("inline", "pooled")]
    assert _spin_until(executor, lambda: all(p.get_subscription_count() for p in pubs))
    for _ in range(3):
        for pub in pubs:
            pub.publish(String(data="x"))
    assert _spin_until(executor, lambda: len(threads["inline"]) == 3 and len(threads["pooled"]) == 3)
    assert set(threads["inline"]) == {threading.current_thread()}
    assert all(t.name.startswith("toist_callbacks") for t in threads["pooled"])


def test_a_blocked_pool_callback_does_not_hold_up_inline_callbacks(setup):
    """As segment_image waits for the inference thread while frames keep arriving."""
    from std_msgs.msg import String

    node, inline, pooled, executor = setup
    released, finished = threading.Event(), threading.Event()

    def blocking(_msg):
        finished.set() if released.wait(timeout=15) else None

    node.create_subscription(String, "/exec/block", blocking, 10, callback_group=pooled)
    node.create_subscription(String, "/exec/frame", lambda m: released.set(), 10, callback_group=inline)
    block_pub, frame_pub = (node.create_publisher(String, t, 10) for t in ("/exec/block", "/exec/frame"))
    assert _spin_until(executor, lambda: block_pub.get_subscription_count() and frame_pub.get_subscription_count())
    block_pub.publish(String(data="wait"))
    time.sleep(0.2)
    frame_pub.publish(String(data="frame"))
    assert _spin_until(executor, finished.is_set, timeout=10)


def test_an_inline_callback_error_is_raised_by_spin_once(setup):
    from std_msgs.msg import String

    node, inline, _pooled, executor = setup

    def broken(_msg):
        raise RuntimeError("image callback failed")

    node.create_subscription(String, "/exec/broken", broken, 10, callback_group=inline)
    pub = node.create_publisher(String, "/exec/broken", 10)
    assert _spin_until(executor, lambda: pub.get_subscription_count() > 0)
    pub.publish(String(data="x"))
    with pytest.raises(RuntimeError, match="image callback failed"):
        _spin_until(executor, lambda: False, timeout=5)


def test_spin_until_future_complete_serves_a_service_from_the_pool(setup):
    """rclpy's Executor.spin_until_future_complete (what client code calls) works on this executor."""
    from toist_ros.srv import SetTask

    node, _inline, pooled, executor = setup

    def answer(_request, response):
        response.success, response.message = True, threading.current_thread().name
        return response

    node.create_service(SetTask, "/exec/trigger", answer, callback_group=pooled)
    client = node.create_client(SetTask, "/exec/trigger")
    assert client.wait_for_service(timeout_sec=10)
    future = client.call_async(SetTask.Request())
    executor.spin_until_future_complete(future, timeout_sec=10)
    assert future.done() and future.result().success
    assert future.result().message.startswith("toist_callbacks")


@pytest.mark.parametrize("pool", ["callbacks", "waiting"])
def test_a_pool_callback_error_is_raised_by_spin_once(setup, pool):
    """rclpy's Task keeps what its callback raised; the pool's future held None, so every pooled
    callback's error was dropped without a word (a service that raised never answered)."""
    from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
    from std_msgs.msg import String

    node, _inline, pooled, executor = setup
    group = pooled
    if pool == "waiting":
        group = MutuallyExclusiveCallbackGroup()
        executor.run_apart([group])

    def broken(_msg):
        raise RuntimeError(f"{pool} callback failed")

    node.create_subscription(String, "/exec/broken_pooled", broken, 10, callback_group=group)
    pub = node.create_publisher(String, "/exec/broken_pooled", 10)
    assert _spin_until(executor, lambda: pub.get_subscription_count() > 0)
    pub.publish(String(data="x"))
    with pytest.raises(RuntimeError, match=f"{pool} callback failed"):
        _spin_until(executor, lambda: False, timeout=5)


def test_callback_errors_go_to_on_callback_error_and_spinning_goes_on():
    """The node process's choice: a fault in one callback is reported, and the others keep running."""
    from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
    from std_msgs.msg import String

    with _reporting_executor("executor_errors") as (node, inline, executor, errors):
        pooled, served = MutuallyExclusiveCallbackGroup(), []

        def broken(msg):
            if msg.data == "fail":
                raise RuntimeError(f"failed in {threading.current_thread().name}")
            served.append(msg.data)

        for topic, group in (("/exec/e_inline", inline), ("/exec/e_pooled", pooled)):
            node.create_subscription(String, topic, broken, 10, callback_group=group)
        pubs = [node.create_publisher(String, topic, 10) for topic in ("/exec/e_inline", "/exec/e_pooled")]
        assert _spin_until(executor, lambda: all(p.get_subscription_count() for p in pubs))
        for pub in pubs:
            pub.publish(String(data="fail"))
        assert _spin_until(executor, lambda: len(errors) == 2)
        for pub in pubs:
            pub.publish(String(data="after"))
        assert _spin_until(executor, lambda: served == ["after", "after"])
        names = sorted(str(e) for e in errors)
        assert names[0] == f"failed in {threading.current_thread().name}"   # the inline one
        assert names[1].startswith("failed in toist_callbacks")


def test_an_entity_destroyed_while_the_wait_set_is_built_is_not_an_error(setup):
    """rclpy adds waitables (a subscription's QoS event handlers) to the wait set unguarded; one
    that another thread destroyed meanwhile (a lifecycle deactivate unsubscribing the cameras,
    seen under load) raised InvalidHandle out of spin_once and ended the node's process."""
    from rclpy.exceptions import InvalidHandle
    from rclpy.waitable import NumberOfEntities, Waitable
    from std_msgs.msg import String

    node, inline, _pooled, executor = setup

    class DestroyedMeanwhile(Waitable):
        def __init__(self):
            super().__init__(inline)
            self.raised = 0

        def __enter__(self):   # rclpy holds a waitable's handles while it builds the wait set
            return None

        def __exit__(self, *exc_info):
            return None

        def get_num_entities(self):
            return NumberOfEntities()

        def add_to_wait_set(self, wait_set):
            if not self.raised:
                self.raised += 1
                raise InvalidHandle("cannot use Destroyable because destruction was requested")

        def is_ready(self, wait_set):
            return False

        def take_data(self):
            return None

        async def execute(self, taken_data):
            return None

    waitable = DestroyedMeanwhile()
    node.add_waitable(waitable)
    got = []
    node.create_subscription(String, "/exec/after_destroyed", got.append, 10, callback_group=inline)
    pub = node.create_publisher(String, "/exec/after_destroyed", 10)
    assert _spin_until(executor, lambda: pub.get_subscription_count() > 0 and waitable.raised == 1)
    node.remove_waitable(waitable)
    pub.publish(String(data="x"))
    assert _spin_until(executor, lambda: len(got) == 1)   # spinning went on
    # One that stays invalid is raised, not spun on (no callback would ever run again); races
    # with idle waits between them are no such thing, however many.
    from toist_ros.executor import MAX_INVALID_IN_A_ROW

    every_other = DestroyedMeanwhile()
    builds = []

    def now_and_then(wait_set):
        builds.append(1)
        if len(builds) % 2:
            raise InvalidHandle("destroyed meanwhile")

    every_other.add_to_wait_set = now_and_then
    node.add_waitable(every_other)
    for _ in range(3 * MAX_INVALID_IN_A_ROW):
        executor.spin_once(timeout_sec=0.001)   # idle: every other wait times out
    node.remove_waitable(every_other)
    executor.spin_once(timeout_sec=0.001)       # a clean wait: the count starts again

    for_ever = DestroyedMeanwhile()
    for_ever.add_to_wait_set = lambda wait_set: (_ for _ in ()).throw(InvalidHandle("destroyed"))
    node.add_waitable(for_ever)
    for _ in range(MAX_INVALID_IN_A_ROW):
        executor.spin_once(timeout_sec=0.05)
    with pytest.raises(InvalidHandle):
        executor.spin_once(timeout_sec=0.05)
    node.remove_waitable(for_ever)


def test_a_callback_queued_behind_a_busy_pool_runs_and_is_reported_once():
    """rclpy yields a task again after every wait until it starts running: while a slow callback
    held the pool, a queued one was submitted (and kept) once per wait, so the exception it
    raised was reported once per copy (41 times in 3 s here; the node's internal_errors counted
    each). Reported once."""
    from rclpy.callback_groups import ReentrantCallbackGroup

    release = threading.Event()
    with _reporting_executor("executor_busy_pool", num_threads=1) as (node, inline, executor, errors):
        group, ran = ReentrantCallbackGroup(), {"slow": 0, "raising": 0}

        def slow():
            ran["slow"] += 1
            slow_timer.cancel()
            release.wait(10)

        def raising():
            ran["raising"] += 1
            raising_timer.cancel()
            raise RuntimeError("boom")

        try:
            slow_timer = node.create_timer(0.01, slow, callback_group=group)
            assert _spin_until(executor, lambda: ran["slow"] == 1)
            raising_timer = node.create_timer(0.01, raising, callback_group=group)
            ticks = []
            # Waits keep ending while the pool is busy (as frames do in the node: inline callbacks).
            node.create_timer(0.02, lambda: ticks.append(1), callback_group=inline)
            assert _spin_until(executor, lambda: len(ticks) >= 20)
            assert ran["raising"] == 0   # still queued behind the slow one
            release.set()
            assert _spin_until(executor, lambda: ran["raising"] == 1 and errors, timeout=10)
            ticked = len(ticks)
            assert _spin_until(executor, lambda: len(ticks) >= ticked + 10)
            assert ran == {"slow": 1, "raising": 1}
            assert [str(e) for e in errors] == ["boom"]
        finally:
            release.set()   # (before the executor's shutdown waits for the pool)


def test_coroutine_callbacks_resume_after_an_await():
    """A coroutine paused at an await is yielded again by rclpy to resume: the check that kept a
    queued task from being submitted twice dropped it every time, and it never finished."""
    from rclpy.callback_groups import ReentrantCallbackGroup
    from rclpy.task import Future

    with _reporting_executor("executor_coroutines") as (node, inline, executor, errors):
        pooled, done, later = ReentrantCallbackGroup(), [], Future()

        async def waiting_callback():
            first.cancel()
            await later
            done.append("callback")

        def setter():
            second.cancel()
            later.set_result(1)

        async def waiting_task():
            await later
            done.append("task")

        first = node.create_timer(0.01, waiting_callback, callback_group=pooled)
        second = node.create_timer(0.2, setter, callback_group=pooled)
        task = executor.create_task(waiting_task())
        assert _spin_until(executor, lambda: len(done) == 2 and task.done(), timeout=10), done
        assert sorted(done) == ["callback", "task"] and errors == []
        assert _spin_until(executor, lambda: not executor._pending, timeout=5)


def test_an_error_in_the_inference_thread_is_logged_with_its_traceback_and_counted():
    """The inference thread (where frames, depth and detections are handled) logged a fault of
    the node's own code as a bare "KeyError: 'missing_key'", naming no line; callbacks' faults
    came with their traceback."""
    import time
    import types

    from toist_ros.diagnostics import Counters, Percentiles
    from toist_ros.frame_slot import FrameSlots
    from toist_ros.inference_worker import InferenceWorker

    logged = []

    class Logger:
        def error(self, message, **_):
            logged.append(message)

        warning = info = error

    node = types.SimpleNamespace(get_logger=Logger)
    slots = FrameSlots(1)
    worker = InferenceWorker(node, None, types.SimpleNamespace(cameras=[None], slots=slots), lambda: None,
                             lambda: {}, Counters(), Percentiles(), Percentiles())

    def a_step_of_the_frame():
        return {}["missing_key"]

    worker._process_frame = lambda frame, camera: a_step_of_the_frame()
    worker.start()
    try:
        slots.put(0, "frame")
        deadline = time.monotonic() + 10
        while not logged and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        worker.stop()
    assert worker._counters.snapshot()["internal_errors"] == 1
    [message] = logged
    assert message.startswith("unexpected error in the inference thread (the node goes on): Traceback")
    assert "in a_step_of_the_frame" in message and "KeyError: 'missing_key'" in message
