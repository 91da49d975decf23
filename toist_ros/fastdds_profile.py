"""The package's Fast DDS profile for raw camera images (config/fastdds_large_images.xml).

Fast DDS carries a message between two processes on one machine through the sender's
shared-memory segment, 512 KiB unless a profile says otherwise; a 640x480 rgb8 frame (0.9 MB)
does not fit and takes ~13 ms more to arrive (docs/performance.md, "Node overhead"). The
profile raises the segment to 16 MiB. It must be loaded by the camera's process (the sender of
the images) and the node's, through an environment variable whose name depends on the Fast DDS
version: this module says which, and where the file is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

PROFILE_FILE = "fastdds_large_images.xml"
SEGMENT_BYTES = 16 * 1024 * 1024          # the profile's segment_size
# Fast DDS 2.x (Humble, Jazzy) reads the first; 3.x (Kilted and later) the second and warns
# that the first is deprecated.
FAST_DDS_2_VARIABLE = "FASTRTPS_DEFAULT_PROFILES_FILE"
FAST_DDS_3_VARIABLE = "FASTDDS_DEFAULT_PROFILES_FILE"
FAST_DDS_2_DISTROS = ("humble", "jazzy")


def profile_path() -> Path:
    """The profile in the installed package's share directory, else in this checkout's config/."""
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        try:
            installed = Path(get_package_share_directory("toist_ros")) / "config" / PROFILE_FILE
            if installed.is_file():
                return installed
        except PackageNotFoundError:
            pass
    except ImportError:
        pass
    return Path(__file__).resolve().parents[1] / "config" / PROFILE_FILE


def profile_variable(distro: Optional[str] = None) -> str:
    """The environment variable Fast DDS reads its XML profile from, for ROS distribution
    ``distro`` (default: ``$ROS_DISTRO``; unset, as with the PyPI wheels, means Kilted or later)."""
    distro = os.environ.get("ROS_DISTRO", "") if distro is None else distro
    return FAST_DDS_2_VARIABLE if distro.lower() in FAST_DDS_2_DISTROS else FAST_DDS_3_VARIABLE


def profile_environment(path: Optional[os.PathLike] = None, distro: Optional[str] = None) -> dict[str, str]:
    """``{variable: path}`` that makes a process started with it load the profile (default: the package's)."""
    return {profile_variable(distro): str(path or profile_path())}


__all__ = ["PROFILE_FILE", "SEGMENT_BYTES", "profile_environment", "profile_path", "profile_variable"]
