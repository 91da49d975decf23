"""Masks at the original resolution: upsampled a group of instances at a time, the same pixels."""

import numpy as np
import torch
import torch.nn.functional as F

from toist_core.inference import postprocess


def _all_at_once(logits, size, padded, orig, threshold):
    """The reference's PostProcessSegm, every instance in one tensor."""
    up = F.interpolate(logits, size=tuple(padded), mode="bilinear", align_corners=False)
    up = F.interpolate(up[:, :, :size[0], :size[1]], size=orig, mode="bilinear", align_corners=False)
    return (up[0].sigmoid() > threshold).numpy()


def test_groups_of_instances_give_the_pixels_of_all_at_once(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 7, 24, 32, generator=generator) * 3   # stride-4 logits of a 96 x 128 input
    size, padded, orig = (90, 120), (96, 128), (301, 403)
    expected = _all_at_once(logits, size, padded, orig, 0.5)
    assert postprocess.masks_at_original(logits, size, padded, orig, 0.5).tobytes() == expected.tobytes()
    # Room for 3 instances at a time at the original size: groups of 3, 3 and 1.
    monkeypatch.setattr(postprocess, "MASK_CHUNK_BYTES", 3 * 4 * orig[0] * orig[1])
    grouped = postprocess.masks_at_original(logits, size, padded, orig, 0.5)
    assert grouped.dtype == bool and grouped.shape == (7, *orig)
    assert grouped.tobytes() == expected.tobytes()
    monkeypatch.setattr(postprocess, "MASK_CHUNK_BYTES", 1)   # one at a time
    assert postprocess.masks_at_original(logits, size, padded, orig, 0.3).tobytes() == \
        _all_at_once(logits, size, padded, orig, 0.3).tobytes()
    assert postprocess.masks_at_original(logits[:, :0], size, padded, orig, 0.5).shape == (0, *orig)
