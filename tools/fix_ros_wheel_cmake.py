"""Point the ROS 2 wheels' exported CMake files at this virtual environment's Python.

The PyPI ROS 2 wheels were built in a manylinux container; 13-14 of their exported
`*__rosidl_generator_pyExport.cmake` files name that container's interpreter
(`/opt/python/cp311-cp311/...`) as include directories, and CMake refuses imported targets
with non-existent paths. Rewrite them to this interpreter's include dir and numpy's.
Idempotent; prints how many files it changed.
"""

import sys
import sysconfig
from pathlib import Path

import numpy

BUILDER_PREFIX = "/opt/python/cp311-cp311"


def main() -> int:
    venv = Path(sys.prefix)
    replacements = {
        f"{BUILDER_PREFIX}/include/python3.11": sysconfig.get_paths()["include"],
        f"{BUILDER_PREFIX}/lib/python3.11/site-packages/numpy/_core/include": numpy.get_include(),
    }
    changed = 0
    for path in (venv / "share").rglob("*.cmake"):
        text = path.read_text()
        if BUILDER_PREFIX not in text:
            continue
        for old, new in replacements.items():
            text = text.replace(old, new)
        path.write_text(text)
        changed += 1
    print(f"fix_ros_wheel_cmake: rewrote {changed} CMake file(s) under {venv / 'share'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
