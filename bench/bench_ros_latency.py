"""End-to-end latency and throughput of the perception node over DDS, under a 30 Hz camera.

    python bench/bench_ros_latency.py [--seconds 15] [--rate 30] [--fastdds-profile package|none|env|PATH]
                                      [--short-side 480] [--checkpoint X] [--device auto]

The node runs as its own process (the installed ``perception_node``, as ``ros2 run`` starts
it); this script publishes 640x480 rgb8 frames at 30 Hz (a real photo, fresh stamp per frame)
and receives ``instances`` (single-threaded executor: a lean consumer; rclpy's multi-threaded one
added p95 spikes of 30-230 ms on this side). For every result:
  end-to-end  = time received here - header.stamp (the stamp is set just before publishing)
  overhead    = end-to-end - inference_ms (transport both ways, conversion, waiting for the
                inference thread, post-processing, message building)
Throughput = results per second; the node's own counters (received, dropped, lost in
transport) come from /diagnostics. Embedded default model unless --checkpoint: the figures
measure the node, not the quality of the boxes. The overhead is split at the node's publish
(its ``latency_ms``): camera -> node (transport, waiting, conversion, ranking, message building)
and node -> here (transport of ``instances``).

Both processes load the package's Fast DDS profile (config/fastdds_large_images.xml: a 16 MiB
shared-memory segment, so a VGA frame travels in one piece) unless ``--fastdds-profile none``
(Fast DDS's defaults: 512 KiB, ~13 ms more per VGA frame) or ``env``.

The 3D step (depth.enabled) is measured first, in this process and without DDS: the node's own
code (``toist_ros.depth.instances3d.add_3d``) on 10 instances of a rendered 640x480 scene (ten
20 cm plates at 0.8-1.7 m, 16UC1 depth with noise, holes and flying pixels, masks spilling 2 px),
per frame, after loading its compiled kernel (time printed: seconds when numba compiles it, the
first time on a machine); side by side, frames alternating, the same step with the numpy
implementation the kernel replaced (tests/depth_reference.py), and the ratio of their p50. With
``--depth`` the node also runs with depth.enabled, a depth image and CameraInfo are published
with every frame, and its "3d ms" from /diagnostics are printed.

``--breakdown`` runs the node under ``bench/ros_latency_probe.py``, which marks the seams a frame
passes (rclpy's wait and take, the image callback, the inference thread, the model, ranking,
messages, publish), and prints each stage's p50 / p95: where the overhead goes.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _quantiles(values):
    if not values:
        return float("nan"), float("nan")
    return tuple(float(v) for v in np.quantile(np.asarray(values, dtype=np.float64), [0.5, 0.95]))


def measure_3d_step(frames: int = 200) -> tuple[tuple[float, float], tuple[float, float], float, int]:
    """((p50, p95) ms per frame of the node's 3D step for 10 instances at 640x480, (p50, p95) of the
    numpy reference in alternate frames, seconds to load the kernel, mask pixels)."""
    from unittest import mock

    import cv2
    from toist_ros.depth.geometry import DepthLimits, Intrinsics, instance_3d, warm_up
    from toist_ros.depth.images import DepthImage
    from toist_ros.depth.instances3d import add_3d
    from toist_ros.depth.pairing import PAIRED, CameraModel, Pairing
    from toist_ros.depth.scenes import degrade, plane, render
    from toist_ros.instances import rank_instances, task_instances_msg, to_instance_msgs

    cam = Intrinsics(615.0, 615.0, 319.5, 239.5, 640, 480)
    objects = [plane([-0.5 + 0.25 * (i % 5), -0.15 + 0.3 * (i // 5), 0.8 + 0.1 * i], 0.2, 0.2, yaw_deg=8 * i)
               for i in range(10)]
    depth, labels = render(objects, cam, background_m=4.0)
    raw = np.round(degrade(depth, np.random.default_rng(0)) * 1000).astype(np.uint16)
    masks = np.stack([cv2.dilate((labels == i).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
                      for i in range(10)])
    boxes = []
    for mask in masks:
        rows, cols = np.nonzero(mask)
        boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
    ranked = rank_instances(np.array(boxes, np.float32), np.linspace(0.9, 0.6, 10), masks, (640, 480))
    pairing = Pairing(PAIRED, DepthImage(raw, 0.001), CameraModel(cam, "bench_camera", False), 0.0)
    sys.path.insert(0, str(ROOT / "tests"))
    import depth_reference  # the numpy implementation, for the ratio

    load_s = warm_up()
    implementations = {"kernel": instance_3d, "numpy": depth_reference.instance_3d}
    times = {"kernel": [], "numpy": []}
    for frame in range(frames):
        for name in ("kernel", "numpy") if frame % 2 else ("numpy", "kernel"):
            msg = task_instances_msg(None, (640, 480), "bench", 1, 0.0,
                                     to_instance_msgs(ranked, None, with_masks=False))
            with mock.patch("toist_ros.depth.instances3d.instance_3d", implementations[name]):
                start = time.perf_counter()
                valid = add_3d(msg, ranked, pairing, DepthLimits())
                times[name].append(1000.0 * (time.perf_counter() - start))
            assert valid == 10, valid
    kernel, numpy_reference = (_quantiles(times[name][frames // 10:]) for name in ("kernel", "numpy"))
    return kernel, numpy_reference, load_s, int(masks.sum())


def _stamp_ns(stamp) -> int:
    return stamp.sec * 1_000_000_000 + stamp.nanosec


# (label, from, to): the seams bench/ros_latency_probe.py marks in the node, plus the camera's
# publish returning ("sent") and the result arriving here ("received"); "stamp" is the frame's stamp.
STAGES = (
    ("camera publish call (this process)", "stamp", "sent"),
    ("DDS: camera -> the node's wait returns", "sent", "wait"),
    ("rclpy executor: wait -> take", "wait", "take0"),
    ("rclpy take: message to Python", "take0", "take1"),
    ("image callback: convert, frame to slot", "take1", "cb1"),
    ("slot -> inference thread", "cb1", "inf0"),
    ("before the model (age, snapshots)", "inf0", "model0"),
    ("model (inference_ms)", "model0", "model1"),
    ("rank_instances", "model1", "ranked"),
    ("instance messages", "ranked", "built"),
    ("publish call (node)", "built", "published"),
    ("DDS: node -> this process", "published", "received"),
)


def print_breakdown(probe_out: str, sent_at: dict, received_at: dict, first_stamp_ns: int) -> None:
    """Per stage p50 / p95 ms over the measured frames (those after the warm-up)."""
    rows = []
    try:
        lines = Path(probe_out).read_text().splitlines()
    except OSError as exc:
        print(f"  breakdown: no probe output ({exc}); see out/bench_ros_latency_node.log")
        return
    for line in lines:
        stamp_ns, *fields = line.split("\t")
        stamp_ns = int(stamp_ns)
        if stamp_ns < first_stamp_ns or stamp_ns not in sent_at or stamp_ns not in received_at:
            continue
        times = {key: float(value) for key, value in (field.split("=", 1) for field in fields)}
        times.update(stamp=stamp_ns * 1e-9, sent=sent_at[stamp_ns], received=received_at[stamp_ns])
        rows.append(times)
    if not rows:
        print("  breakdown: no frame went through all the probe's points")
        return
    print(f"  breakdown over {len(rows)} frames (bench/ros_latency_probe.py; ms, p50 / p95):")
    for label, start, end in STAGES:
        p50, p95 = _quantiles([1000.0 * (row[end] - row[start]) for row in rows if start in row and end in row])
        print(f"    {label:<42}{p50:7.2f} {p95:7.2f}")
    total50, total95 = _quantiles([1000.0 * (row["received"] - row["stamp"]) for row in rows])
    print(f"    {'end to end':<42}{total50:7.2f} {total95:7.2f}")
    rest50, rest95 = _quantiles([1000.0 * (row["received"] - row["stamp"] - row["model1"] + row["model0"])
                                 for row in rows])
    print(f"    {'end to end - model':<42}{rest50:7.2f} {rest95:7.2f}")


def use_fastdds_profile(choice: str) -> str:
    """Point Fast DDS at the chosen XML profile in this process's environment, which the node's
    process inherits; before rclpy creates a participant. Returns what is in use, for the report."""
    from toist_ros.fastdds_profile import FAST_DDS_2_VARIABLE, FAST_DDS_3_VARIABLE, profile_environment, profile_path

    names = (FAST_DDS_2_VARIABLE, FAST_DDS_3_VARIABLE)
    if choice == "env":
        return next((os.environ[n] for n in names if os.environ.get(n)), "Fast DDS defaults (environment)")
    for name in names:
        os.environ.pop(name, None)
    if choice == "none":
        return "Fast DDS defaults"
    path = profile_path() if choice == "package" else Path(choice).resolve()
    if not path.is_file():
        raise SystemExit(f"--fastdds-profile: no such file {path}")
    os.environ.update(profile_environment(path))
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="camera run time")
    parser.add_argument("--rate", type=float, default=30.0, help="camera frame rate")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--short-side", type=int, default=480, help="model input short side (480: native for VGA)")
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--masks", default="true", choices=("true", "false"))
    parser.add_argument("--qos", default="reliable", choices=("reliable", "best_effort"),
                        help="camera publisher and node subscription (input.reliability); best effort loses most raw "
                             "VGA frames between processes with Fast DDS's default UDP buffers (see docs/ros.md)")
    parser.add_argument("--depth", action="store_true", help="run the node with depth.enabled and publish a depth "
                        "image (a wall at 1.2 m, 16UC1, the frame's stamp) and CameraInfo with every frame")
    parser.add_argument("--fastdds-profile", default="package",
                        help="Fast DDS XML profile for this process (the camera) and the node: 'package' = "
                             "config/fastdds_large_images.xml (16 MiB shared-memory segment: a VGA frame fits), "
                             "'none' = Fast DDS's defaults (512 KiB segment), 'env' = whatever the environment says, "
                             "or a path")
    parser.add_argument("--breakdown", action="store_true",
                        help="run the node under bench/ros_latency_probe.py and print where each frame's time goes, "
                             "stage by stage (camera publish, DDS, rclpy take, callback, hand-over, model, ranking, "
                             "messages, publish, DDS back)")
    parser.add_argument("--node-env", action="append", default=[], help="NAME=VALUE for the node process only")
    parser.add_argument("--node-arg", action="append", default=[], dest="extra",
                        help="one more node argument (repeat): --node-arg=-p --node-arg=input.max_age_s:=0.0")
    args = parser.parse_args()

    (step50, step95), (numpy50, numpy95), load_s, mask_pixels = measure_3d_step()
    print(f"3D step (toist_ros.depth, in process): 10 instances at 640x480 ({mask_pixels} mask pixels), "
          f"ms per frame p50 {step50:.2f}  p95 {step95:.2f}; numpy reference (tests/depth_reference.py, "
          f"alternate frames) p50 {numpy50:.2f}  p95 {numpy95:.2f}: {numpy50 / step50:.1f}x at p50; "
          f"kernel loaded in {load_s:.2f} s")
    profile = use_fastdds_profile(args.fastdds_profile)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(1, 100)))
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image
    from toist_ros.camera_standin import fit, load_photos
    from toist_ros.conversions import image_from_array
    from toist_ros.msg import TaskInstances, TaskStatus

    executable = ROOT / "install" / "toist_ros" / "lib" / "toist_ros" / "perception_node"
    command = [sys.executable, str(executable), "--ros-args", "--params-file", str(ROOT / "config" / "perception.yaml"),
               "-r", "image:=/bench/image", "-p", f"device:={args.device}",
               "-p", f"input.short_side:={args.short_side}", "-p", f"input.max_side:={max(args.short_side * 2, 64)}",
               "-p", f"output.masks:={args.masks}", "-p", "diagnostics.period_s:=0.5",
               "-p", f"input.reliability:={args.qos}"] + args.extra
    if args.depth:
        command += ["-p", "depth.enabled:=true", "-r", "depth:=/bench/depth", "-r", "camera_info:=/bench/camera_info"]
    if args.checkpoint:
        command += ["-p", f"checkpoint:={os.path.abspath(args.checkpoint)}"]
    probe_out = ""
    if args.breakdown:
        probe_out = os.path.join(tempfile.mkdtemp(prefix="toist_probe_"), "frames.tsv")
        command = [sys.executable, str(ROOT / "bench" / "ros_latency_probe.py"), probe_out] + command[1:]
    (ROOT / "out").mkdir(exist_ok=True)   # the node's log: "see out/..." below must be true
    node_log = open(ROOT / "out" / "bench_ros_latency_node.log", "w")
    node_env = dict(os.environ, **dict(item.split("=", 1) for item in args.node_env))
    node = subprocess.Popen(command, stdout=node_log, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=node_env)

    context = rclpy.Context()
    rclpy.init(context=context)
    client = rclpy.create_node("bench_ros_latency", context=context)
    lock = threading.Lock()
    results, status, diagnostics = [], [], []
    sent_at, received_at = {}, {}   # --breakdown: stamp ns -> camera's publish returned / result received

    def on_result(msg):
        now = time.time()
        received_at[_stamp_ns(msg.header.stamp)] = now
        with lock:
            results.append((now, msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9, msg.inference_ms,
                            msg.latency_ms, len(msg.instances)))

    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    client.create_subscription(TaskInstances, "instances", on_result, 50)
    client.create_subscription(TaskStatus, "active_task", status.append, latched)
    client.create_subscription(DiagnosticArray, "/diagnostics", diagnostics.append, 10)
    camera_qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE if args.qos == "reliable"
                            else ReliabilityPolicy.BEST_EFFORT)
    pub = client.create_publisher(Image, "/bench/image", camera_qos)
    depth_pub = client.create_publisher(Image, "/bench/depth", camera_qos)
    info_pub = client.create_publisher(CameraInfo, "/bench/camera_info", camera_qos)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(client)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    code = 0
    try:
        deadline = time.monotonic() + 600
        while not any(s.ready for s in status):
            if node.poll() is not None or time.monotonic() > deadline:
                print("the node did not start; see out/bench_ros_latency_node.log", file=sys.stderr)
                return 1
            time.sleep(0.1)
        while pub.get_subscription_count() == 0:
            time.sleep(0.05)
        frame = fit(load_photos(["astronaut"])[0][1], args.width, args.height)
        msg = image_from_array(frame, "rgb8")
        msg.header.frame_id = "bench_camera"
        depth_msg = Image(height=args.height, width=args.width, encoding="16UC1", step=2 * args.width,
                          data=np.full((args.height, args.width), 1200, np.uint16).tobytes())
        depth_msg.header.frame_id = "bench_camera"
        info = CameraInfo(width=args.width, height=args.height, distortion_model="plumb_bob", d=[0.0] * 5)
        info.k = [615.0, 0.0, args.width / 2 - 0.5, 0.0, 615.0, args.height / 2 - 0.5, 0.0, 0.0, 1.0]
        info.header.frame_id = "bench_camera"

        def publish():
            msg.header.stamp = client.get_clock().now().to_msg()
            if args.depth:
                depth_msg.header.stamp = info.header.stamp = msg.header.stamp
                info_pub.publish(info)
                depth_pub.publish(depth_msg)
            pub.publish(msg)
            sent_at[_stamp_ns(msg.header.stamp)] = time.time()
        # Warm-up: a few frames whose results are not counted.
        for _ in range(int(args.rate)):
            publish()
            time.sleep(1.0 / args.rate)
        time.sleep(2.0)
        with lock:
            results.clear()
        first_stamp_ns = _stamp_ns(client.get_clock().now().to_msg())
        published = 0
        start = time.monotonic()
        next_time = start
        while time.monotonic() - start < args.seconds:
            publish()
            published += 1
            next_time += 1.0 / args.rate
            time.sleep(max(0.0, next_time - time.monotonic()))
        elapsed = time.monotonic() - start
        time.sleep(2.0)  # let the last results arrive
        with lock:
            got = list(results)
        values = {kv.key: kv.value for kv in diagnostics[-1].status[0].values} if diagnostics else {}
    finally:
        executor.shutdown()
        spinner.join(5)
        client.destroy_node()
        rclpy.shutdown(context=context)
        if node.poll() is None:
            node.send_signal(signal.SIGINT)
            node.wait(30)
    if not got:
        print("no results" + (" (best-effort raw frames between processes can all be lost: see docs/ros.md)"
                              if args.qos == "best_effort" else ""), file=sys.stderr)
        return 1
    end_to_end = [1000.0 * (received - stamp) for received, stamp, _, _, _ in got]
    overhead = [e - inf for e, (_, _, inf, _, _) in zip(end_to_end, got)]
    inference = [inf for _, _, inf, _, _ in got]
    e50, e95 = _quantiles(end_to_end)
    o50, o95 = _quantiles(overhead)
    i50, i95 = _quantiles(inference)
    print(f"bench_ros_latency: {args.width}x{args.height} rgb8 at {args.rate:g} Hz for {elapsed:.1f} s; "
          f"QoS {args.qos}; Fast DDS profile {profile}; model input short side {args.short_side}; masks {args.masks}; depth {args.depth}; "
          f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'embedded default model (synthetic scenes)'}; "
          f"device {values.get('device', args.device)}")
    print(f"  frames published        {published}")
    print(f"  results received        {len(got)}  ->  throughput {len(got) / elapsed:.2f} results/s")
    print(f"  inference (model) ms    p50 {i50:7.1f}   p95 {i95:7.1f}")
    print(f"  end-to-end ms           p50 {e50:7.1f}   p95 {e95:7.1f}   (publish -> result received)")
    print(f"  end-to-end - model ms   p50 {o50:7.1f}   p95 {o95:7.1f}   (transport, waiting, conversion, "
          f"post-processing)")
    inbound = [lat - inf for _, _, inf, lat, _ in got]           # stamp -> node publishes, minus the model
    outbound = [e - lat for e, (_, _, _, lat, _) in zip(end_to_end, got)]   # node publishes -> received here
    n50, n95 = _quantiles(inbound)
    u50, u95 = _quantiles(outbound)
    print(f"    of which in -> node   p50 {n50:7.1f}   p95 {n95:7.1f}   (camera -> node transport, waiting, "
          f"conversion, ranking, message building: the node's latency_ms - inference_ms)")
    print(f"    of which node -> out  p50 {u50:7.1f}   p95 {u95:7.1f}   (instances transport to this process)")
    print(f"  instances per result    mean {np.mean([n for *_, n in got]):.1f}")
    for key in ("received", "processed", "dropped_replaced", "lost_in_transport", "skipped_stale", "rejected",
                "3d ms p50", "3d ms p95", "depth_paired", "depth_missing", "depth_unsynced", "process rss MiB"):
        if key in values:
            print(f"  node {key:<22}{values[key]}  (whole run incl. warm-up)")
    if args.breakdown:
        print_breakdown(probe_out, sent_at, received_at, first_stamp_ns)
        shutil.rmtree(os.path.dirname(probe_out), ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
