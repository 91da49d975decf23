"""The 14 COCO-Tasks tasks and how a task request becomes a caption.

The verb phrases are the reference's ``TasksAbbreviation`` list, including the trailing
space: the pronoun caption is ``phrase + pronoun`` ("sit comfortably on something") and
the noun caption of the teacher is ``phrase + noun`` ("sit comfortably on chair").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

NUM_TASKS = 14
DEFAULT_PRONOUN = "something"
QUOTE_LIMIT = 80              # characters of a request echoed in an error message

# An integer-looking request ("2", "-1", "+15", "task_3", "Task 3") is a task id and must be valid;
# it is never read as free text (a robot that sends "-1" or "15" by mistake gets an error, not a
# caption "-1" that the model answers confidently).
_ID_PATTERN = re.compile(r"(?:task[_ ]?)?([+-]?\d+)", re.IGNORECASE)

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
    """Turn a task request into the caption the model reads: the one parsing rule of the API,
    the CLI, the node's parameter, topic and service.

    Accepted forms:
      * an id ``2`` or an integer-looking string ``"2"`` (also ``"task_2"``, ``"Task 2"``); an
        integer outside 1..14 (``"0"``, ``"-1"``, ``"15"``) is an error, never free text,
      * a task name: the verb phrase (``"sit comfortably on"``) or the full caption
        (``"sit comfortably on something"``), case- and whitespace-insensitive,
      * any other non-empty text, used verbatim as the caption (no task id).

    Errors quote at most :data:`QUOTE_LIMIT` characters of the request.
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
    number = _ID_PATTERN.fullmatch(text)
    if number:
        task_id = int(number.group(1))
        if task_id not in TASK_PHRASES:
            raise ValueError(f"task {quote(text)} looks like a task id but COCO-Tasks ids are 1..{NUM_TASKS}")
        return resolve_task(task_id, pronoun)
    wanted = _normalise(text)
    for task_id, phrase in TASK_PHRASES.items():
        caption = phrase + pronoun
        if wanted in (_normalise(phrase), _normalise(caption)):
            return TaskQuery(caption, task_id, _span(caption, pronoun))
    span = _span(text, pronoun) if pronoun in text else None
    return TaskQuery(text, None, span)


def quote(text: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr`` of a request for a message, cut to ``limit`` characters (a 2,000-character
    caption should not fill a log line or a service answer)."""
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def _span(caption: str, word: str) -> tuple[int, int]:
    begin = caption.rfind(word)
    return (begin, begin + len(word))
