"""Tasks as data: a task vocabulary (id -> verb phrase, pronoun) and how a request becomes a caption.

A vocabulary is a YAML file (``tasks: [{id, phrase, pronoun?}, ...]``, ids 1..N in order); the 14
COCO-Tasks tasks are the default one, shipped as ``assets/tasks/coco_tasks.yaml``, and their
phrases are the reference's ``TasksAbbreviation`` list. The pronoun caption is ``phrase + " " +
pronoun`` ("sit comfortably on something"), the noun caption of the teacher ``phrase + " " +
noun`` ("sit comfortably on chair"). Training, evaluation, export and inference all read the
vocabulary they are given (a model directory records its own); the memory bank has one slot per
task, task id k in slot k - 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .typed_config import read_yaml


DEFAULT_PRONOUN = "something"
QUOTE_LIMIT = 80              # characters of a request echoed in an error message
DEFAULT_VOCABULARY_FILE = Path(__file__).with_name("assets") / "tasks" / "coco_tasks.yaml"
# Keys of a vocabulary entry that other tools read (``toist convert-coco``): accepted, not used here.
_OTHER_ENTRY_KEYS = frozenset({"preferred_categories", "preferred_instances"})

# An integer-looking request ("2", "-1", "+15", "task_3", "Task 3") is a task id and must be valid;
# it is never read as free text (a robot that sends "-1" or "15" by mistake gets an error, not a
# caption "-1" that the model answers confidently).
_ID_PATTERN = re.compile(r"(?:task[_ -]?)?([+-]?\d+)", re.IGNORECASE)
# Any other number ("3.0", "2e0", ".5") is refused too: never a caption, never rounded to an id.
_NUMBER_PATTERN = re.compile(r"(?:task[_ -]?)?[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?", re.IGNORECASE)


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _id_of(number: re.Match) -> Optional[int]:
    """The id of an :data:`_ID_PATTERN` match ("task_000...02" is 2); None for more digits than
    any id has (``int()`` of 4,301 digits or more raised Python's own message)."""
    digits = number.group(1).lstrip("+-").lstrip("0") or "0"
    if len(digits) > 9:
        return None
    return -int(digits) if number.group(1).startswith("-") else int(digits)


def pronoun_problem(pronoun: object) -> str:
    """What is wrong with ``pronoun`` as the word a caption ends with ("" when nothing): a space
    or newline around it (a YAML or ROS value with a stray space) was kept in every caption, as
    tokens of its own, and moved every score without a word."""
    if not isinstance(pronoun, str) or not pronoun.strip():
        return "expected a word"
    if pronoun != pronoun.strip():
        return "expected a word without spaces or newlines around it"
    return ""


@dataclass(frozen=True)
class TaskEntry:
    """One task of a vocabulary: ``id`` (1-based), its verb ``phrase`` (no trailing space) and,
    if it has one of its own, the ``pronoun`` its caption ends with ("" = the caller's)."""

    id: int
    phrase: str
    pronoun: str = ""


class TaskVocabulary:
    """The tasks a model knows, ids 1..N in order (id k uses memory-bank slot k - 1)."""

    def __init__(self, entries: Sequence[TaskEntry], name: str = "", source: str = "") -> None:
        self.name = name
        self.source = source or name or "task vocabulary"
        self.entries = tuple(entries)
        where = self.source
        if not self.entries:
            raise ValueError(f"{where}: a task vocabulary needs at least one task")
        for position, entry in enumerate(self.entries):
            at = f"{where}: tasks[{position}]"
            if isinstance(entry.id, bool) or not isinstance(entry.id, int):
                raise ValueError(f"{at}: id: expected an integer, got {entry.id!r}")
            if entry.id != position + 1:
                raise ValueError(f"{at}: id: expected {position + 1} (ids are 1..N in order: task k uses memory-bank "
                                 f"slot k - 1), got {entry.id}")
            if not isinstance(entry.phrase, str) or not entry.phrase.strip():
                raise ValueError(f"{at} (id {entry.id}): phrase: expected a non-empty verb phrase, got "
                                 f"{entry.phrase!r}")
            if not isinstance(entry.pronoun, str) or (entry.pronoun and not entry.pronoun.strip()):
                raise ValueError(f"{at} (id {entry.id}): pronoun: expected a word, got {entry.pronoun!r}")
        seen: dict[str, int] = {}
        for entry in self.entries:
            key = _normalise(entry.phrase)
            if key in seen:
                raise ValueError(f"{where}: tasks {seen[key]} and {entry.id} have the same phrase {entry.phrase!r}")
            seen[key] = entry.id
        self._by_id = {entry.id: entry for entry in self.entries}

    def request_problem(self, pronoun: str = DEFAULT_PRONOUN) -> str:
        """Why some task could not be requested by its phrase or caption (:func:`resolve_task`)
        with ``pronoun`` (the model's; a task's own wins), "" when each names one task and reads
        as text. Checked where a vocabulary is taken up for training (and by the converter), not
        when a trained model's recorded one is read: a model trained on it still serves its ids.
        Accepted before: "sit on" beside "sit on something" (task 2's caption asked for task 1),
        "lean on something" (caption "lean on something something"), a phrase "2" (read as id 2)."""
        names: dict[str, tuple[int, str]] = {}
        where = self.name or self.source
        for entry in self.entries:
            if entry.pronoun and pronoun_problem(entry.pronoun):
                # (kept as tokens of their own in every caption of the task)
                return (f"{where}: task {entry.id}: pronoun {entry.pronoun!r}: {pronoun_problem(entry.pronoun)}")
            phrase, own = entry.phrase.strip(), self.pronoun_of(entry.id, pronoun).strip()
            caption = self.pronoun_caption(entry.id, pronoun).strip()
            if _NUMBER_PATTERN.fullmatch(phrase):
                return (f"{where}: task {entry.id}: phrase {entry.phrase!r} reads as a number: a request for it "
                        "would be taken as a task id; write the verb phrase")
            if _normalise(phrase) == _normalise(own) or _normalise(phrase).endswith(" " + _normalise(own)):
                return (f"{where}: task {entry.id}: phrase {entry.phrase!r} ends with its pronoun {own!r}, which "
                        f"the caption adds ({caption!r}); write the phrase without it")
            for kind, text in (("phrase", phrase), ("caption", caption)):
                other = names.setdefault(_normalise(text), (entry.id, kind))
                if other[0] != entry.id:
                    return (f"{where}: the {other[1]} of task {other[0]} and the {kind} of task {entry.id} are both "
                            f"{text!r}: a request by that text could not tell the two apart")
        return ""

    # --- construction ----------------------------------------------------------------------

    @classmethod
    def from_data(cls, data: Any, source: str = "task vocabulary") -> "TaskVocabulary":
        """From plain data: ``{"name": ..., "tasks": [{"id", "phrase", "pronoun"?}, ...]}`` or the list alone."""
        name = ""
        if isinstance(data, dict):
            unknown = set(data) - {"name", "tasks"}
            if unknown:
                raise ValueError(f"{source}: unknown key(s) {sorted(unknown)}; expected 'name' and 'tasks'")
            name = data.get("name", "") or ""
            if isinstance(name, (dict, list)):
                raise ValueError(f"{source}: name: expected text, got a {type(name).__name__}")
            name = str(name)
            data = data.get("tasks")
        if not isinstance(data, list):
            raise ValueError(f"{source}: tasks: expected a list of {{id, phrase, pronoun}} entries, got "
                             f"{type(data).__name__}")
        entries = []
        for position, item in enumerate(data):
            at = f"{source}: tasks[{position}]"
            if not isinstance(item, dict):
                raise ValueError(f"{at}: expected a mapping with id and phrase, got {item!r}")
            unknown = set(item) - {"id", "phrase", "pronoun"} - _OTHER_ENTRY_KEYS
            if unknown:
                raise ValueError(f"{at}: unknown key(s) {sorted(unknown)}; expected id, phrase, pronoun")
            for key in ("id", "phrase"):
                if key not in item:
                    raise ValueError(f"{at}: missing {key!r}")
            phrase = item["phrase"]
            entries.append(TaskEntry(item["id"], phrase.strip() if isinstance(phrase, str) else phrase,
                                     item.get("pronoun", "") or ""))
        return cls(entries, name=name, source=source)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "TaskVocabulary":
        """Read a vocabulary YAML file; errors name the file, the entry and the field."""
        return cls.from_data(read_yaml(path, "task vocabulary file"), source=str(path))

    def to_data(self) -> dict:
        """Plain data for YAML (a model directory's ``config.yaml`` records it)."""
        tasks = []
        for entry in self.entries:
            item: dict[str, Any] = {"id": entry.id, "phrase": entry.phrase}
            if entry.pronoun:
                item["pronoun"] = entry.pronoun
            tasks.append(item)
        return {"name": self.name, "tasks": tasks}

    # --- queries ---------------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        return len(self.entries)

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(entry.id for entry in self.entries)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._by_id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskVocabulary) and self.entries == other.entries

    def __hash__(self) -> int:
        return hash(self.entries)

    def __repr__(self) -> str:
        return f"TaskVocabulary({self.name or self.source!r}, {self.num_tasks} tasks)"

    def entry(self, task_id: int) -> TaskEntry:
        if isinstance(task_id, bool) or task_id not in self._by_id:
            raise ValueError(f"unknown task id {task_id!r}: {self.describe()} has ids 1..{self.num_tasks}")
        return self._by_id[task_id]

    def phrase(self, task_id: int) -> str:
        """The verb phrase of a task, with the trailing space the captions join on."""
        return self.entry(task_id).phrase + " "

    def pronoun_caption(self, task_id: int, pronoun: str = DEFAULT_PRONOUN) -> str:
        """``"sit comfortably on something"``: the student's (and plain model's) caption."""
        return self.phrase(task_id) + self.pronoun_of(task_id, pronoun)

    def pronoun_of(self, task_id: int, pronoun: str = DEFAULT_PRONOUN) -> str:
        """The task's own pronoun, else ``pronoun``."""
        return self.entry(task_id).pronoun or pronoun

    def describe(self) -> str:
        return "the COCO-Tasks vocabulary" if self == COCO_TASKS else f"task vocabulary {self.name or self.source!r}"


COCO_TASKS = TaskVocabulary.load(DEFAULT_VOCABULARY_FILE)
NUM_TASKS = COCO_TASKS.num_tasks
# Task id -> verb phrase with its trailing space, as the reference's list has it.
TASK_PHRASES: dict[int, str] = {entry.id: entry.phrase + " " for entry in COCO_TASKS.entries}


def load_vocabulary(path: Union[str, Path, None]) -> TaskVocabulary:
    """The vocabulary in ``path``; the COCO-Tasks one for None or ""."""
    return COCO_TASKS if not path else TaskVocabulary.load(path)


def pronoun_caption(task_id: int, pronoun: str = DEFAULT_PRONOUN,
                    vocabulary: Optional[TaskVocabulary] = None) -> str:
    """``"sit comfortably on something"`` for task 2: the student's (and plain model's) caption."""
    return (vocabulary or COCO_TASKS).pronoun_caption(task_id, pronoun)


def task_phrase(task_id: int, vocabulary: Optional[TaskVocabulary] = None) -> str:
    """The verb phrase of a task id (with its trailing space)."""
    return (vocabulary or COCO_TASKS).phrase(task_id)


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
        """Whether it is a task of the vocabulary (kept name: COCO-Tasks was the only one)."""
        return self.task_id is not None


def resolve_task(task: Union[int, str], pronoun: str = DEFAULT_PRONOUN,
                 vocabulary: Optional[TaskVocabulary] = None) -> TaskQuery:
    """Turn a task request into the caption the model reads: the one parsing rule of the API,
    the CLI, the node's parameter, topic and service.

    Accepted forms (``vocabulary``: the model's, default COCO-Tasks):
      * an id ``2`` or an integer-looking string ``"2"`` (also ``"task_2"``, ``"Task 2"``); an
        integer outside the vocabulary's 1..N (``"0"``, ``"-1"``, ``"15"``) is an error, never free text,
      * a task name: the verb phrase (``"sit comfortably on"``) or the full caption
        (``"sit comfortably on something"``, or with the ``pronoun`` the model reads),
        case- and whitespace-insensitive,
      * any other non-empty text, used verbatim as the caption (no task id).

    Errors quote at most :data:`QUOTE_LIMIT` characters of the request.
    """
    vocabulary = vocabulary or COCO_TASKS
    if isinstance(task, bool):
        raise TypeError("task must be an int id or a string, not bool")
    if isinstance(task, Integral):  # numpy's integers too (an id read from an array)
        task = int(task)
        caption = vocabulary.pronoun_caption(task, pronoun)
        return TaskQuery(caption, task, _span(caption, vocabulary.pronoun_of(task, pronoun)))
    if not isinstance(task, str):
        raise TypeError(f"task must be an int id or a string, got {type(task).__name__}")
    text = task.strip()
    if not any(character.isprintable() and not character.isspace() for character in text):
        # (a zero-width space, a NUL: nothing the model could read as a task)
        raise ValueError("task text is empty" + (f" (only invisible characters: {text!r})" if text else ""))
    number = _ID_PATTERN.fullmatch(text)
    if number:
        task_id = _id_of(number)
        if task_id is None or task_id not in vocabulary:
            raise ValueError(f"task {quote(text)} looks like a task id but {vocabulary.describe()} has ids "
                             f"1..{vocabulary.num_tasks}")
        return resolve_task(task_id, pronoun, vocabulary)
    if _NUMBER_PATTERN.fullmatch(text):
        raise ValueError(f"task {quote(text)} is a number but not a task id: ids are the integers "
                         f"1..{vocabulary.num_tasks} of {vocabulary.describe()}")
    wanted = _normalise(text)
    for entry in vocabulary.entries:
        caption = vocabulary.pronoun_caption(entry.id, pronoun)
        # The phrase with the generic pronoun, as the COCO-Tasks tables list a task ("... something"),
        # names the task whatever pronoun this model or entry reads (with pronoun "it" it was free
        # text, without CCR); names_task reads it the same way.
        listed = vocabulary.phrase(entry.id) + DEFAULT_PRONOUN
        if wanted in (_normalise(entry.phrase), _normalise(caption), _normalise(listed)):
            return TaskQuery(caption, entry.id, _span(caption, vocabulary.pronoun_of(entry.id, pronoun)))
    span = _span(text, pronoun) if pronoun in text else None
    return TaskQuery(text, None, span)


def names_task(text: str, task_id: int, caption: str) -> bool:
    """Whether the request ``text`` names the task of id ``task_id`` (0: free text) and ``caption``
    as :func:`resolve_task` reads it: its id ("2", "task_2", "Task 2", "02"), its caption or its
    phrase (the caption less its pronoun), case and spacing aside. For a client that watches
    ``active_task`` without the node's vocabulary."""
    number = _ID_PATTERN.fullmatch(text.strip())
    if number:
        return task_id > 0 and _id_of(number) == task_id
    wanted = _normalise(text)
    phrase = caption.rsplit(" ", 1)[0]
    return wanted in (_normalise(caption), _normalise(phrase)) or (
        task_id > 0 and wanted == _normalise(f"{phrase} {DEFAULT_PRONOUN}"))   # as resolve_task: the listed caption


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
