"""The node executables' first lines: a stop signal while the libraries load is a normal stop.

Importing torch, transformers and rclpy takes seconds before ``perception_node.main`` installs
its own stop handling; Ctrl-C (SIGINT) there ended the process with a KeyboardInterrupt
traceback and exit status -2. This module imports nothing heavy itself.
"""

import sys

NODE_NAME = "toist_perception"  # as toist_ros.node.NODE_NAME (not imported: that is the slow part)


def run(managed: bool = False) -> int:
    """Import and run the node (``managed``: the lifecycle node); exit status 0 on a stop signal
    that comes before the node's own handling is in place."""
    try:
        from toist_ros.perception_node import lifecycle_main, main

        return lifecycle_main() if managed else main()
    except KeyboardInterrupt:
        print(f"{NODE_NAME}: stopped while starting (stop signal)", file=sys.stderr)
        return 0
