"""Depth-aware 3D instances: the geometry (numpy and a numba-compiled kernel), depth/CameraInfo
input, pairing by stamp, the message glue and RViz markers. See docs/ros.md, "3D instances"."""
