"""The 14 COCO-Tasks tasks and how a task request becomes a caption.

The verb phrases are the reference's ``TasksAbbreviation`` list, including the trailing
space: the pronoun caption is ``phrase + pronoun`` ("sit comfortably on something") and
the noun caption of the teacher is ``phrase + noun`` ("sit comfortably on chair").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

NUM_TASKS = 14
DEFAULT_PRONOUN = "something"

# Task id (1-based, as in the file names task_{k}_{split}.json) -> verb phrase.
TASK_PHRASES: dict[int, str] = {
    1: "step on ",
    2: "sit comfortably on ",
    3: "place flowers in ",
    4: "get potatoes out of fire with ",
    5: "water plant with ",
    6: "get lemon out of tea with ",
    7: "dig hole with ",
    8: "open bottle of beer with ",
    9: "open parcel with ",
    10: "serve wine with ",
    11: "pour sugar with ",
    12: "smear butter with ",
    13: "extinguish fire with ",
    14: "pound carpet with ",
}


def pronoun_caption(task_id: int, pronoun: str = DEFAULT_PRONOUN) -> str:
    """``"sit comfortably on something"`` for task 2: the student's (and plain model's) caption."""
    return task_phrase(task_id) + pronoun


def task_phrase(task_id: int) -> str:
    """The verb phrase of a task id in 1..14 (with its trailing space)."""
    if task_id not in TASK_PHRASES:
        raise ValueError(f"unknown COCO-Tasks task id {task_id!r}: expected an integer in 1..{NUM_TASKS}")
    return TASK_PHRASES[task_id]


@dataclass(frozen=True)
class TaskQuery:
    """What a task request resolved to.

    ``task_id`` is None for free text: such a caption has no memory bank, so distilled
    models run it without cluster-centre replacement.
    """

    caption: str
    task_id: Optional[int]
    pronoun_span: Optional[tuple[int, int]]  # character span [begin, end) of the pronoun

    @property
    def is_coco_task(self) -> bool:
        return self.task_id is not None


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def resolve_task(task: Union[int, str], pronoun: str = DEFAULT_PRONOUN) -> TaskQuery:
    """Turn a task request into the caption the model reads.

    Accepted forms:
      * an id ``2`` or ``"2"`` (also ``"task_2"``),
      * a task name: the verb phrase (``"sit comfortably on"``) or the full caption
        (``"sit comfortably on something"``), case- and whitespace-insensitive,
      * any other non-empty text, used verbatim as the caption (no task id).
    """
    if isinstance(task, bool):
        raise TypeError("task must be an int id or a string, not bool")
    if isinstance(task, int):
        caption = pronoun_caption(task, pronoun)
        return TaskQuery(caption, task, _span(caption, pronoun))
    if not isinstance(task, str):
        raise TypeError(f"task must be an int id or a string, got {type(task).__name__}")
    text = task.strip()
    if not text:
        raise ValueError("task text is empty")
    key = text.lower().removeprefix("task_").removeprefix("task ")
    if key.isdigit():
        return resolve_task(int(key), pronoun)
    wanted = _normalise(text)
    for task_id, phrase in TASK_PHRASES.items():
        caption = phrase + pronoun
        if wanted in (_normalise(phrase), _normalise(caption)):
            return TaskQuery(caption, task_id, _span(caption, pronoun))
    span = _span(text, pronoun) if pronoun in text else None
    return TaskQuery(text, None, span)


def _span(caption: str, word: str) -> tuple[int, int]:
    begin = caption.rfind(word)
    return (begin, begin + len(word))
