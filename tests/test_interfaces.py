"""The generated messages and services: import, and round-trip over real DDS on loopback."""

import numpy as np
import pytest

from ros_support import RosSession, wait_for

pytestmark = pytest.mark.ros


@pytest.fixture
def ros():
    session = RosSession()
    yield session
    session.close()


def _sample_instances():
    from builtin_interfaces.msg import Time
    from toist_ros.msg import Instance, TaskInstances

    msg = TaskInstances()
    msg.header.stamp = Time(sec=1234, nanosec=567)
    msg.header.frame_id = "camera_optical"
    msg.image_width, msg.image_height = 640, 480
    msg.task = "sit comfortably on something"
    msg.task_revision = 7
    msg.inference_ms = 12.5
    inst = Instance()
    inst.score = 0.75
    inst.rank = 0
    inst.box = np.array([10.0, 20.0, 110.5, 220.25], dtype=np.float32)
    inst.mask_roi.x_offset, inst.mask_roi.y_offset = 10, 20
    inst.mask_roi.width, inst.mask_roi.height = 3, 2
    inst.mask.height, inst.mask.width, inst.mask.encoding, inst.mask.step = 2, 3, "mono8", 3
    inst.mask.data = bytes([0, 255, 255, 255, 0, 0])
    inst.mask_area = 4
    inst.has_3d = True
    inst.centroid.x, inst.centroid.y, inst.centroid.z = 0.1, -0.2, 1.25
    inst.extent.x, inst.extent.y, inst.extent.z = 0.3, 0.2, 0.05
    inst.depth_points, inst.depth_fraction = 4, 1.0
    msg.depth_status, msg.depth_offset_ms = TaskInstances.DEPTH_PAIRED, -1.5
    msg.instances = [inst]
    return msg


def test_generated_types_have_the_contract_fields():
    from toist_ros.msg import Instance, TaskInstances, TaskStatus
    from toist_ros.srv import SegmentImage, SetTask

    assert set(Instance.get_fields_and_field_types()) == {
        "score", "rank", "box", "mask_roi", "mask", "mask_area", "has_3d", "centroid", "extent", "box_center", "surface_point",
        "depth_points", "depth_fraction"}
    assert Instance.get_fields_and_field_types()["centroid"] == "geometry_msgs/Point"
    assert Instance.get_fields_and_field_types()["extent"] == "geometry_msgs/Vector3"
    assert Instance.get_fields_and_field_types()["box"] == "float[4]"
    assert set(TaskInstances.get_fields_and_field_types()) == {
        "header", "image_width", "image_height", "task", "task_id", "task_revision", "inference_ms",
        "latency_ms", "depth_status", "depth_offset_ms", "instances"}
    assert (TaskInstances.DEPTH_OFF, TaskInstances.DEPTH_PAIRED, TaskInstances.DEPTH_MISSING,
            TaskInstances.DEPTH_UNSYNCED) == (0, 1, 2, 3)
    assert set(TaskStatus.get_fields_and_field_types()) == {"stamp", "task", "task_id", "revision", "ready",
                                                            "warning"}
    assert set(SetTask.Request.get_fields_and_field_types()) == {"task"}
    assert set(SetTask.Response.get_fields_and_field_types()) == {"success", "message", "revision"}
    assert set(SegmentImage.Request.get_fields_and_field_types()) == {"image", "task"}
    assert SegmentImage.Response.get_fields_and_field_types()["result"] == "toist_ros/TaskInstances"


def test_task_instances_round_trip_over_dds(ros):
    from toist_ros.msg import TaskInstances

    sent = _sample_instances()
    received = []
    listener = ros.node("listener")
    listener.create_subscription(TaskInstances, "instances", received.append, 10)
    talker = ros.node("talker")
    pub = talker.create_publisher(TaskInstances, "instances", 10)

    assert wait_for(lambda: pub.get_subscription_count() > 0), "no DDS discovery on loopback"
    assert wait_for(lambda: (pub.publish(sent), bool(received))[1], timeout=20, interval=0.2)
    got = received[0]
    assert got.header == sent.header
    assert got.task == sent.task and got.task_revision == 7
    assert len(got.instances) == 1
    inst = got.instances[0]
    np.testing.assert_array_equal(inst.box, sent.instances[0].box)
    assert bytes(inst.mask.data) == bytes([0, 255, 255, 255, 0, 0])
    assert (inst.mask_roi.width, inst.mask_roi.height, inst.mask_area) == (3, 2, 4)
    assert inst.has_3d and inst.centroid == sent.instances[0].centroid and inst.extent == sent.instances[0].extent
    assert got.depth_status == TaskInstances.DEPTH_PAIRED and got.depth_offset_ms == pytest.approx(-1.5)


def test_set_task_service_round_trip(ros):
    from toist_ros.srv import SetTask

    server = ros.node("server")

    def handle(request, response):
        response.success = request.task == "2"
        response.message = f"understood {request.task!r}"
        response.revision = 3
        return response

    server.create_service(SetTask, "set_task", handle)
    client_node = ros.node("client")
    client = client_node.create_client(SetTask, "set_task")
    assert client.wait_for_service(timeout_sec=20)
    future = client.call_async(SetTask.Request(task="2"))
    assert wait_for(future.done, timeout=20)
    response = future.result()
    assert response.success and response.revision == 3 and "'2'" in response.message
