"""Image files -> RGB uint8 pixels: the one decoder of training, evaluation and ``toist predict``.

torchvision's ``decode_image`` (libjpeg-turbo, libpng, giflib, libwebp): on JPEGs it gives the
pixels of the reference's PIL loader (docs/inference.md). The stored pixel grid is used as it
is: an EXIF orientation tag is ignored, as the reference's PIL loader does and as COCO
annotations assume. 16-bit PNGs are reduced to 8 bits by dropping the low byte (``v >> 8``).
A file cut short is refused, not decoded as far as it goes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Union

from toist_core.data.schema import DataError

if TYPE_CHECKING:
    from torch import Tensor

# What decode_image reads, by the file's first bytes (its suffix may say otherwise).
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")


def decodes(head: bytes) -> bool:
    """Whether :func:`decode_rgb` reads a file that starts with ``head`` (its first 12 bytes):
    JPEG, PNG, GIF or WebP."""
    return head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def decode_rgb(path: Union[str, Path], where: str = "") -> "Tensor":
    """The RGB pixels of the image file ``path`` as uint8 ``[3, H, W]``; :class:`DataError`
    naming the file (and ``where``: e.g. the record that names it) when it is missing or
    cannot be decoded."""
    import torch  # here, not at the top: decodes() serves torch-free callers (toist_core.visualize)
    from torchvision.io import ImageReadMode, decode_image

    context = f" ({where})" if where else ""
    if not Path(path).is_file():
        raise DataError(f"{path}: image file not found{context}")
    try:
        # The bytes, read here: torchvision's own file reader takes the name as UTF-8 and refuses
        # one that is not (Linux allows any bytes in a file name).
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the image file{context}: {exc.strerror or exc}") from None
    try:
        if not data:
            raise ValueError("the file is empty")
        pixels = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image{context}: {exc}") from None
    if pixels.ndim == 4:  # an animated GIF: its first frame, as PIL (the reference's loader) and OpenCV read it
        pixels = pixels[0]
    if pixels.dtype == torch.uint16:
        pixels = (pixels.to(torch.int32) >> 8).to(torch.uint8)
    elif pixels.dtype != torch.uint8:
        raise DataError(f"{path}: decoded to {pixels.dtype} samples; expected 8 or 16 bits{context}")
    return pixels


__all__ = ["decode_rgb", "decodes"]
