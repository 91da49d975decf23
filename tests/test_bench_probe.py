"""bench/ros_latency_probe.py wraps private names of rclpy and the node; a rename must show here,
not as a node that does not start under ``bench_ros_latency.py --breakdown``."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import json, sys
sys.path.insert(0, {bench!r})
import rclpy.executors, rclpy.publisher
import toist_ros.camera_input, toist_ros.inference_worker
import ros_latency_probe
ros_latency_probe.install({out!r})
wrapped = {{
    "WaitSet": rclpy.executors._rclpy.WaitSet.__name__,
    "take": rclpy.executors.Executor._take_subscription.__name__,
    "on_image": toist_ros.camera_input.CameraInputs._on_image.__name__,
    "process_frame": toist_ros.inference_worker.InferenceWorker._process_frame.__name__,
    "predict": toist_ros.inference_worker.predict.__name__,
    "rank": toist_ros.inference_worker.rank_instances.__name__,
    "built": toist_ros.inference_worker.task_instances_msg.__name__,
    "publish": rclpy.publisher.Publisher.publish.__name__,
}}
print(json.dumps(wrapped))
"""


def test_probe_wraps_every_seam(tmp_path):
    script = CHECK.format(bench=str(ROOT / "bench"), out=str(tmp_path / "frames.tsv"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    wrapped = json.loads(done.stdout.strip().splitlines()[-1])
    assert wrapped == {"WaitSet": "TimedWaitSet", "take": "timed_take", "on_image": "timed_on_image",
                       "process_frame": "timed_process_frame", "predict": "timed_predict", "rank": "timed",
                       "built": "timed", "publish": "timed_publish"}
