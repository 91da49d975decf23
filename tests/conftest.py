"""Test-wide settings: offline, small thread pools, ROS 2 on loopback with a private domain."""

import os
import random

# Never reach a model hub from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# ROS 2 traffic stays on this machine, in a domain of its own for this run. These must be
# set before rclpy is first initialised (here, at collection time) and are inherited by the
# node processes the tests start.
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("ROS_DOMAIN_ID", str(random.Random().randint(1, 100)))
os.environ.pop("ROS_LOCALHOST_ONLY", None)  # ignored by Kilted; never multicast on the LAN
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
