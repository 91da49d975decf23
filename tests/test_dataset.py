"""COCO-Tasks dataset items against their JSON: boxes, masks, captions, transforms and batching."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision import tv_tensors

from toist_core.data.captions import coco_id2name
from toist_core.data.coco_tasks import CocoTasksDataset, build_dataset
from toist_core.data.collate import Collator, collate
from toist_core.data.config import DataConfig
from toist_core.data.schema import DataError
from toist_core.data.synth import generate
from toist_core.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, RandomSizeCrop, crop, make_transforms,
                                        resized_hw)
from toist_core.tasks import TASK_PHRASES

# pycocotools calls np.array(copy=False) on its own objects (numpy 2 warns); not our code.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "toist_core" / "assets" / "tiny_tokenizer"
SMALL = dict(train_sizes=[96, 128], max_size=200, crop_resize_sizes=[100, 120], crop_min_size=64,
             crop_max_size=200, test_size=120)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, tasks=[2, 14], splits=("train", "test"), images_per_split=8, seed=5, image_format="png")
    return root


@pytest.fixture(scope="module")
def edited(root):
    """task_2_test.json plus a crowd object, a degenerate box, an RLE object and a box out of the image."""
    data = json.loads((root / "annotations" / "task_2_test.json").read_text())
    image = data["images"][0]
    h, w = image["height"], image["width"]
    block = np.zeros((h, w), dtype=np.uint8, order="F")
    block[10:30, 20:50] = 1
    rle = mask_utils.encode(block)
    base = {"image_id": image["id"], "area": 100.0, "COCO_category_id": 63, "category_id": 1}
    data["annotations"] += [
        dict(base, id=1, bbox=[5, 5, 40, 40], iscrowd=1,
             segmentation={"size": [h, w], "counts": [0, h * w]}),                         # crowd: dropped
        dict(base, id=2, bbox=[30, 30, 0, 12], iscrowd=0, segmentation=[[30, 30, 30, 42, 30.5, 36]]),
        dict(base, id=3, bbox=[20, 10, 30, 20], iscrowd=0,
             segmentation={"size": [h, w], "counts": rle["counts"].decode()}),              # RLE object
        dict(base, id=4, bbox=[w - 10, h - 8, 25, 30], iscrowd=0,                             # clipped
             segmentation=[[w - 10, h - 8, w - 1, h - 8, w - 1, h - 1, w - 10, h - 1]]),
    ]
    path = root / "edited" / "task_2_test.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _coco(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _expected_xyxy(anns, h, w):
    boxes = []
    for a in anns:
        x, y, bw, bh = a["bbox"]
        x0, y0, x1, y1 = max(0, min(x, w)), max(0, min(y, h)), max(0, min(x + bw, w)), max(0, min(y + bh, h))
        if x1 > x0 and y1 > y0:
            boxes.append([x0, y0, x1, y1])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def _kept(coco, image_id):
    return [a for a in coco.imgToAnns[image_id] if a["category_id"] == 1 and not a["iscrowd"]
            and min(a["bbox"][0] + a["bbox"][2], coco.imgs[image_id]["width"]) > max(a["bbox"][0], 0)
            and min(a["bbox"][1] + a["bbox"][3], coco.imgs[image_id]["height"]) > max(a["bbox"][1], 0)]


def test_resized_hw_reference_rule():
    assert resized_hw(480, 640, 800, 1333) == (800, 1066)
    assert resized_hw(100, 1000, 800, 1333) == (133, 1330)   # long side capped: short = round(1333/10)
    assert resized_hw(600, 400, 800, 1000) == (1000, 667)
    assert resized_hw(800, 900, 800, 1333) == (800, 900)      # already the right size


def test_items_match_json_after_test_transform(root):
    ann = root / "annotations" / "task_2_test.json"
    coco = _coco(ann)
    dataset = CocoTasksDataset(ann, root / "images" / "val2014", masks=True,
                               transforms=make_transforms("test", **SMALL))
    assert len(dataset) == len(coco.dataset["images"])  # images without a preferred object are kept
    empty = 0
    for index in range(len(dataset)):
        image, target = dataset[index]
        record = coco.dataset["images"][index]
        h, w = record["height"], record["width"]
        short, long = min(h, w), max(h, w)
        size = SMALL["test_size"]
        if long / short * size > SMALL["max_size"]:
            size = int(round(SMALL["max_size"] * short / long))
        oh, ow = (int(size * h / w), size) if w < h else (size, int(size * w / h))
        assert target["image_id"] == record["id"] and target["task_id"] == 2
        assert image.shape == (3, oh, ow) and target["size"].tolist() == [oh, ow]
        assert target["orig_size"].tolist() == [h, w]
        xyxy = _expected_xyxy(_kept(coco, record["id"]), h, w) * torch.tensor([ow / w, oh / h, ow / w, oh / h])
        expected = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2 / ow, (xyxy[:, 1] + xyxy[:, 3]) / 2 / oh,
                                (xyxy[:, 2] - xyxy[:, 0]) / ow, (xyxy[:, 3] - xyxy[:, 1]) / oh], dim=1)
        assert torch.allclose(target["boxes"], expected, atol=1e-5)
        assert target["labels"].tolist() == [1] * len(expected)
        assert target["masks"].shape == (len(expected), oh, ow) and target["masks"].dtype == torch.bool
        assert target["caption"] == TASK_PHRASES[2] + "something"
        assert target["tokens_positive"] == [[(0, len(target["caption"]))]] * len(expected)
        empty += len(expected) == 0
    assert 0 < empty < len(dataset)


def test_image_is_normalised_rgb(root):
    ann = root / "annotations" / "task_2_test.json"
    dataset = CocoTasksDataset(ann, root / "images" / "val2014")
    image, _ = dataset[0]
    raw = dataset.load_image(0).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(image, (raw - mean) / std, atol=1e-6)


def test_crowd_degenerate_rle_and_clipping(root, edited):
    coco = _coco(edited)
    dataset = CocoTasksDataset(edited, root / "images" / "val2014", masks=True)
    image_id = coco.dataset["images"][0]["id"]
    _, target = dataset[0]
    h, w = coco.imgs[image_id]["height"], coco.imgs[image_id]["width"]
    kept = [a for a in coco.imgToAnns[image_id] if a["category_id"] == 1 and a["id"] not in (1, 2)]
    assert len(target["boxes"]) == len(kept)
    xyxy = _expected_xyxy(kept, h, w)
    assert xyxy[-1].tolist() == [w - 10, h - 8, w, h]  # clipped to the image
    cxcywh = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2 / w, (xyxy[:, 1] + xyxy[:, 3]) / 2 / h,
                          (xyxy[:, 2] - xyxy[:, 0]) / w, (xyxy[:, 3] - xyxy[:, 1]) / h], dim=1)
    assert torch.allclose(target["boxes"], cxcywh, atol=1e-6)
    # Masks equal pycocotools' rasterisation of each kept object's polygons / RLE.
    for mask, ann in zip(target["masks"], kept):
        assert torch.equal(mask, torch.from_numpy(coco.annToMask(ann).astype(bool)))
    assert target["masks"][-2].sum() == 20 * 30  # the RLE block
    assert torch.allclose(target["area"], torch.tensor([a["area"] for a in kept], dtype=torch.float32))


def test_rle_counts_that_are_not_a_mask_of_the_image_are_refused_not_decoded(root, tmp_path):
    """pycocotools decoded a cut-short counts string (or a list adding up to 10 of h * w pixels)
    into a mask read from uninitialised memory: a different mask at every read of the sample."""
    from toist_core.data.schema import DataError

    data = json.loads((root / "annotations" / "task_2_test.json").read_text())
    image = data["images"][0]
    h, w = image["height"], image["width"]
    block = np.zeros((h, w), dtype=np.uint8, order="F")
    block[10:30, 20:50] = 1
    whole = mask_utils.encode(block)["counts"].decode()
    ann = next(a for a in data["annotations"] if a["image_id"] == image["id"])
    path = tmp_path / "task_2_test.json"
    first_number = whole[:next(i for i, c in enumerate(whole) if c < "P") + 1]  # cut short after one run
    for counts in (first_number, [3, 7]):
        ann["segmentation"] = {"size": [h, w], "counts": counts}
        path.write_text(json.dumps(data))
        with pytest.raises(DataError, match=rf"\(id {ann['id']}\): field 'segmentation' \(RLE size \[{h}, {w}\]\): "
                                            rf"RLE 'counts' cover \d+ pixels, not height \* width = {h * w}"):
            CocoTasksDataset(path, root / "images" / "val2014", masks=True)
    ann["segmentation"] = {"size": [h, w], "counts": whole}
    path.write_text(json.dumps(data))
    dataset = CocoTasksDataset(path, root / "images" / "val2014", masks=True)
    assert dataset.sample_info(0)[1].id == image["id"]


def test_noun_and_distill_modes(root):
    ann = root / "annotations" / "task_14_train.json"
    coco = _coco(ann)
    names = coco_id2name()
    noun = CocoTasksDataset(ann, root / "images" / "train2014", caption_mode="noun")
    distill = CocoTasksDataset(ann, root / "images" / "train2014", caption_mode="distill", masks=True,
                               transforms=make_transforms("train", **SMALL))
    saw_empty = saw_boxes = False
    for index in range(len(noun)):
        _, target = noun[index]
        kept = _kept(coco, target["image_id"])
        # The reference's rule: every preferred object's class (tdod.py's obj_caption)
        cats = sorted({a["COCO_category_id"] for a in coco.imgToAnns[target["image_id"]] if a["category_id"] == 1})
        assert target["caption"] == " ".join(TASK_PHRASES[14] + names[c] for c in cats)
        for spans, nspans, a in zip(target["tokens_positive"], target["noun_tokens_positive"], kept):
            (b, e), = spans
            (nb, ne), = nspans
            assert target["caption"][b:e] == TASK_PHRASES[14] + names[a["COCO_category_id"]]
            assert target["caption"][nb:ne] == names[a["COCO_category_id"]] and b < nb < ne == e
        saw_empty |= not kept
        saw_boxes |= bool(kept)
        torch.manual_seed(index)
        image, t_noun, t_pron = distill[index]
        assert t_noun["caption"] == target["caption"]
        assert t_pron["caption"] == TASK_PHRASES[14] + "something"
        for key in ("boxes", "masks", "area", "size", "labels"):
            assert torch.equal(t_noun[key], t_pron[key])
        assert t_pron["tokens_positive"] == [[(0, len(t_pron["caption"]))]] * len(kept)
    assert saw_empty and saw_boxes


def test_noun_caption_names_preferred_objects_whose_boxes_are_dropped(root, tmp_path):
    """The reference builds the teacher's caption from every preferred object of the image, then
    drops crowd objects and empty or outside boxes from the targets; the caption named only the
    kept boxes' classes. Training's item and the teacher's evaluation input are one caption."""
    from toist_core.inference.noun_captions import noun_caption_state

    data = json.loads((root / "annotations" / "task_2_train.json").read_text())
    image = data["images"][0]
    h, w = image["height"], image["width"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != image["id"]]
    base = {"image_id": image["id"], "area": 100.0, "category_id": 1, "iscrowd": 0,
            "segmentation": [[10, 10, 50, 10, 50, 50, 10, 50]]}
    data["annotations"] += [
        dict(base, id=1, bbox=[10, 10, 40, 40], COCO_category_id=62),                   # chair: kept
        dict(base, id=2, bbox=[5, 5, 40, 40], COCO_category_id=63, iscrowd=1,          # couch: crowd
             segmentation={"size": [h, w], "counts": [0, h * w]}),
        dict(base, id=3, bbox=[20, 20, 0, 30], COCO_category_id=15),                    # bench: empty box
        dict(base, id=4, bbox=[w + 5, 5, 10, 10], COCO_category_id=57),                 # carrot: outside
        dict(base, id=5, bbox=[30, 30, 10, 10], COCO_category_id=1, category_id=0),     # person: not preferred
    ]
    path = tmp_path / "task_2_train.json"
    path.write_text(json.dumps(data))
    dataset = CocoTasksDataset(path, root / "images" / "train2014", caption_mode="noun")
    index = next(i for i in range(len(dataset)) if dataset.sample_info(i)[1].id == image["id"])
    _, target = dataset[index]
    names = coco_id2name()
    phrase = TASK_PHRASES[2]
    assert target["caption"] == " ".join(phrase + names[c] for c in (15, 57, 62, 63))
    assert len(target["boxes"]) == 1
    (begin, end), = target["tokens_positive"][0]
    assert target["caption"][begin:end] == phrase + "chair"

    class Encoder:
        def encode_text(self, captions):
            return captions

    assert noun_caption_state(Encoder(), dataset, index, 2).caption == target["caption"]
    import numpy as np

    # An index read from an array (it was taken for a sequence: "'numpy.int64' is not iterable").
    assert noun_caption_state(Encoder(), dataset, np.int64(index), 2).caption == target["caption"]


def test_grounding_mode_names_every_object_once_per_image(root):
    files = [root / "annotations" / f"task_{k}_train.json" for k in (2, 14)]
    dataset = CocoTasksDataset(files, root / "images" / "train2014", caption_mode="grounding")
    assert len(dataset) == 8  # both task files list the same 8 images: each is one sample
    coco = _coco(files[0])
    names = coco_id2name()
    for index in range(len(dataset)):
        _, target = dataset[index]
        anns = [a for a in coco.imgToAnns[target["image_id"]] if not a["iscrowd"]]
        assert len(target["boxes"]) == len(anns) >= 1   # preferred or not, every object
        cats = sorted({a["COCO_category_id"] for a in anns})
        assert target["caption"] == ". ".join(names[c] for c in cats)
        for (span,), a in zip(target["tokens_positive"], anns):
            assert target["caption"][span[0]:span[1]] == names[a["COCO_category_id"]]
    with pytest.raises(ValueError, match="caption_mode"):
        CocoTasksDataset(files, root / "images" / "train2014", caption_mode="nouns")


def test_caption_texts_are_the_items_captions_in_every_mode(root):
    files = [root / "annotations" / f"task_{k}_train.json" for k in (2, 14)]
    for mode in ("pronoun", "noun", "distill", "grounding"):
        dataset = CocoTasksDataset(files, root / "images" / "train2014", caption_mode=mode)
        for index in range(len(dataset)):
            item = dataset[index]
            assert dataset.caption_texts(index) == [target["caption"] for target in item[1:]], (mode, index)


def test_a_caption_longer_than_the_model_reads_is_refused_before_training(root, tmp_path):
    """An image of many named classes gave a noun caption over the 256 token slots: training met
    it at that image's first batch ("caption too long", naming no file), hours in."""
    from toist_core.model import load_tokenizer

    tokenizer = load_tokenizer(str(TOKENIZER_DIR))
    data = json.loads((root / "annotations" / "task_14_train.json").read_text())
    image = data["images"][3]
    data["COCO_categories"] = [{"id": 1000 + k, "name": f"kitchen utensil number {k}"} for k in range(40)]
    data["annotations"] += [{"id": 9000 + k, "image_id": image["id"], "bbox": [2, 2, 10, 10], "area": 100.0,
                             "iscrowd": 0, "category_id": 1, "COCO_category_id": 1000 + k,
                             "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]} for k in range(40)]
    path = tmp_path / "task_14_train.json"
    path.write_text(json.dumps(data))
    for mode in ("noun", "distill", "grounding"):
        dataset = CocoTasksDataset(path, root / "images" / "train2014", caption_mode=mode)
        with pytest.raises(DataError, match=rf"{path}: image id {image['id']}: its {mode} caption is \d+ tokens, "
                                            r"the model reads at most 256 \('"):
            dataset.check_caption_lengths(tokenizer, 256)
    # Pronoun captions name no class; the untouched file passes in every mode.
    CocoTasksDataset(path, root / "images" / "train2014", caption_mode="pronoun").check_caption_lengths(tokenizer, 256)
    for mode in ("noun", "distill", "grounding"):
        CocoTasksDataset(root / "annotations" / "task_14_train.json", root / "images" / "train2014",
                         caption_mode=mode).check_caption_lengths(tokenizer, 256)


def test_train_transform_keeps_boxes_and_masks_together(root):
    ann = root / "annotations" / "task_2_train.json"
    coco = _coco(ann)
    dataset = CocoTasksDataset(ann, root / "images" / "train2014", masks=True,
                               transforms=make_transforms("train", **SMALL))
    torch.manual_seed(0)
    sizes = set()
    for _ in range(3):
        for index in range(len(dataset)):
            image, target = dataset[index]
            h, w = target["size"].tolist()
            sizes.add((h, w))
            assert image.shape[-2:] == (h, w) and max(h, w) <= SMALL["max_size"] + 1
            assert len(target["boxes"]) == len(_kept(coco, target["image_id"]))  # no box lost
            boxes = target["boxes"]
            assert ((boxes[:, 2:] > 0) & (boxes[:, :2] >= 0) & (boxes[:, :2] <= 1)).all()
            for box, mask in zip(boxes, target["masks"]):
                if mask.any():  # the mask lies inside its box (up to the nearest-neighbour pixel)
                    ys, xs = torch.nonzero(mask, as_tuple=True)
                    cx, cy, bw, bh = (box * torch.tensor([w, h, w, h])).tolist()
                    assert xs.min() >= cx - bw / 2 - 2 and xs.max() <= cx + bw / 2 + 1
                    assert ys.min() >= cy - bh / 2 - 2 and ys.max() <= cy + bh / 2 + 1
    assert len(sizes) > 2  # random sizes and crops happened


def test_crop_hand_computed():
    image = tv_tensors.Image(torch.zeros(3, 50, 80, dtype=torch.uint8))
    masks = torch.zeros(2, 50, 80, dtype=torch.bool)
    masks[0, 12:20, 5:40] = True
    target = {"boxes": torch.tensor([[5.0, 12.0, 40.0, 20.0], [60.0, 30.0, 79.0, 49.0]]),
              "area": torch.tensor([1.0, 1.0]), "masks": masks}
    out_image, out = crop(image, target, top=10, left=30, height=30, width=40)
    assert out_image.shape == (3, 30, 40)
    assert out["boxes"].tolist() == [[0.0, 2.0, 10.0, 10.0], [30.0, 20.0, 40.0, 30.0]]
    assert out["area"].tolist() == [80.0, 100.0]
    assert out["masks"][0].sum() == 8 * 10 and out["size"].tolist() == [30, 40]


def test_random_size_crop_never_loses_a_box():
    image = tv_tensors.Image(torch.zeros(3, 300, 400, dtype=torch.uint8))
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [390.0, 290.0, 400.0, 300.0]])
    target = {"boxes": boxes, "area": torch.ones(2)}
    cropper = RandomSizeCrop(100, 1000)
    torch.manual_seed(1)
    for _ in range(20):
        out_image, out = cropper(image, target)
        kept = out["boxes"]
        assert len(kept) == 2 and bool(((kept[:, 2:] - kept[:, :2]) > 0).all())
        assert out_image.shape[-2:] == tuple(out.get("size", torch.tensor([300, 400])).tolist())


def test_collate_pads_and_builds_positive_maps(root):
    from toist_core.model.text import load_tokenizer
    tokenizer = load_tokenizer(str(TOKENIZER_DIR))
    ann = root / "annotations" / "task_14_test.json"
    dataset = CocoTasksDataset(ann, root / "images" / "val2014", caption_mode="distill")
    batch = [dataset[i] for i in range(4)]
    images, nouns, pronouns = Collator(tokenizer)(batch)
    assert images.tensors.shape[0] == 4
    for i, (image, t_noun, _) in enumerate(batch):
        h, w = image.shape[-2:]
        assert torch.equal(images.tensors[i, :, :h, :w], image)
        assert not images.mask[i, :h, :w].any() and images.mask[i].sum() == images.mask[i].numel() - h * w
        assert nouns[i]["positive_map"].shape == (len(t_noun["boxes"]), 256)
        assert pronouns[i]["positive_map"].shape == (len(t_noun["boxes"]), 256)
        if len(t_noun["boxes"]):
            ids = tokenizer(t_noun["caption"])["input_ids"]
            for row, ((b, e),) in zip(nouns[i]["positive_map"], t_noun["tokens_positive"]):
                positive = torch.nonzero(row).flatten().tolist()
                assert tokenizer.decode([ids[k] for k in positive]).strip() == t_noun["caption"][b:e]
            assert set(nouns[i]["positive_map"].unique().tolist()) == {0.0, 1.0}
    plain_images, targets = collate([(b[0], b[2]) for b in batch])
    assert "positive_map" not in targets[0] and torch.equal(plain_images.tensors, images.tensors)


def test_concatenated_tasks_and_config(root):
    cfg = DataConfig(root=str(root), tasks=[2, 14], **SMALL)
    train = build_dataset(cfg, "train")
    test = build_dataset(cfg, "test")
    assert len(train) == 16 and len(test) == 16
    assert [test.sample_info(i)[0].task_id for i in (0, 8)] == [2, 14]
    assert test[9][1]["task_id"] == 14 and test.caption_mode == "pronoun"
    noun_cfg = DataConfig(root=str(root), tasks=[14], caption_mode="distill", **SMALL)
    assert len(build_dataset(noun_cfg, "train")[0]) == 3
    with pytest.raises(ValueError, match="tasks: 15"):
        DataConfig(tasks=[15])


def test_boxes_are_clipped_and_tested_in_float32_as_the_reference_does():
    """The reference makes the boxes a float32 tensor before x + w and the degenerate test: a
    width below float32's resolution at x is dropped (it was kept as a zero-width target, which
    also blocked every random crop of its image)."""
    from toist_core.data.schema import AnnotationRecord, clipped_box

    def record(bbox):
        return AnnotationRecord(id=1, image_id=1, bbox=bbox, segmentation=[], area=1.0, iscrowd=0,
                                category_id=1, coco_category_id=63)

    assert clipped_box(record((100.0, 20.0, 1e-6, 10.0)), 200, 300) is None
    for bbox in [(0.1, 0.7, 33.3, 12.9), (290.15, 190.05, 20.0, 20.0), (-3.3, 5.5, 10.1, 0.3)]:
        reference = torch.tensor([bbox], dtype=torch.float32)
        reference[:, 2:] += reference[:, :2]
        reference[:, 0::2].clamp_(min=0, max=300)
        reference[:, 1::2].clamp_(min=0, max=200)
        assert clipped_box(record(bbox), 200, 300) == reference[0].tolist()


@pytest.mark.parametrize("sizes, message", [
    (dict(max_size=0), "max_size: 0: a size in pixels"),          # trained on 1 x 1 images
    (dict(train_sizes=[96, -96]), "train_sizes: -96: sizes are pixels"),
    (dict(test_size=0), "test_size: 0: a size in pixels"),
    (dict(crop_max_size=0), "crop_max_size: 0: a size in pixels"),
    (dict(crop_min_size=300, crop_max_size=200), "crop_min_size: 300 is above crop_max_size 200"),
])
def test_sizes_that_are_not_pixels_are_refused_by_field(sizes, message):
    from training.config import load_config

    with pytest.raises(ValueError, match=message):
        DataConfig(**dict(SMALL, **sizes))
    overrides = [f"data.{name}={value}" for name, value in sizes.items()]
    with pytest.raises(ValueError, match=rf"tiny_noun.yaml \+ overrides.data: {message}"):
        load_config(Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny_noun.yaml", overrides)


def test_an_image_of_another_size_than_its_record_is_refused_when_the_dataset_is_built(root, tmp_path):
    """It passed construction and stopped a training run (or an evaluation) when that sample was
    first read; now the header is read at construction (check_images, the default)."""
    from PIL import Image

    from toist_core.data.schema import DataError

    ann = root / "annotations" / "task_2_test.json"
    record = json.loads(ann.read_text())["images"][-1]
    images = tmp_path / "images"
    images.mkdir()
    for name in {im["file_name"] for im in json.loads(ann.read_text())["images"]}:
        (images / name).symlink_to(root / "images" / "val2014" / name)
    stored = images / record["file_name"]
    stored.unlink()
    Image.new("RGB", (record["height"], record["width"])).save(stored)   # stored transposed
    with pytest.raises(DataError, match=rf"{stored}: image is {record['width']}x{record['height']} \(height x width\) "
                                        rf"but the record says {record['height']}x{record['width']} \(fields "
                                        rf"'height'/'width' of image id {record['id']} in {ann}\)"):
        CocoTasksDataset(ann, images)
