"""Winograd convolutions on CPU: NNPACK (bundled with PyTorch) for the ResNet-101 backbone's 3x3
stride-1 convolutions against oneDNN's direct ones, as predict runs the backbone (BatchNorm
folded, channels-last), at 800 x 1088.

    python bench/bench_winograd.py [--reps 3] [--threads 2] [--min-channels 128]

The backbone is torchvision's ResNet-101 with frozen BatchNorms of seeded random statistics,
wrapped in the project's ``ResNetBody`` and folded by ``fold_batchnorm``. The Winograd path
sends every folded 3x3 stride-1 convolution with at least ``--min-channels`` input channels to
``torch._nnpack_spatial_convolution`` (NCHW in and out, so each such call converts from and to
channels-last); everything else stays as predict runs it. Printed: the largest relative
difference of each returned feature map, and the backbone's CPU seconds per path, timed
interleaved round by round after one warm-up each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torchvision.models import resnet101  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

from toist_core.model.backbone import ResNetBody  # noqa: E402
from toist_core.model.fold_batchnorm import FoldedConv2d, fold_batchnorm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-channels", type=int, default=128,
                        help="3x3 convolutions with fewer input channels stay on oneDNN (NNPACK is no "
                             "faster at 64 channels, 200 x 272)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not torch.backends.nnpack.is_available():  # also initialises NNPACK: its calls fail before
        raise SystemExit("this torch build has no NNPACK")
    torch.manual_seed(0)
    resnet = resnet101(weights=None, norm_layer=FrozenBatchNorm2d)
    for module in resnet.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.weight.uniform_(0.5, 1.5)
            module.running_var.uniform_(0.5, 1.5)
            module.bias.normal_(0, 0.1)
            module.running_mean.normal_(0, 0.1)
    body = ResNetBody(resnet, ("layer1", "layer2", "layer3", "layer4")).eval()
    fold_batchnorm(body)
    body.to(memory_format=torch.channels_last)
    image = torch.randn(1, 3, 800, 1088).contiguous(memory_format=torch.channels_last)

    direct = FoldedConv2d.forward

    def to_nnpack(conv) -> bool:
        """The convolutions the Winograd path sends to NNPACK (the rest stay on oneDNN)."""
        return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.dilation == (1, 1)
                and conv.groups == 1 and conv.in_channels >= args.min_channels)

    def winograd(self, x):
        if to_nnpack(self):
            out = torch._nnpack_spatial_convolution(x.contiguous(), self.folded_weight.contiguous(),
                                                    self.folded_bias, list(self.padding))
            return out.contiguous(memory_format=torch.channels_last)
        return direct(self, x)

    moved = sum(1 for m in body.modules() if isinstance(m, FoldedConv2d) and to_nnpack(m))
    paths = {"oneDNN direct (predict today)": direct, f"NNPACK Winograd ({moved} 3x3 convs)": winograd}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    walls: dict[str, list[float]] = {name: [] for name in paths}
    outputs = {}
    try:
        with torch.inference_mode():
            for name, forward in paths.items():
                FoldedConv2d.forward = forward
                outputs[name] = body(image)
            for _ in range(args.reps):
                for name, forward in paths.items():
                    FoldedConv2d.forward = forward
                    start, wall = time.process_time(), time.perf_counter()
                    body(image)
                    seconds[name].append(time.process_time() - start)
                    walls[name].append(time.perf_counter() - wall)
    finally:
        FoldedConv2d.forward = direct
    reference, other = outputs.values()
    errors = [float((a - b).abs().max() / a.abs().max()) for a, b in zip(reference, other)]
    print(f"ResNet-101 backbone, 800 x 1088, {args.threads} threads, {args.reps} interleaved rounds (median)")
    first = next(iter(paths))
    base, base_wall = statistics.median(seconds[first]), statistics.median(walls[first])
    for name in paths:
        cpu, wall = statistics.median(seconds[name]), statistics.median(walls[name])
        print(f"  {name:36s} CPU {cpu:6.2f} s {base / cpu:5.2f}x   wall {wall:6.2f} s {base_wall / wall:5.2f}x")
    print("largest relative difference per feature map (layer1..4): " + ", ".join(f"{e:.1e}" for e in errors))


if __name__ == "__main__":
    main()
