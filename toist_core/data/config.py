"""Typed configuration of the COCO-Tasks data pipeline (YAML via ``toist_core.typed_config``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from toist_core.config import MAX_INPUT_SIDE, InputSize
from toist_core.data.transforms import CROP_RESIZE_SIZES, TRAIN_SIZES
from toist_core.tasks import COCO_TASKS, DEFAULT_PRONOUN, TaskEntry, TaskVocabulary

CaptionMode = Literal["pronoun", "noun", "distill", "grounding"]


@dataclass
class DataConfig:
    """Where the data lies, which of it to read, and how samples are built.

    Layout under ``root`` (the real COCO-Tasks layout; ``toist synth`` writes the same):
    ``annotations/task_{k}_{split}.json``, ``images/train2014/``, ``images/val2014/``.
    The defaults are the reference's (``configs/tdod.json``, ``datasets/tdod.py``).
    """

    root: str = "data/coco-tasks"  # folder with annotations/ and images/
    tasks: list[int] = field(default_factory=list)  # task ids to read, as listed; [] (default): every task of the vocabulary
    # Task vocabulary file (id, phrase, pronoun; docs/own-data.md); "" = the 14 COCO-Tasks tasks.
    # Its entries are copied into ``vocabulary_entries`` when the config is built, so that a
    # training checkpoint (whose config is saved with it) carries the vocabulary itself; recorded
    # entries win over the file.
    vocabulary: str = ""
    vocabulary_entries: list[TaskEntry] = field(default_factory=list)  # filled from `vocabulary`
    vocabulary_name: str = ""  # filled from `vocabulary`
    train_split: str = "train"  # reads task_k_<train_split>.json
    # The validation split is the training config's eval.split (there is no data.eval_split).
    # Image folder (relative to root) per split; the reference reads test images from val2014.
    image_dirs: dict[str, str] = field(default_factory=lambda: {
        "train": "images/train2014", "test": "images/val2014"})
    caption_mode: CaptionMode = "pronoun"  # training captions (evaluation: pronoun; noun and grounding runs: noun)
    pronoun: str = DEFAULT_PRONOUN  # the word for the object in pronoun captions
    masks: bool = False                    # load instance masks (mask-head training / segm eval)
    check_images: bool = True              # when the dataset is built: each image exists, of a decodable kind and its record's size
    # Transforms (reference values; shrink them for tiny CPU runs on synthetic images).
    train_sizes: list[int] = field(default_factory=lambda: list(TRAIN_SIZES))  # training short side, one per sample
    max_size: int = 1333  # training resize: long side cap
    # random-crop branch: first resize
    crop_resize_sizes: list[int] = field(default_factory=lambda: list(CROP_RESIZE_SIZES))
    crop_min_size: int = 384  # random crop: smallest side
    crop_max_size: int = 1333  # random crop: largest side
    test_size: int = 800  # evaluation resize: short side, at most max_size (the long side's cap)

    def __post_init__(self) -> None:
        if not self.vocabulary_entries and self.vocabulary:
            loaded = TaskVocabulary.load(self.vocabulary)
            self.vocabulary_entries, self.vocabulary_name = list(loaded.entries), loaded.name
        elif self.vocabulary and Path(self.vocabulary).is_file():
            self._warn_if_file_changed()
        vocabulary = self.task_vocabulary()
        if not self.tasks:
            self.tasks = list(vocabulary.ids)
        repeated = sorted({task for task in self.tasks if self.tasks.count(task) > 1})
        if repeated:   # read twice, trained on twice as often
            raise ValueError(f"tasks: {repeated} listed more than once")
        for task in self.tasks:
            if task not in vocabulary:
                raise ValueError(f"tasks: {task} is not a task of {vocabulary.describe()}: ids 1..{vocabulary.num_tasks}")
        if not self.pronoun:
            raise ValueError("pronoun: must be a non-empty word")
        if not self.train_sizes or not self.crop_resize_sizes:
            raise ValueError("train_sizes / crop_resize_sizes: need at least one size")
        # Pixel sizes: 0 trained on 1 x 1 images without a word, a negative one failed in a
        # loader worker without naming the field.
        for name in ("train_sizes", "crop_resize_sizes"):
            bad = [size for size in getattr(self, name) if not 1 <= size <= MAX_INPUT_SIDE]
            if bad:
                raise ValueError(f"{name}: {bad[0]}: sizes are pixels, 1..{MAX_INPUT_SIDE}")
        for name in ("max_size", "crop_min_size", "crop_max_size", "test_size"):
            # (past the cap the run started, trained, and failed at its first evaluation)
            if not 1 <= getattr(self, name) <= MAX_INPUT_SIDE:
                raise ValueError(f"{name}: {getattr(self, name)}: a size in pixels, 1..{MAX_INPUT_SIDE}")
        if self.crop_min_size > self.crop_max_size:
            raise ValueError(f"crop_min_size: {self.crop_min_size} is above crop_max_size {self.crop_max_size}")

    def _warn_if_file_changed(self) -> None:
        """The recorded entries are used; a file edited since they were recorded is said."""
        try:
            now = TaskVocabulary.load(self.vocabulary)
        except ValueError:
            return  # not readable now: the recorded entries stand
        if list(now.entries) != list(self.vocabulary_entries):
            warnings.warn(f"{self.vocabulary}: its tasks differ from the data.vocabulary_entries this configuration "
                          "recorded from it; the recorded ones are used (name the file on the command line, "
                          f"data.vocabulary={self.vocabulary}, to read it again)", stacklevel=3)

    def task_vocabulary(self) -> TaskVocabulary:
        """The tasks this data's ids mean (COCO-Tasks unless ``vocabulary`` names a file)."""
        if not self.vocabulary_entries:
            return COCO_TASKS
        return TaskVocabulary(self.vocabulary_entries, name=self.vocabulary_name,
                              source=self.vocabulary or "data.vocabulary_entries")

    def annotation_path(self, task_id: int, split: str) -> Path:
        return Path(self.root) / "annotations" / f"task_{task_id}_{split}.json"

    def image_dir(self, split: str) -> Path:
        if split not in self.image_dirs:
            raise ValueError(f"image_dirs: no image folder configured for split {split!r} "
                             f"(known: {sorted(self.image_dirs)})")
        return Path(self.root) / self.image_dirs[split]

    def input_size(self) -> InputSize:
        """The evaluation resize rule, the size a model trained on this data expects."""
        return InputSize(short_side=self.test_size, max_size=max(self.max_size, self.test_size))

    def transform_kwargs(self) -> dict:
        return dict(train_sizes=self.train_sizes, max_size=self.max_size,
                    crop_resize_sizes=self.crop_resize_sizes, crop_min_size=self.crop_min_size,
                    crop_max_size=self.crop_max_size, test_size=self.test_size)
