"""Run the perception node with timestamps at its seams, for ``bench_ros_latency.py --breakdown``.

    python bench/ros_latency_probe.py OUT.tsv PERCEPTION_NODE_EXECUTABLE [node arguments...]

Wraps, before the node's code runs, the places a raw camera frame passes through on its way to
``instances``, and writes one line per processed frame to OUT.tsv: the frame's stamp (ns), then
``name=seconds`` wall-clock times (``time.time()``, the clock the bench stamps its frames with):

  wait        rclpy's wait set returned (the last time before the frame was taken)
  take0/take1 rclpy takes the message from DDS and builds the Python message
  cb0/cb1     the node's image callback (conversion, checks, the frame into its slot)
  inf0        the inference thread takes the frame
  model0/1    ``predict`` (the model: the node's inference_ms)
  ranked      ``rank_instances`` done
  built       ``to_instance_msgs`` and ``task_instances_msg`` done
  published   ``publish`` of ``instances`` returned

Only private names are wrapped (they may change: the node then fails to start, its log,
out/bench_ros_latency_node.log, naming the one missing; tests/test_bench_probe.py checks them).
Each point costs a few microseconds. "publish call (node)" and the transport back overlap: the
bench may receive the result before the node's publish returns. Raw images only: their callbacks run in the spinning thread right
after the take, which is what pairs a take with its frame (compressed images decode in a pool).
"""

from __future__ import annotations

import runpy
import sys
import threading
import time


def install(out_path: str) -> None:
    """Wrap the node's seams; lines go to ``out_path``."""
    import rclpy.executors as executors
    import rclpy.publisher as publisher
    import toist_ros.camera_input as camera_input
    import toist_ros.inference_worker as worker

    out = open(out_path, "w", buffering=1)
    last = {}                      # spinning thread: the latest wait and take
    frames = {}                    # stamp ns -> its times, until the inference thread writes them
    current = threading.local()    # inference thread: the frame in progress

    real_rclpy = executors._rclpy

    class TimedWaitSet(real_rclpy.WaitSet):
        def wait(self, *args):
            result = super().wait(*args)
            last["wait"] = time.time()
            return result

    class Implementation:
        """rclpy's C extension as ``rclpy.executors`` sees it, with the timed wait set."""

        def __getattr__(self, name):
            return TimedWaitSet if name == "WaitSet" else getattr(real_rclpy, name)

    executors._rclpy = Implementation()

    take = executors.Executor._take_subscription

    def timed_take(self, subscription):
        last["take0"] = time.time()
        result = take(self, subscription)
        last["take1"] = time.time()
        return result

    executors.Executor._take_subscription = timed_take

    on_image = camera_input.CameraInputs._on_image

    def timed_on_image(self, msg, *args, **kwargs):
        # The take that gave this message, read before the callback runs (a pool thread may take
        # something else meanwhile).
        times = {"wait": last.get("wait", 0.0), "take0": last.get("take0", 0.0), "take1": last.get("take1", 0.0),
                 "cb0": time.time()}
        on_image(self, msg, *args, **kwargs)
        times["cb1"] = time.time()
        frames[msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec] = times

    camera_input.CameraInputs._on_image = timed_on_image

    process_frame = worker.InferenceWorker._process_frame

    def timed_process_frame(self, frame, camera):
        stamp = frame.header.stamp.sec * 1_000_000_000 + frame.header.stamp.nanosec
        times = frames.pop(stamp, {})
        times["inf0"] = time.time()
        current.times = times
        try:
            process_frame(self, frame, camera)
        finally:
            current.times = None
        if "published" in times:
            out.write("\t".join([str(stamp)] + [f"{k}={v:.6f}" for k, v in times.items()]) + "\n")

    worker.InferenceWorker._process_frame = timed_process_frame

    def mark_after(function, name):
        def timed(*args, **kwargs):
            result = function(*args, **kwargs)
            times = getattr(current, "times", None)
            if times is not None:
                times[name] = time.time()
            return result
        return timed

    def timed_predict(*args, **kwargs):
        times = getattr(current, "times", None)
        if times is not None:
            times["model0"] = time.time()
        result = predict(*args, **kwargs)
        if times is not None:
            times["model1"] = time.time()
        return result

    predict = worker.predict
    worker.predict = timed_predict
    worker.rank_instances = mark_after(worker.rank_instances, "ranked")
    worker.task_instances_msg = mark_after(worker.task_instances_msg, "built")

    publish = publisher.Publisher.publish

    def timed_publish(self, msg):
        result = publish(self, msg)
        times = getattr(current, "times", None)
        if times is not None and type(msg).__name__ == "TaskInstances":
            times["published"] = time.time()
        return result

    publisher.Publisher.publish = timed_publish


def main() -> None:
    out_path, executable = sys.argv[1], sys.argv[2]
    install(out_path)
    sys.argv = [executable] + sys.argv[3:]
    runpy.run_path(executable, run_name="__main__")


if __name__ == "__main__":
    main()
