"""TIFF's orientation tag: the one that OpenCV applies although told to ignore orientation.

Every image path of toist uses the stored pixel grid (docs/data.md, "EXIF orientation is
ignored"). OpenCV 5's TIFF reader turns the picture by the tag anyway with
``IMREAD_IGNORE_ORIENTATION`` (180 degrees for tag 3), and fails to read one turned a quarter
(tags 5-8) at all; Pillow turns TIFFs too. Such a file is refused, naming the tag, rather than
read as a grid that depends on the library. Reads the header only.
"""

from __future__ import annotations

from typing import Any

_ORIENTATION_TAG = 274


def tiff_orientation_problem(image: Any) -> str:
    """For an opened ``PIL.Image`` (header read): what is wrong with reading it ("" when
    nothing: not a TIFF, or a TIFF stored upright)."""
    if getattr(image, "format", None) != "TIFF":
        return ""
    orientation = image.tag_v2.get(_ORIENTATION_TAG, 1)
    if orientation in (1, None):
        return ""
    return (f"a TIFF whose orientation tag is {orientation} (stored turned or mirrored): toist reads the stored "
            "pixel grid, and no image library reads such a TIFF that way; save it upright without the tag "
            "(e.g. as PNG)")


__all__ = ["tiff_orientation_problem"]
