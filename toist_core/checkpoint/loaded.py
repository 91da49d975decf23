"""What loading a checkpoint gives: the model and everything that came with it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from ..config import InputSize, ModelConfig
from ..tasks import COCO_TASKS, TaskVocabulary


@dataclass
class LoadedModel:
    """A model ready for inference and what came with it.

    tasks: the task ids it was trained on (None: not recorded, e.g. a version-2 directory).
    vocabulary: what its task ids mean (COCO-Tasks for official files and older directories).
    captions: what it was trained to read: ``"pronoun"`` (the task's caption, "sit comfortably on
    something") or ``"noun"`` (each image's own noun caption: a noun teacher, a grounding run;
    recorded by toist training checkpoints, official files and model directories exported from
    either; older directories: pronoun).
    """

    model: nn.Module
    config: ModelConfig
    memory_bank: Optional[nn.Module] = None
    pronoun: str = "something"
    source: str = ""
    input_size: InputSize = field(default_factory=InputSize)
    tasks: Optional[tuple[int, ...]] = None
    vocabulary: TaskVocabulary = COCO_TASKS
    captions: str = "pronoun"


def describe_heads(config: ModelConfig) -> str:
    """Detection-only or with the mask head, for log lines."""
    return "segmentation (mask head)" if config.masks else "detection only (no mask head)"


def describe_bank(memory_bank: Optional[nn.Module]) -> str:
    """Distilled (memory bank: tasks, entries, cluster centres) or not, for log lines."""
    if memory_bank is None:
        return "not distilled (no memory bank)"
    slots = getattr(memory_bank, "num_tasks", "?")
    size = getattr(memory_bank, "size", "?")
    clusters = getattr(memory_bank, "num_clusters", "?")
    shape = f"{size} features each, K={clusters} cluster centres"
    # A slot no training update reached still holds its random start: say which slots are real,
    # so that a model trained on 4 tasks is not announced as one with a bank for 14.
    counts = getattr(memory_bank, "update_count", None)
    filled = None if counts is None else [index + 1 for index, count in enumerate(counts.tolist()) if count > 0]
    if filled is None or len(filled) == len(counts):
        return f"distilled: memory bank for {slots} tasks ({shape})"
    if not filled:
        return f"distilled: memory bank of {slots} task slots, none ever filled ({shape})"
    return (f"distilled: memory bank for {len(filled)} of its {slots} task slots "
            f"(tasks {', '.join(map(str, filled))}; {shape})")
