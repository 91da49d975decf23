"""The paper-size network has exactly the reference's tensors (names, shapes, dtypes).

The reference lists (``tests/data/reference/keys_*.tsv``) come from instantiating the
official model; the official files add ``position_ids`` (handled by the loader).
"""

from pathlib import Path

import pytest
import torch

from toist_core.config import preset
from toist_core.model import TOIST, TOISTSegm, build_model, count_parameters, load_tokenizer
from toist_core.structures import ImageBatch

pytestmark = pytest.mark.slow

REFERENCE_DIR = Path(__file__).resolve().parent / "data" / "reference"
CONTRASTIVE = ["contrastive_align_projection_image.weight", "contrastive_align_projection_image.bias",
               "contrastive_align_projection_text.weight", "contrastive_align_projection_text.bias"]


def read_tsv(name: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in (REFERENCE_DIR / name).read_text().splitlines():
        key, shape, dtype = line.split("\t")
        rows[key] = (shape, dtype)
    return rows


def describe(module: torch.nn.Module) -> dict[str, tuple[str, str]]:
    return {k: (str(tuple(v.shape)), str(v.dtype)) for k, v in module.state_dict().items()}


def diff(mine: dict, ref: dict) -> str:
    missing = sorted(set(ref) - set(mine))[:5]
    extra = sorted(set(mine) - set(ref))[:5]
    shapes = [(k, mine[k], ref[k]) for k in ref if k in mine and mine[k] != ref[k]][:5]
    return f"missing {missing}, extra {extra}, different {shapes}"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:tiny")


@pytest.fixture(scope="module")
def paper_detector(tokenizer):
    torch.manual_seed(0)
    return build_model(preset("paper"), tokenizer=tokenizer).eval()


@pytest.fixture(scope="module")
def paper_segm(tokenizer):
    torch.manual_seed(0)
    return build_model(preset("paper_segm"), tokenizer=tokenizer).eval()


def test_detector_with_contrastive_heads_matches_reference(paper_detector):
    ref = read_tsv("keys_detection_model.tsv")
    assert len(ref) == 920
    mine = describe(paper_detector)
    assert mine == ref, diff(mine, ref)


def test_detector_without_contrastive_heads_matches_reference(paper_segm):
    ref = {k: v for k, v in read_tsv("keys_detection_model.tsv").items() if k not in CONTRASTIVE}
    mine = describe(paper_segm.detr)
    assert mine == ref, diff(mine, ref)


def test_segmentation_model_matches_reference(paper_segm):
    ref = read_tsv("keys_segmentation_model.tsv")
    assert len(ref) == 948
    mine = describe(paper_segm)
    assert mine == ref, diff(mine, ref)


def test_parameter_counts_and_frozen_backbone(paper_detector, paper_segm):
    assert isinstance(paper_detector, TOIST) and isinstance(paper_segm, TOISTSegm)
    assert count_parameters(paper_detector) == 185_382_724
    assert count_parameters(paper_detector, trainable_only=True) == 185_160_324
    assert count_parameters(paper_segm) == 186_683_485
    frozen = {n for n, p in paper_detector.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("backbone.0.body.conv1", "backbone.0.body.bn1", "backbone.0.body.layer1."))
                          for n in frozen)
    assert sum(p.numel() for n, p in paper_detector.named_parameters() if n in frozen) == 222_400


def test_paper_segmentation_forward_shapes(paper_segm):
    images = ImageBatch.from_images([torch.randn(3, 64, 80)])
    with torch.no_grad():
        memory = paper_segm.encode(images, ["sit comfortably on something"])
        out = paper_segm.decode(memory)
    num_text = memory["text_memory"].shape[0]
    assert memory["img_memory"].shape == (2 * 3 + num_text, 1, 256)  # 64x80 -> 2x3 image tokens
    assert [tuple(f.shape[1:2]) for f in memory["features"]] == [(256,), (512,), (1024,), (2048,)]
    assert out["pred_logits"].shape == (1, 100, 256)
    assert out["pred_boxes"].shape == (1, 100, 4)
    assert out["pred_masks"].shape == (1, 100, 16, 20)
    assert out["aux_outputs"] == []  # released segmentation stage: no aux loss
    assert "proj_queries" not in out
    assert torch.isfinite(out["pred_masks"]).all()
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()


def test_paper_detector_forward_outputs(paper_detector):
    images = ImageBatch.from_images([torch.randn(3, 64, 80), torch.randn(3, 40, 64)])
    with torch.no_grad():
        out = paper_detector(images, ["sit comfortably on something", "step on something"])
    num_text = out["proj_tokens"].shape[1]
    assert out["pred_logits"].shape == (2, 100, 256)
    assert out["proj_queries"].shape == (2, 100, 64)
    assert out["proj_tokens"].shape == (2, num_text, 64)
    assert torch.allclose(out["proj_queries"].norm(dim=-1), torch.ones(2, 100), atol=1e-5)
    assert len(out["aux_outputs"]) == 5
    assert all(a["pred_boxes"].shape == (2, 100, 4) for a in out["aux_outputs"])
