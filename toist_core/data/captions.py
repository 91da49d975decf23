"""Pronoun and noun captions of a COCO-Tasks sample and the character spans of its boxes.

* Pronoun caption (student / plain TOIST): ``phrase + pronoun``, e.g.
  ``"sit comfortably on something"``. As in the reference, every box is tied to the **whole**
  caption (``tokens_positive = [[(0, len(caption))]]``); the noun span is the pronoun.
* Grounding caption (MDETR-style pre-training, not in the reference's TOIST stages): the names
  of *every* object class in the image joined with ``". "``, e.g. ``"chair. bottle. knife"``;
  every object is a target, tied to its class name.
* Noun caption (teacher): one ``phrase + name`` part per preferred COCO class of the image,
  joined with a single space, e.g. ``"sit comfortably on chair sit comfortably on couch"``.
  A box is tied to its own part; its noun span is the class name *inside that part*.

Two deliberate differences from the reference (``datasets/tdod.py``), see docs/data.md:
the parts are ordered by COCO category id (the reference de-duplicates with ``set()``, whose
order changes between processes), and spans are located on word boundaries inside the box's
own part (the reference uses ``caption.find(name)``, which finds "car" inside "carpet" for
task 14 and the verb phrase's "bottle" for task 8).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from toist_core.data.schema import DataError, is_unicode
from toist_core.tasks import COCO_TASKS, DEFAULT_PRONOUN, TaskVocabulary

Span = tuple[int, int]  # [begin, end) character offsets into the caption

_ID2NAME_FILE = Path(__file__).with_name("coco_id2name.json")

# Top-level field of a task file naming its own object classes, ``[{"id", "name"}, ...]`` for the
# ids of ``COCO_category_id`` (``toist convert-coco`` writes it). Not ``categories``: in a
# COCO-Tasks file that list describes ``category_id`` (0 = non_preferred, 1 = preferred).
OWN_CATEGORIES_FIELD = "COCO_categories"


@dataclass(frozen=True)
class CaptionTargets:
    """A caption and, per target box, its positive character spans."""

    caption: str
    tokens_positive: list[list[Span]]       # per box: the spans its query must point at
    noun_tokens_positive: list[list[Span]]  # per box: the noun (or pronoun) span
    # A pronoun caption's pronoun (the task's own where its vocabulary entry has one), which
    # the distillation's cluster loss and CCR must find; "" for other captions.
    pronoun: str = ""


@lru_cache(maxsize=1)
def coco_id2name() -> dict[int, str]:
    """COCO category id -> class name (the reference's ``data/id2name.json``)."""
    raw = json.loads(_ID2NAME_FILE.read_text())
    return {int(k): v for k, v in raw.items()}


def category_names(categories: Any, where: str) -> dict[int, str]:
    """A COCO categories list ``[{"id": int, "name": str, ...}, ...]`` -> ``{id: name}``.

    ``where`` names the list in errors (e.g. ``"x.json: field 'COCO_categories'"``); a
    :class:`DataError` names the record (position and id) and the field.
    """
    if not isinstance(categories, list):
        raise DataError(f"{where}: expected a list of {{id, name}} records, got {type(categories).__name__}")
    names: dict[int, str] = {}
    for index, rec in enumerate(categories):
        at = f"{where}[{index}]"
        if not isinstance(rec, dict):
            raise DataError(f"{at}: expected an object with 'id' and 'name', got {rec!r}")
        cat_id, name = rec.get("id"), rec.get("name")
        if type(cat_id) is not int:
            raise DataError(f"{at}: field 'id': expected an integer, got {cat_id!r}")
        at = f"{at} (id {cat_id})"
        if type(name) is not str or not name.strip() or not is_unicode(name):
            raise DataError(f"{at}: field 'name': expected a non-empty string of characters (no lone surrogate "
                            f"escape), got {name!r}")
        if cat_id in names:
            raise DataError(f"{at}: duplicate category id (already named {names[cat_id]!r})")
        names[cat_id] = name
    return names


def find_word(text: str, word: str, start: int = 0) -> int:
    """Index of the first occurrence of ``word`` at or after ``start`` that is a whole word
    sequence (not preceded or followed by a letter, digit or underscore), or -1.

    ``find_word("pound carpet with car", "car") == 18`` where ``str.find`` gives 6.
    """
    if not word:
        raise ValueError("cannot search for an empty word")
    match = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)").search(text, start)
    return -1 if match is None else match.start()


def pronoun_targets(task_id: int, num_boxes: int, pronoun: str = DEFAULT_PRONOUN,
                    vocabulary: Optional[TaskVocabulary] = None) -> CaptionTargets:
    """Caption ``phrase + pronoun`` (the task's own pronoun where ``vocabulary`` gives one);
    every box is positive on the whole caption (reference behaviour)."""
    if not pronoun:
        raise ValueError("the pronoun must be a non-empty word")
    vocabulary = vocabulary or COCO_TASKS
    phrase = vocabulary.phrase(task_id)
    caption = phrase + vocabulary.pronoun_of(task_id, pronoun)
    whole = [(0, len(caption))]
    pronoun_span = [(len(phrase), len(caption))]  # the appended word, wherever else it may occur
    return CaptionTargets(caption, [list(whole) for _ in range(num_boxes)],
                          [list(pronoun_span) for _ in range(num_boxes)], pronoun=caption[len(phrase):])


def noun_caption(task_id: int, names: Sequence[str],
                 vocabulary: Optional[TaskVocabulary] = None) -> tuple[str, dict[str, tuple[Span, Span]]]:
    """Join ``phrase + name`` for each distinct name (in the given order) with single spaces.

    Returns the caption and, per name, ``(part_span, noun_span)``: the span of its
    ``phrase + name`` part, found on word boundaries from where the previous part ended, and
    the span of the name inside that part. No names -> the empty caption.
    """
    phrase = (vocabulary or COCO_TASKS).phrase(task_id)
    unique: list[str] = []
    for name in names:
        if not name:
            raise ValueError(f"empty class name in {list(names)!r}")
        if name not in unique:
            unique.append(name)
    caption = " ".join(phrase + name for name in unique)
    spans: dict[str, tuple[Span, Span]] = {}
    cursor = 0
    for name in unique:
        part = phrase + name
        begin = find_word(caption, part, cursor)
        if begin < 0:  # cannot happen for a caption built here; guards future edits
            raise AssertionError(f"part {part!r} not found in {caption!r}")
        end = begin + len(part)
        spans[name] = ((begin, end), (begin + len(phrase), end))
        cursor = end
    return caption, spans


def noun_targets(task_id: int, box_category_ids: Sequence[int],
                 id2name: Optional[Mapping[int, str]] = None,
                 vocabulary: Optional[TaskVocabulary] = None,
                 caption_category_ids: Optional[Sequence[int]] = None) -> CaptionTargets:
    """Teacher caption for boxes of the given COCO classes.

    ``caption_category_ids`` are the classes the caption names (default: the boxes'); the
    reference names every preferred object of the image, crowd objects and empty or outside
    boxes included, before it drops those boxes (:func:`~toist_core.data.coco_tasks.noun_caption_classes`).
    Parts are ordered by COCO category id (deterministic); each box points at the part of its
    class (``tokens_positive``) and at the class name inside it (``noun_tokens_positive``).
    Images without named classes get the empty caption, as in the reference.
    """
    id2name = coco_id2name() if id2name is None else id2name
    named = list(box_category_ids) if caption_category_ids is None else list(caption_category_ids)
    for cat in [*box_category_ids, *named]:
        if cat not in id2name:
            raise KeyError(f"COCO category id {cat} has no name in the id -> name table")
    unnamed = sorted(set(box_category_ids) - set(named))
    if unnamed:
        raise ValueError(f"boxes of COCO category ids {unnamed} are not named by the caption's classes {named}")
    ordered_names = [id2name[cat] for cat in sorted(set(named))]
    caption, spans = noun_caption(task_id, ordered_names, vocabulary)
    tokens_positive = [[spans[id2name[cat]][0]] for cat in box_category_ids]
    noun_positive = [[spans[id2name[cat]][1]] for cat in box_category_ids]
    return CaptionTargets(caption, tokens_positive, noun_positive)


GROUNDING_SEPARATOR = ". "


def grounding_targets(box_category_ids: Sequence[int], id2name: Optional[Mapping[int, str]] = None) -> CaptionTargets:
    """Caption naming every object class of an image (ordered by COCO category id, each name
    once: two ids of one name, as an own ``COCO_categories`` list may have, share its part, as
    the noun caption's do), each box positive on its class name: the phrase-grounding task MDETR
    is pre-trained on, which the teacher and the student then start from."""
    id2name = coco_id2name() if id2name is None else id2name
    for cat in box_category_ids:
        if cat not in id2name:
            raise KeyError(f"COCO category id {cat} has no name in the id -> name table")
    spans: dict[int, Span] = {}
    by_name: dict[str, Span] = {}
    parts: list[str] = []
    cursor = 0
    for cat in sorted(set(box_category_ids)):
        name = id2name[cat]
        if name not in by_name:
            if parts:
                cursor += len(GROUNDING_SEPARATOR)
            by_name[name] = (cursor, cursor + len(name))
            parts.append(name)
            cursor += len(name)
        spans[cat] = by_name[name]
    caption = GROUNDING_SEPARATOR.join(parts)
    positive = [[spans[cat]] for cat in box_category_ids]
    return CaptionTargets(caption, positive, [list(p) for p in positive])
