"""How far each of toist's three processing choices moves the outputs from the reference
protocol (``InferenceConfig(protocol="reference")``), on a trained and on a "sharp" random model.

    python bench/bench_protocol.py [--models default,paper_segm] [--short-side 320] [--max-size 533]
                                   [--margin-std 2] [--box-std 1] [--threads 1]

The network is the reference's; what differs is how the image gets in and the boxes come out:

* padding:  a lone frame padded to a multiple of 32 (reference: no padding for one image);
* resize:   antialiased bilinear on the float image (reference: PIL bilinear on the uint8 image);
* clipping: boxes clipped to the image (reference: not clipped).

Each choice is switched on alone on top of the reference protocol, then all three together
(= the default ``"toist"`` protocol), on five scikit-image photos cropped to COCO-like aspect
ratios and three freshly generated synthetic scenes (seed 2024), batch size 1. For every
variant the table gives, over all queries (100; the default model has 5) of every image: the largest score difference, the largest box-coordinate
difference (original-image pixels), the same over the queries the reference scores >= 0.5, and
on how many images the top-scoring query changes.

Models:

* ``default``: the embedded default model (toist_core/assets/default_model: MobileNetV2, trained
  by this project on synthetic COCO-Tasks, with padded batches, at its own 128 / 256 px) - a
  trained network's sensitivity, though not an official checkpoint's.
* a preset name (``paper_segm``: the official checkpoints' architecture, ResNet-101 +
  RoBERTa-sized text encoder on the offline tiny tokenizer) with random weights, "sharpened",
  at ``--short-side`` / ``--max-size``. With random weights the 100 queries come out nearly alike
  (scores all ~0.996, boxes all near the centre), which hides how far an output can move. The
  last linear layers of the class and box heads are rescaled, on the reference outputs of all
  images pooled, so that logit(score) spreads with standard deviation ``--margin-std`` (median
  score 0.5) and the pre-sigmoid box coordinates with ``--box-std`` (some boxes then leave the
  image). Input changes are amplified by the same factors; a random deep backbone's sensitivity
  to its input is not a trained one's, so these figures are an upper bound of sorts, not an
  estimate.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from toist_core.config import InferenceConfig, preset  # noqa: E402
from toist_core.inference import TaskSegmenter  # noqa: E402
from toist_core.inference.processing import REFERENCE, Processing  # noqa: E402
from toist_core.tokens import NO_OBJECT_INDEX  # noqa: E402

TASK = 2  # "sit comfortably on something": one of the default model's tasks

# (scikit-image photo, crop height, crop width): COCO-like aspect ratios (4:3, 3:2, 2:3, ...).
PHOTOS = [("coffee", 400, 533), ("chelsea", 300, 451), ("astronaut", 384, 512), ("rocket", 427, 640),
          ("camera", 512, 400)]
SYNTHETIC_SCENES = 3

VARIANTS = {
    "padding to 32": Processing(resize="pil", pad_multiple=32, clip_boxes=False),
    "float resize": Processing(resize="float", pad_multiple=1, clip_boxes=False),
    "box clipping": Processing(resize="pil", pad_multiple=1, clip_boxes=True),
    "all three (toist)": Processing(resize="float", pad_multiple=32, clip_boxes=True),
}


@dataclass
class Outputs:
    """All queries of one image, indexed by query: scores ``[Q]``, boxes ``[Q, 4]`` px."""

    scores: np.ndarray
    boxes: np.ndarray


# ------------------------------------------------------------------------------------ inputs

def photos() -> list[tuple[str, np.ndarray]]:
    import skimage.data

    images = []
    for name, height, width in PHOTOS:
        image = getattr(skimage.data, name)()
        if image.ndim == 2:                           # grey: as PIL's convert("RGB")
            image = np.repeat(image[..., None], 3, axis=2)
        images.append((f"{name} {width}x{height}", np.ascontiguousarray(image[:height, :width, :3])))
    return images


def synthetic_scenes(count: int) -> list[tuple[str, np.ndarray]]:
    """Fresh synthetic COCO-Tasks scenes (the default model's world, seed 2024), decoded as RGB."""
    from toist_core.data.synth import generate

    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, tasks=[TASK], splits=("test",), images_per_split=count, seed=2024, image_format="png")
        files = sorted((Path(tmp) / "images").rglob("*.png"))
        scenes = []
        for path in files[:count]:
            image = np.array(Image.open(path).convert("RGB"))
            scenes.append((f"synthetic {image.shape[1]}x{image.shape[0]}", image))
    return scenes


# ------------------------------------------------------------------------------------ models

def default_model() -> tuple[str, TaskSegmenter]:
    from toist_core.checkpoint.default_model import require_default_model_dir

    inference = InferenceConfig(score_threshold=0.0, protocol="reference")
    seg = TaskSegmenter.from_pretrained(require_default_model_dir(), device="cpu", inference=inference, task=TASK)
    size = seg.inference
    return f"embedded default model (trained, MobileNetV2), {size.short_side} / {size.max_size} px", seg


def sharp_random_model(name: str, images: list[np.ndarray], args) -> tuple[str, TaskSegmenter]:
    cfg = preset(name)
    cfg.text.tokenizer = "builtin:tiny"   # offline; token ids differ from roberta-base, the effect does not
    inference = InferenceConfig(short_side=args.short_side, max_size=args.max_size, score_threshold=0.0,
                                protocol="reference")
    seg = TaskSegmenter.from_config(cfg, device="cpu", seed=args.seed, task=TASK, inference=inference)
    score_scale, box_scale = sharpen(seg, images, args.margin_std, args.box_std)
    return (f"{name}, random weights (seed {args.seed}), sharpened: logit(score) std {args.margin_std:g} "
            f"(no-object row x {score_scale:.0f}), box std {args.box_std:g} (box layer x <= {box_scale:.0f}), "
            f"{args.short_side} / {args.max_size} px"), seg


def sharpen(seg: TaskSegmenter, images: list[np.ndarray], margin_std: float, box_std: float) -> tuple[float, float]:
    """Give the random model a trained model's spread of outputs, calibrated on ``images``
    (reference protocol, all queries of all images pooled): the no-object logit row scaled so
    that the score margin logit(score) has standard deviation ``margin_std``, its bias set for a
    median score of 0.5; the box head's last layer scaled per coordinate so that the pre-sigmoid
    ``(cx, cy, w, h)`` have standard deviation ``box_std`` (means kept). Both layers are linear:
    the same network with other weights. Returns the two largest scale factors."""
    detector = seg.model.detector
    states = []
    for image in images:
        batch, _ = seg.preprocess([image])
        memory = seg.model.encode(batch, text=seg.task_state.text)
        states.append(detector.decoder_states(memory)[-1][0])            # [100, D]
    last = torch.cat(states)                                             # [N * 100, D]
    head, box = detector.class_embed, detector.bbox_embed.layers[-1]
    with torch.no_grad():
        logits = head(last)                                              # [N * 100, 256]
        others = torch.logsumexp(logits[:, :NO_OBJECT_INDEX], 1)         # the 255 token logits
        no_object = last @ head.weight[NO_OBJECT_INDEX]                  # without its bias
        scale = margin_std / float((no_object - others).std())
        head.weight[NO_OBJECT_INDEX] *= scale
        head.bias[NO_OBJECT_INDEX] = float((others - scale * no_object).median())
        hidden = last
        for layer in detector.bbox_embed.layers[:-1]:
            hidden = torch.relu(layer(hidden))
        raw = box(hidden)                                                # [N * 100, 4] pre-sigmoid
        factors = box_std / raw.std(0)
        box.bias.copy_(raw.mean(0) - factors * (raw.mean(0) - box.bias))
        box.weight.mul_(factors[:, None])
    return scale, float(factors.max())


# ------------------------------------------------------------------------------- measurement

def run(seg: TaskSegmenter, image: np.ndarray, processing: Processing) -> Outputs:
    seg.processing = processing
    queries = seg.model.detector.query_embed.num_embeddings
    pred = seg.predict(image, score_threshold=0.0, max_instances=queries, with_masks=False)
    assert len(pred) == queries, f"{len(pred)} of {queries} queries"
    scores, boxes = np.empty(queries, np.float64), np.empty((queries, 4), np.float64)
    scores[pred.queries], boxes[pred.queries] = pred.scores, pred.boxes
    return Outputs(scores, boxes)


def input_hw(seg: TaskSegmenter, image: np.ndarray, processing: Processing) -> tuple[int, int]:
    seg.processing = processing
    return tuple(seg.preprocess([image])[0].tensors.shape[-2:])


def leaving(boxes: np.ndarray, size: tuple[int, int]) -> int:
    """How many of the ``[Q, 4]`` boxes reach outside the ``(H, W)`` image."""
    height, width = size
    return int(((boxes[:, :2] < 0).any(axis=1) | (boxes[:, 2] > width) | (boxes[:, 3] > height)).sum())


def report(title: str, seg: TaskSegmenter, images: list[tuple[str, np.ndarray]]) -> None:
    print(f"\n== {title}")
    reference = {name: run(seg, image, REFERENCE) for name, image in images}
    print("  image                  network input (reference -> padded to 32)  top / median score  "
          ">= 0.5  boxes leaving")
    for name, image in images:
        ref = reference[name]
        (rh, rw), (ph, pw) = input_hw(seg, image, REFERENCE), input_hw(seg, image, VARIANTS["padding to 32"])
        outside = leaving(ref.boxes, image.shape[:2])
        print(f"  {name:22s} {rh:4d}x{rw:<4d} -> {ph:4d}x{pw:<4d} {'':24s} {ref.scores.max():.3f} / "
              f"{np.median(ref.scores):.3f}   {(ref.scores >= 0.5).sum():4d}   {outside:4d}")
    print(f"\n  {'deviation from the reference':26s} {'max |d score|':>13s} {'max |d box| px':>14s}   "
          f"{'score >= 0.5: |d score|':>23s} {'|d box| px':>10s}   top query changed")
    for variant, processing in VARIANTS.items():
        d_score, d_box, d_score_kept, d_box_kept, changed = 0.0, 0.0, 0.0, 0.0, 0
        for name, image in images:
            ref, out = reference[name], run(seg, image, processing)
            kept = ref.scores >= 0.5
            score_diff = np.abs(out.scores - ref.scores)
            box_diff = np.abs(out.boxes - ref.boxes).max(axis=1)
            d_score, d_box = max(d_score, score_diff.max()), max(d_box, box_diff.max())
            if kept.any():
                d_score_kept = max(d_score_kept, score_diff[kept].max())
                d_box_kept = max(d_box_kept, box_diff[kept].max())
            changed += int(out.scores.argmax() != ref.scores.argmax())
        print(f"  {variant:26s} {d_score:13.2e} {d_box:14.2f}   {d_score_kept:23.2e} {d_box_kept:10.2f}   "
              f"{changed:>5d} of {len(images)}")
    seg.processing = REFERENCE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="default,paper_segm",
                        help="comma-separated: 'default' (embedded trained model) and/or model presets")
    parser.add_argument("--short-side", type=int, default=320, help="resize of the random models")
    parser.add_argument("--max-size", type=int, default=533)
    parser.add_argument("--margin-std", type=float, default=2.0,
                        help="spread of logit(score) over the queries of the sharp model")
    parser.add_argument("--box-std", type=float, default=1.0,
                        help="spread of the pre-sigmoid box coordinates over the queries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    start = time.perf_counter()

    images = photos() + synthetic_scenes(SYNTHETIC_SCENES)
    print(f"task {TASK}, batch size 1, {len(images)} images, {torch.get_num_threads()} CPU thread(s)")
    for name in args.models.split(","):
        if name == "default":
            title, seg = default_model()
        else:
            title, seg = sharp_random_model(name, [image for _, image in images], args)
        report(title, seg, images)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
