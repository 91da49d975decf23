"""COCO-Tasks dataset: one or several ``task_{k}_{split}.json`` files + their COCO 2014 images.

Every image listed in a file is a sample, including images without a preferred object (they
get zero boxes). Per sample, as the reference's ``TOISTConvertCocoPolysToMask``: crowd objects
are dropped, only preferred objects (``category_id == 1``) are targets, boxes are converted
xywh -> xyxy and clipped to the image, degenerate boxes are dropped, masks come from the
polygons (or RLE) of the kept objects. Class names (noun and grounding captions) come from the
files' own ``COCO_categories`` lists where they have one (``toist convert-coco``), else from the
COCO table.

An item is ``(image [3, H, W] float normalised, target)``, or in ``"distill"`` mode
``(image, noun_target, pronoun_target)`` for the same augmented image. Target keys:

    boxes [n, 4]       cx, cy, w, h normalised to the (un-padded) transformed image
    labels [n]         int64, all 1
    masks [n, H, W]    bool (only when masks are loaded)
    area [n], iscrowd [n], orig_size [2] (h, w), size [2] (h, w after the transforms)
    image_id, task_id  int
    caption            str
    tokens_positive / noun_tokens_positive   per box, a list of (begin, end) character spans
"""

from __future__ import annotations

import typing
import warnings
from pathlib import Path
from typing import Callable, Collection, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from toist_core.data.captions import (OWN_CATEGORIES_FIELD, CaptionTargets, category_names, coco_id2name,
                                      grounding_targets, noun_targets, pronoun_targets)
from toist_core.data.config import CaptionMode, DataConfig
from toist_core.data.pixels import decode_rgb
from toist_core.data.schema import (AnnotationRecord, DataError, ImageRecord, TaskFile, annotation_rle,
                                    check_image_size, clipped_box, load_task_file)
from toist_core.data.transforms import Normalize, make_transforms
from toist_core.tasks import COCO_TASKS, DEFAULT_PRONOUN, TaskVocabulary

PathLike = Union[str, Path]
_CAPTION_MODES = typing.get_args(CaptionMode)


class CocoTasksDataset(Dataset):
    """Samples of one or several task files, concatenated in the order given.

    Args:
        ann_files: one ``task_{k}_{split}.json`` path or several (the task id of each comes
            from its name).
        image_dir: the folder holding the images, or a mapping split -> folder (files of
            different splits in one dataset).
        caption_mode: "pronoun" (student / plain model), "noun" (teacher), "distill"
            (both targets for one augmented image) or "grounding" (pre-training: every object of
            the image is a target, named in the caption; an image listed by several task files
            is one sample).
        transforms: called as ``transforms(image_uint8, target)``; must end with
            :class:`~toist_core.data.transforms.Normalize`. None -> normalisation only.
        masks: load instance masks.
        check_images: fail at construction if a listed image file is missing, not decodable by
            its suffix, or of another size than its record says.
        id2name: class id -> name for ``COCO_category_id`` (None: the COCO table). A file's
            own ``COCO_categories`` list (``toist convert-coco``) wins for the ids it names.
        vocabulary: what the files' task ids mean (their phrases and pronouns; None: COCO-Tasks).
    """

    def __init__(self, ann_files: Union[PathLike, Sequence[PathLike]],
                 image_dir: Union[PathLike, Mapping[str, PathLike]],
                 caption_mode: CaptionMode = "pronoun",
                 transforms: Optional[Callable[[Tensor, dict], tuple[Tensor, dict]]] = None,
                 masks: bool = False, pronoun: str = DEFAULT_PRONOUN, check_images: bool = True,
                 id2name: Optional[Mapping[int, str]] = None, vocabulary: Optional[TaskVocabulary] = None):
        if caption_mode not in _CAPTION_MODES:
            raise ValueError(f"caption_mode must be one of {_CAPTION_MODES}, got {caption_mode!r}")
        if isinstance(ann_files, (str, Path)):
            ann_files = [ann_files]
        if not ann_files:
            raise ValueError("CocoTasksDataset needs at least one annotation file")
        self.caption_mode = caption_mode
        self.transforms = transforms if transforms is not None else Normalize()
        self.masks = masks
        self.pronoun = pronoun
        self.vocabulary = vocabulary or COCO_TASKS
        loaded = [_load_with_names(p) for p in ann_files]
        self.files: list[TaskFile] = [task_file for task_file, _ in loaded]
        if caption_mode != "grounding":   # its captions name objects, not the task
            self._check_task_ids()
        self.id2name = dict(coco_id2name() if id2name is None else id2name)
        self.id2name.update(_merge_names(loaded))  # own class names win over the table
        self._image_dirs = [self._image_dir_for(image_dir, f) for f in self.files]
        # (file index, image record) per sample; O(total images).
        self._samples: list[tuple[int, ImageRecord]] = [
            (k, image) for k, task_file in enumerate(self.files) for image in task_file.images]
        if caption_mode == "grounding":  # objects do not depend on the task: each image once
            seen: set[tuple[Path, str]] = set()
            unique = []
            for k, image in self._samples:
                key = (self._image_dirs[k], image.file_name)
                if key not in seen:
                    seen.add(key)
                    unique.append((k, image))
            self._samples = unique
        if caption_mode != "pronoun":
            self._check_category_names()
        if check_images:
            self.check_image_files()

    # ------------------------------------------------------------------ construction checks

    @staticmethod
    def _image_dir_for(image_dir, task_file: TaskFile) -> Path:
        if isinstance(image_dir, Mapping):
            if task_file.split not in image_dir:
                raise DataError(f"{task_file.path}: no image folder given for split "
                                f"{task_file.split!r} (have {sorted(image_dir)})")
            return Path(image_dir[task_file.split])
        return Path(image_dir)

    def _check_task_ids(self) -> None:
        """Every file's task (its name's ``k``) has a phrase in the vocabulary: found by the first
        sample read, it was "unknown task id 15" naming neither file nor setting."""
        for task_file in self.files:
            if task_file.task_id not in self.vocabulary:
                raise DataError(f"{task_file.path}: task {task_file.task_id} (from the file name) is not in "
                                f"{self.vocabulary.describe()} (ids {', '.join(map(str, self.vocabulary.ids))}): "
                                "name the task vocabulary file that defines it (data.vocabulary of a training "
                                "config; docs/own-data.md)")

    def _check_category_names(self) -> None:
        """Every object a caption names has a class name: the preferred ones (noun captions), in
        grounding mode every object a sample keeps (as :meth:`_base_target` keeps them)."""
        grounding = self.caption_mode == "grounding"
        for task_file in self.files:
            for anns in task_file.annotations.values():
                for ann in anns:
                    if ann.coco_category_id in self.id2name or not (ann.is_preferred or grounding):
                        continue
                    if ann.is_preferred or self._named_in_grounding(task_file, ann):
                        raise DataError(f"{task_file.path}: annotation id {ann.id}: field "
                                        f"'COCO_category_id': {ann.coco_category_id} has no class "
                                        f"name (needed for {'grounding' if grounding else 'noun'} captions)")

    def _named_in_grounding(self, task_file: TaskFile, ann: AnnotationRecord) -> bool:
        """Whether a grounding sample keeps ``ann`` (only asked for the rare unnamed object)."""
        if ann.iscrowd:
            return False
        image = next(i for i in task_file.images if i.id == ann.image_id)
        return clipped_box(ann, image.height, image.width) is not None

    def check_image_files(self, image_ids: Optional[Collection[int]] = None, what: str = "image",
                     note: str = "") -> None:
        """Every sample's image file (only those of ``image_ids`` when given) exists, is of a
        kind training and evaluation decode, and is of the size its record says (its header
        read); else :class:`DataError` ``"<path>: <what> file not found (image id 7, field
        'file_name' in <task file><note>)"`` or the like."""
        checked: set[tuple[Path, int, int]] = set()   # an image of several task files: read once
        for k, image in self._samples:
            if image_ids is not None and image.id not in image_ids:
                continue
            path = self._image_dirs[k] / image.file_name
            where = f"image id {image.id}, field 'file_name' in {self.files[k].path}{note}"
            if not path.is_file():
                raise DataError(f"{path}: {what} file not found ({where})")
            # (by content, not by name: a PNG named .bmp reads; a BMP named .jpg does not)
            if (path, image.height, image.width) not in checked:
                check_image_size(path, image.height, image.width, f"image id {image.id} in {self.files[k].path}{note}")
                checked.add((path, image.height, image.width))

    # ------------------------------------------------------------------ dataset protocol

    def target_counts(self) -> dict[int, int]:
        """``{task id: objects its samples train on}``: the targets of :meth:`__getitem__`, counted
        over this dataset's samples (each image once per task)."""
        every = self.caption_mode == "grounding"
        counts = {task_file.task_id: 0 for task_file in self.files}
        for k, image in self._samples:
            task_file = self.files[k]
            counts[task_file.task_id] += len(_target_objects(task_file, image, every))
        return counts

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def task_ids(self) -> list[int]:
        return [f.task_id for f in self.files]

    def sample_info(self, index: int) -> tuple[TaskFile, ImageRecord]:
        """The task file and image record of sample ``index``."""
        k, image = self._samples[index]
        return self.files[k], image

    def image_path(self, index: int) -> Path:
        k, image = self._samples[index]
        return self._image_dirs[k] / image.file_name

    def __getitem__(self, index: int):
        k, image_rec = self._samples[index]
        task_file = self.files[k]
        image = self.load_image(index)
        base = self._base_target(task_file, image_rec, every_object=self.caption_mode == "grounding")
        captions = self._caption_targets(task_file, image_rec, base.pop("_coco_category_ids"))
        image, target = self.transforms(image, _with_captions(base, captions[0]))
        if self.caption_mode != "distill":
            return image, target
        return image, target, _with_captions(target, captions[1])   # the noun target's boxes, pronoun caption

    def check_caption_lengths(self, tokenizer, limit: int, image_ids: Optional[Collection[int]] = None) -> None:
        """:class:`DataError` unless every caption a sample trains on (of ``image_ids`` when given)
        is at most ``limit`` tokens of ``tokenizer`` (noun and grounding captions name one object
        class per part: an image of many classes outgrows the model's 256 token slots, which
        training met at that image's first batch, hours in). The error names the task file, the
        image and the count."""
        first_sample: dict[str, int] = {}   # one tokenisation per distinct caption
        for index in range(len(self._samples)):
            if image_ids is not None and self._samples[index][1].id not in image_ids:
                continue
            for caption in self.caption_texts(index):
                first_sample.setdefault(caption, index)
        texts = list(first_sample)
        for start in range(0, len(texts), 1024):
            chunk = texts[start:start + 1024]
            for text, ids in zip(chunk, tokenizer(chunk)["input_ids"]):
                if len(ids) > limit:
                    task_file, image = self.sample_info(first_sample[text])
                    raise DataError(f"{task_file.path}: image id {image.id}: its {self.caption_mode} caption is "
                                    f"{len(ids)} tokens, the model reads at most {limit} ({text[:80]!r}...); "
                                    "leave out classes or images with that many named objects")

    def caption_texts(self, index: int) -> list[str]:
        """The caption(s) sample ``index`` trains on, without reading its image: one, or in
        ``"distill"`` mode the noun caption and the pronoun caption."""
        k, image_rec = self._samples[index]
        task_file = self.files[k]
        objects = _target_objects(task_file, image_rec, self.caption_mode == "grounding")
        preferred = [ann.coco_category_id for ann, _ in objects]
        return [c.caption for c in self._caption_targets(task_file, image_rec, preferred)]

    def _caption_targets(self, task_file: TaskFile, image_rec: ImageRecord,
                         preferred: Sequence[int]) -> list[CaptionTargets]:
        """The captions of a sample whose target objects have the classes ``preferred``:
        ``[grounding]``, ``[pronoun]``, ``[noun]`` or (distill) ``[noun, pronoun]``."""
        if self.caption_mode == "grounding":
            return [grounding_targets(preferred, self.id2name)]
        pronoun = pronoun_targets(task_file.task_id, len(preferred), self.pronoun, self.vocabulary)
        if self.caption_mode == "pronoun":
            return [pronoun]
        noun = noun_targets(task_file.task_id, preferred, self.id2name, self.vocabulary,
                            noun_caption_classes(task_file, image_rec))
        return [noun] if self.caption_mode == "noun" else [noun, pronoun]

    # ------------------------------------------------------------------ sample construction

    def load_image(self, index: int) -> Tensor:
        """The RGB image of sample ``index`` as a uint8 ``tv_tensors.Image [3, H, W]``: the
        stored pixel grid (:func:`toist_core.data.pixels.decode_rgb`, which ``toist predict``
        reads too), of the size its record says."""
        k, image_rec = self._samples[index]
        path = self._image_dirs[k] / image_rec.file_name
        where = f"image id {image_rec.id} in {self.files[k].path}"
        pixels = decode_rgb(path, where)
        height, width = pixels.shape[-2:]
        if (height, width) != (image_rec.height, image_rec.width):
            raise DataError(f"{path}: image is {height}x{width} but the record says "
                            f"{image_rec.height}x{image_rec.width} (fields 'height'/'width', {where})")
        return tv_tensors.Image(pixels)

    def _base_target(self, task_file: TaskFile, image_rec: ImageRecord, every_object: bool = False) -> dict:
        """Target of the preferred objects (``every_object``: of all objects)."""
        height, width = image_rec.height, image_rec.width
        objects = _target_objects(task_file, image_rec, every_object)
        kept = [ann for ann, _ in objects]
        boxes = [box for _, box in objects]
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.ones(len(kept), dtype=torch.int64),
            "area": torch.tensor([a.area for a in kept], dtype=torch.float32),
            "iscrowd": torch.zeros(len(kept), dtype=torch.int64),
            "image_id": image_rec.id,
            "task_id": task_file.task_id,
            "orig_size": torch.tensor([height, width]),
            "size": torch.tensor([height, width]),
            "_coco_category_ids": [a.coco_category_id for a in kept],
        }
        if self.masks:
            target["masks"] = _masks(task_file, image_rec, kept)
        return target


def _target_objects(task_file: TaskFile, image_rec: ImageRecord,
                    every_object: bool = False) -> list[tuple[AnnotationRecord, list[float]]]:
    """(object, its box clipped to the image) of each target of an image: the preferred objects
    (``every_object``: all objects) except crowd regions and boxes empty inside the image."""
    found = []
    for ann in task_file.image_annotations(image_rec.id):
        if ann.iscrowd or not (ann.is_preferred or every_object):
            continue
        box = clipped_box(ann, image_rec.height, image_rec.width)
        if box is not None:  # degenerate boxes are dropped
            found.append((ann, box))
    return found


def noun_caption_classes(task_file: TaskFile, image_rec: ImageRecord) -> list[int]:
    """The COCO classes an image's noun (teacher) caption names: of every preferred object, crowd
    objects and boxes empty or outside the image included, as the reference builds its caption
    before it drops those objects' boxes; training and evaluation read the same caption."""
    return [ann.coco_category_id for ann in task_file.image_annotations(image_rec.id) if ann.is_preferred]


def _load_with_names(path: PathLike) -> tuple[TaskFile, dict[int, str]]:
    """A task file and its own class names (``COCO_categories``; {} when it has none).

    The raw JSON is dropped at once: a dataset (copied into every loader worker) must not hold
    every file twice.
    """
    task_file = load_task_file(path, keep_raw=True)
    raw, task_file.raw = task_file.raw, None
    if not isinstance(raw, dict) or OWN_CATEGORIES_FIELD not in raw:
        return task_file, {}
    return task_file, category_names(raw[OWN_CATEGORIES_FIELD], f"{task_file.path}: field {OWN_CATEGORIES_FIELD!r}")


def _merge_names(loaded: Sequence[tuple[TaskFile, dict[int, str]]]) -> dict[int, str]:
    """One name per class id over all files: a caption must not depend on which file an image came from."""
    names: dict[int, str] = {}
    named_by: dict[int, Path] = {}
    for task_file, own in loaded:
        for cat_id, name in own.items():
            if cat_id in names and names[cat_id] != name:
                raise DataError(f"{task_file.path}: field {OWN_CATEGORIES_FIELD!r}: category id {cat_id} is named "
                                f"{name!r}, but {named_by[cat_id]} names it {names[cat_id]!r}")
            names[cat_id] = name
            named_by.setdefault(cat_id, task_file.path)
    return names


def _with_captions(target: dict, captions: CaptionTargets) -> dict:
    out = dict(target)
    out["caption"] = captions.caption
    out["tokens_positive"] = captions.tokens_positive
    out["noun_tokens_positive"] = captions.noun_tokens_positive
    if captions.pronoun:
        out["pronoun"] = captions.pronoun
    return out


def _masks(task_file: TaskFile, image_rec: ImageRecord, anns: Sequence[AnnotationRecord]) -> Tensor:
    """``[n, H, W]`` bool masks of ``anns`` (polygon parts are united, as the reference's ``any``)."""
    height, width = image_rec.height, image_rec.width
    if not anns:
        return torch.zeros((0, height, width), dtype=torch.bool)
    rles = [annotation_rle(ann, height, width, task_file.path) for ann in anns]
    with warnings.catch_warnings():  # pycocotools' numpy-2 copy-keyword DeprecationWarning
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = mask_utils.decode(rles)  # [H, W, n] uint8, Fortran order
    return torch.from_numpy(np.ascontiguousarray(decoded.transpose(2, 0, 1))).bool()


def build_dataset(cfg: DataConfig, split: str, caption_mode: Optional[CaptionMode] = None,
                  train: Optional[bool] = None) -> CocoTasksDataset:
    """All configured tasks of ``split`` as one dataset (one model serves all tasks).

    ``train`` (default: ``split == cfg.train_split``) selects the random train transforms;
    ``caption_mode`` defaults to ``cfg.caption_mode`` for training and "pronoun" otherwise
    (the reference evaluates with pronoun captions only).
    """
    train = (split == cfg.train_split) if train is None else train
    if caption_mode is None:
        caption_mode = cfg.caption_mode if train else "pronoun"
    transforms = make_transforms("train" if train else "test", **cfg.transform_kwargs())
    files = [cfg.annotation_path(task, split) for task in cfg.tasks]
    return CocoTasksDataset(files, cfg.image_dir(split), caption_mode=caption_mode,
                            transforms=transforms, masks=cfg.masks, pronoun=cfg.pronoun,
                            check_images=cfg.check_images, vocabulary=cfg.task_vocabulary())
