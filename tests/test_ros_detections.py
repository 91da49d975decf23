"""``output.detections``: vision_msgs/Detection2DArray beside TaskInstances, end to end.

vision_msgs is on no registry this environment reaches, so the test builds a stand-in package
with vision_msgs 4.x's message definitions (Humble, Jazzy, Kilted: ``bbox.center.position``,
``results[].hypothesis``) with colcon (~20 s), then runs the node as a process and a subscriber
process against it. Without vision_msgs the node refuses the option (tests/test_ros_process.py).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ros_support import random_model_dir

pytestmark = pytest.mark.ros

ROOT = Path(__file__).resolve().parents[1]
EXECUTABLE = ROOT / "install" / "toist_ros" / "lib" / "toist_ros" / "perception_node"
PARAMS = ROOT / "config" / "perception.yaml"

# vision_msgs 4.x, the messages a Detection2DArray holds (field names and types only).
STANDIN_MESSAGES = {
    "Point2D": "float64 x\nfloat64 y\n",
    "Pose2D": "vision_msgs/Point2D position\nfloat64 theta\n",
    "BoundingBox2D": "vision_msgs/Pose2D center\nfloat64 size_x\nfloat64 size_y\n",
    "ObjectHypothesis": "string class_id\nfloat64 score\n",
    "ObjectHypothesisWithPose": "ObjectHypothesis hypothesis\ngeometry_msgs/PoseWithCovariance pose\n",
    "Detection2D": "std_msgs/Header header\nObjectHypothesisWithPose[] results\nBoundingBox2D bbox\nstring id\n",
    "Detection2DArray": "std_msgs/Header header\nDetection2D[] detections\n",
}
STANDIN_PACKAGE_XML = """<?xml version="1.0"?>
<package format="3">
  <name>vision_msgs</name>
  <version>4.1.1</version>
  <description>toist test stand-in for vision_msgs 4.x (its Detection2DArray messages only)</description>
  <maintainer email="toist@example.invalid">toist</maintainer>
  <license>Apache-2.0</license>
  <buildtool_depend>ament_cmake</buildtool_depend>
  <buildtool_depend>rosidl_default_generators</buildtool_depend>
  <depend>std_msgs</depend>
  <depend>geometry_msgs</depend>
  <exec_depend>rosidl_default_runtime</exec_depend>
  <member_of_group>rosidl_interface_packages</member_of_group>
  <export><build_type>ament_cmake</build_type></export>
</package>
"""
STANDIN_CMAKE = """cmake_minimum_required(VERSION 3.8)
project(vision_msgs)
find_package(ament_cmake REQUIRED)
find_package(rosidl_default_generators REQUIRED)
find_package(std_msgs REQUIRED)
find_package(geometry_msgs REQUIRED)
rosidl_generate_interfaces(${PROJECT_NAME} %s DEPENDENCIES std_msgs geometry_msgs)
ament_export_dependencies(rosidl_default_runtime)
ament_package()
"""

# The subscriber: publishes a photo on /det/image until TaskInstances and Detection2DArray of
# the same frame arrived, then prints both as JSON.
PROBE = textwrap.dedent("""
    import json, sys, time
    import rclpy
    from sensor_msgs.msg import Image
    from vision_msgs.msg import Detection2DArray
    from toist_ros.camera_standin import fit, load_photos
    from toist_ros.conversions import image_from_array
    from toist_ros.msg import TaskInstances

    rclpy.init()
    node = rclpy.create_node("detections_probe")
    got = {"instances": {}, "detections": {}}
    key = lambda header: (header.stamp.sec, header.stamp.nanosec)
    node.create_subscription(TaskInstances, "/det/instances", lambda m: got["instances"].__setitem__(key(m.header), m), 10)
    node.create_subscription(Detection2DArray, "/det/detections",
                             lambda m: got["detections"].__setitem__(key(m.header), m), 10)
    pub = node.create_publisher(Image, "/det/image", 10)
    photo = image_from_array(fit(load_photos(["chelsea"])[0][1], 320, 240), "rgb8")
    photo.header.frame_id = "cam_optical"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        photo.header.stamp = node.get_clock().now().to_msg()
        pub.publish(photo)
        end = time.monotonic() + 2
        while time.monotonic() < end and key(photo.header) not in got["detections"]:
            rclpy.spin_once(node, timeout_sec=0.05)
        both = set(got["instances"]) & set(got["detections"])
        if both:
            stamp = sorted(both)[-1]
            inst, det = got["instances"][stamp], got["detections"][stamp]
            print(json.dumps({
                "task": inst.task, "frame_id": det.header.frame_id, "same_header": det.header == inst.header,
                "instances": [[i.rank, i.score, list(map(float, i.box))] for i in inst.instances],
                "detections": [[d.id, d.header == inst.header, [[r.hypothesis.class_id, r.hypothesis.score]
                                for r in d.results], d.bbox.center.position.x, d.bbox.center.position.y,
                                d.bbox.size_x, d.bbox.size_y, [list(r.pose.covariance[:15:7]) for r in d.results]]
                               for d in det.detections]}))
            sys.exit(0)
    sys.exit("no frame came back on both topics")
""")


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """The stand-in vision_msgs, built; the environment that puts it on the path."""
    workspace = tmp_path_factory.mktemp("vision_msgs_ws")
    package = workspace / "src" / "vision_msgs"
    (package / "msg").mkdir(parents=True)
    for name, text in STANDIN_MESSAGES.items():
        (package / "msg" / f"{name}.msg").write_text(text)
    (package / "package.xml").write_text(STANDIN_PACKAGE_XML)
    (package / "CMakeLists.txt").write_text(STANDIN_CMAKE % " ".join(f'"msg/{n}.msg"' for n in STANDIN_MESSAGES))
    venv = os.environ.get("VIRTUAL_ENV", str(ROOT / ".venv"))
    build = subprocess.run(
        [sys.executable, "-m", "colcon", "--log-base", "log", "build", "--base-paths", "src", "--build-base", "build",
         "--install-base", "install", "--event-handlers", "console_direct-", "console_stderr-"],
        cwd=workspace, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, CMAKE_PREFIX_PATH=venv, AMENT_PREFIX_PATH=f"{venv}:{os.environ.get('AMENT_PREFIX_PATH', '')}"))
    log = workspace / "log" / "latest_build" / "vision_msgs" / "stdout_stderr.log"
    assert build.returncode == 0, (build.stdout[-2000:], log.read_text()[-3000:] if log.exists() else "")
    prefix = workspace / "install" / "vision_msgs"
    [site] = list(prefix.glob("lib/python3*/site-packages")) or list(prefix.glob("local/lib/python3*/dist-packages"))

    def joined(name, first):
        return os.pathsep.join(filter(None, [str(first), os.environ.get(name, "")]))

    return {"PYTHONPATH": joined("PYTHONPATH", site), "LD_LIBRARY_PATH": joined("LD_LIBRARY_PATH", prefix / "lib"),
            "AMENT_PREFIX_PATH": joined("AMENT_PREFIX_PATH", prefix)}


def test_detections_carry_every_instance_box_score_and_task(standin, tmp_path):
    if not EXECUTABLE.exists():
        pytest.fail(f"{EXECUTABLE} is missing: run `make build`")
    env = dict(os.environ, **standin)
    log = tmp_path / "node.log"
    checkpoint = random_model_dir(tmp_path / "tiny", seed=1)
    with open(log, "w") as out:
        node = subprocess.Popen([sys.executable, str(EXECUTABLE), "--ros-args", "--params-file", str(PARAMS),
                                 "-r", "__ns:=/det", "-p", f"checkpoint:={checkpoint}", "-p", "device:=cpu",
                                 "-p", "input.short_side:=160", "-p", "input.max_side:=640",
                                 "-p", "output.detections:=true"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT)
    try:
        probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=150,
                               cwd=ROOT)
        assert probe.returncode == 0, (probe.stderr[-2000:], log.read_text()[-3000:])
    finally:
        node.send_signal(2)
        code = node.wait(30)
    assert code == 0, log.read_text()[-3000:]
    assert "detections on /det/detections (vision_msgs/Detection2DArray)" in log.read_text()
    frame = json.loads(probe.stdout.strip().splitlines()[-1])
    assert frame["same_header"] and frame["frame_id"] == "cam_optical"
    instances, detections = frame["instances"], frame["detections"]
    assert instances and len(detections) == len(instances)
    assert [rank for rank, _, _ in instances] == list(range(len(instances)))   # the array's order is the rank
    for (rank, score, (x0, y0, x1, y1)), (det_id, same_header, results, cx, cy, sx, sy, variances) in zip(
            instances, detections):
        # No identity across frames (a tracker would key on it): empty, as vision_msgs allows;
        # the rank is the order (it was id = rank, and two objects whose scores swapped swapped ids).
        assert det_id == "" and same_header
        assert results == [[frame["task"], pytest.approx(score, abs=1e-6)]]
        assert (cx, cy, sx, sy) == pytest.approx(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), abs=1e-4)
        assert variances == [[-1.0, -1.0, -1.0]]   # no depth here: no position, not the camera's centre
