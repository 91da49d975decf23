"""Plain COCO instance-segmentation files -> COCO-Tasks files (``toist convert-coco``).

Input: the COCO file of one split (``images``; ``annotations`` with ``bbox``, ``segmentation``
(polygons or RLE; every annotation needs one, as COCO-Tasks' do: a detection-only file with
empty ``segmentation`` is refused, naming the annotation), ``area``, ``iscrowd``, ``category_id``; ``categories`` with ``id`` and
``name``) and a task specification YAML (the task vocabulary format; other keys such as
``phrase`` and ``pronoun`` are ignored here)::

    tasks:
      - id: 1                                   # positive int -> task_1_<split>.json
        preferred_categories: ["scissors", 44]  # category names of the COCO file, or ids
        preferred_instances: [1234]             # annotation ids preferred in addition (optional)
      - id: 2
        preferred_instances: {train: [4], test: [17]}   # ids per split: exports numbering from 1

Annotation ids of a list apply to every split converted; an export that numbers its ids from 1
(CVAT does, per export) gives the same id to other objects in other splits, so give such ids
per split (a split not named then prefers no single object).

Output, per task k: ``<out_root>/annotations/task_<k>_<split>.json`` listing every image of the
source (id, file_name, height, width) and every annotation (bbox, segmentation, area, iscrowd
carried over) with ``COCO_category_id`` = the source ``category_id`` and ``category_id`` = 1 if
the object is preferred for task k (its class is one of the task's categories, or its id one of
the task's instances), else 0. ``categories`` is the COCO-Tasks pair (0 non_preferred,
1 preferred), as in the real files, because that list describes ``category_id`` and the
evaluation's COCO ground truth reads it; the source's class list goes to ``COCO_categories``
(:data:`~toist_core.data.captions.OWN_CATEGORIES_FIELD`), where the dataset finds own class
names for noun captions.

Everything is checked before anything is written, so bad input leaves ``out_root`` untouched;
each file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import difflib
import filecmp
import json
import os
import posixpath
import re
import shutil
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Union

import yaml

from toist_core.atomic_file import atomic_write, write_text_atomic
from toist_core.listing import listing
from toist_core.yaml_text import parse_yaml
from toist_core.data.captions import OWN_CATEGORIES_FIELD, category_names
from toist_core.data.schema import (PREFERENCE_CATEGORIES, DataError, TaskFile, annotation_rle, check_decodable,
                                    check_image_size, clipped_box, is_unicode, parse_task_data, parse_task_file_name,
                                    read_json, task_file_path, written_by)

PathLike = Union[str, Path]
CategoryRef = Union[str, int]  # a category name or id, as written in the specification

_SPLIT = re.compile(r"^[A-Za-z0-9]+$")  # the <split> of task_<k>_<split>.json (schema's file-name rule)
_ANNOTATION_FIELDS = ("id", "image_id", "bbox", "segmentation", "area", "iscrowd")
# Keys of a task entry of the spec, which is also the task vocabulary (toist_core.tasks).
_SPEC_KEYS = frozenset({"id", "phrase", "pronoun", "preferred_categories", "preferred_instances"})
_LISTED = 12  # names or ids shown in an error message before "and N more"


@dataclass(frozen=True)
class TaskPreference:
    """One task of the specification: which objects of a COCO file it prefers.

    ``where`` names the entry in messages, e.g. ``"spec.yaml: tasks[0] (id 1)"``.
    """

    task_id: int
    categories: tuple[CategoryRef, ...]
    instances: frozenset[int]        # the list form's ids, or this split's (see :meth:`for_split`)
    where: str
    per_split: Optional[dict[str, frozenset[int]]] = None   # the mapping form: ids per split

    def for_split(self, split: str) -> "TaskPreference":
        """This task as it applies to ``split``: the ids of the list form, or the split's own."""
        if self.per_split is None:
            return self
        return replace(self, instances=self.per_split.get(split, frozenset()))


@dataclass(frozen=True)
class TaskSummary:
    """What one written task file holds."""

    task_id: int
    path: Path
    images: int
    annotations: int
    preferred: int              # objects with category_id 1
    images_with_preferred: int  # images with at least one of them


@dataclass
class ConversionSummary:
    """Result of :func:`convert_coco`: one entry per task, and what deserves a look."""

    source: Path
    split: str
    tasks: list[TaskSummary]
    warnings: list[str] = field(default_factory=list)
    image_dir: Optional[Path] = None  # where the images were copied to (``copy_images_from``)
    images_copied: int = 0


# ----------------------------------------------------------------------------- specification

def load_task_spec(path: PathLike) -> list[TaskPreference]:
    """Read the ``tasks`` of a specification YAML, in file order.

    Raises :class:`DataError` naming the file, the entry (position and id) and the key for a
    missing or ill-typed id, a duplicate id, or an entry without any preference.
    """
    path = Path(path)
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: task specification not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid YAML: {exc}") from None
    entries = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: expected a mapping with a non-empty list 'tasks' of "
                        f"{{id, preferred_categories, preferred_instances}} entries")
    tasks: list[TaskPreference] = []
    position_of: dict[int, int] = {}
    for index, item in enumerate(entries):
        task = _task_preference(path, index, item)
        if task.task_id in position_of:
            raise DataError(f"{task.where}: duplicate task id (also tasks[{position_of[task.task_id]}])")
        position_of[task.task_id] = index
        tasks.append(task)
    return tasks


def vocabulary_problem(path: PathLike) -> Optional[str]:
    """Why a specification with phrases would not load as the task vocabulary training reads
    (docs/own-data.md: one file for both; ids 1..N in order, a phrase per task), or None. A
    specification for COCO-Tasks ids with phrases kept for readability is fine to convert:
    a warning, not an error."""
    from toist_core.tasks import TaskVocabulary

    try:
        data = parse_yaml(Path(path).read_text(encoding="utf-8"))
        entries = data.get("tasks") if isinstance(data, dict) else None
        if not any(isinstance(item, dict) and "phrase" in item for item in entries or ()):
            return None
        problem = TaskVocabulary.load(path).request_problem()
        if problem:
            raise ValueError(problem)
    except (OSError, yaml.YAMLError, ValueError) as exc:
        return (f"{exc}: as a task vocabulary (data.vocabulary) training would refuse this file; fine if the "
                "ids are COCO-Tasks' and training uses COCO-Tasks' tasks")
    return None


def _task_preference(path: Path, index: int, item: Any) -> TaskPreference:
    where = f"{path}: tasks[{index}]"
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a mapping with 'id' and 'preferred_categories' / "
                        f"'preferred_instances', got {item!r}")
    task_id = item.get("id")
    if type(task_id) is not int or task_id <= 0:
        raise DataError(f"{where}: field 'id': expected a positive integer, got {task_id!r}")
    where = f"{where} (id {task_id})"
    unknown = sorted(set(item) - _SPEC_KEYS)
    if unknown:  # a misspelt preference would otherwise leave the task without it, silently
        raise DataError(f"{where}: unknown key(s) {unknown}; expected {', '.join(sorted(_SPEC_KEYS))}")
    categories = _list_field(where, item, "preferred_categories", "category names or ids",
                             lambda v: type(v) is int or (type(v) is str and v.strip() != ""))
    per_split = None
    if isinstance(item.get("preferred_instances"), dict):
        per_split = {}
        for split, ids in item["preferred_instances"].items():
            if type(split) is int and split >= 0:   # YAML reads `2017:` as a number
                split = str(split)
            if not isinstance(split, str) or not _SPLIT.match(split):
                raise DataError(f"{where}: field 'preferred_instances': keys are split names (letters and digits, "
                                f"as --split), got {split!r}")
            per_split[split] = frozenset(_list_field(f"{where}: field 'preferred_instances'", {split: ids}, split,
                                                     "annotation ids (integers)", lambda v: type(v) is int))
        instances = sorted(set().union(*per_split.values()))
    else:
        instances = _list_field(where, item, "preferred_instances", "annotation ids (integers)",
                                lambda v: type(v) is int)
    if not categories and not instances:
        raise DataError(f"{where}: no preference given: list 'preferred_categories' (category names or ids) "
                        f"and/or 'preferred_instances' (annotation ids, a list or per split)")
    return TaskPreference(task_id, tuple(categories), frozenset(instances), where, per_split)


def _list_field(where: str, item: dict, name: str, expected: str, check) -> list:
    values = item.get(name)
    if values is None:  # absent, or written as an empty YAML value
        return []
    if not isinstance(values, list):
        raise DataError(f"{where}: field {name!r}: expected a list of {expected}, got {values!r}")
    for k, value in enumerate(values):
        if not check(value):
            raise DataError(f"{where}: field {name!r}[{k}]: expected one of {expected}, got {value!r}")
    return values


# ----------------------------------------------------------------------------- source file

@dataclass
class _Source:
    """A checked COCO file: class names and the records of a task file (``category_id`` 0)."""

    path: Path
    names: dict[int, str]
    images: list[dict]
    annotations: list[dict]
    parsed: TaskFile


def _read_source(path: PathLike, split: str) -> _Source:
    """Read and check a plain COCO file; errors name the file, the record and the field."""
    path = Path(path)
    data = read_json(path, "COCO file")
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: field {key!r}: expected a list, got "
                            f"{'nothing' if key not in data else type(data[key]).__name__}")
    if not data["images"]:   # e.g. an annotation tool's export of a split no image was given to
        raise DataError(f"{path}: field 'images' is empty: no image to convert (a split without images?)")
    names = category_names(data["categories"], f"{path}: categories")
    images = [_image_record(path, i, rec) for i, rec in enumerate(data["images"])]
    annotations = [_annotation_record(path, i, rec, names) for i, rec in enumerate(data["annotations"])]
    # The records are now task-file records, so the schema's own checks apply (RLE sizes and
    # counts included); ``path`` names the source, whose list positions and ids the records keep.
    parsed = parse_task_data({"images": images, "annotations": annotations}, path, 0, split)
    _check_image_files(path, parsed)
    return _Source(path, names, images, annotations, parsed)


def _check_image_files(path: Path, parsed: TaskFile) -> None:
    """One record per image file, in a format training decodes: two records of one file gave
    one picture as two samples, each with half its objects labelled (the others as background)."""
    first: dict[str, int] = {}
    for index, image in enumerate(parsed.images):
        where = f"images[{index}] (id {image.id}), field 'file_name' in {path}"
        name = posixpath.normpath(_copied_name(image.file_name))   # "./a.png" is "a.png"
        if name in first:
            other = parsed.images[first[name]]
            raise DataError(f"{path}: images[{index}] (id {image.id}) and images[{first[name]}] (id {other.id}) "
                            f"have the same field 'file_name' {image.file_name!r}: one record per image file "
                            "(merge their annotations under one image id)")
        first[name] = index
        check_decodable(name, where)


def _where(path: Path, section: str, index: int, rec: Any) -> str:
    rec_id = rec.get("id") if isinstance(rec, dict) else None
    return f"{path}: {section}[{index}]" + (f" (id {rec_id})" if rec_id is not None else "")


def _image_record(path: Path, index: int, rec: Any) -> dict:
    if not isinstance(rec, dict):
        raise DataError(f"{_where(path, 'images', index, rec)}: expected an object, got {type(rec).__name__}")
    return {key: rec[key] for key in ("id", "file_name", "height", "width") if key in rec}


def _annotation_record(path: Path, index: int, rec: Any, names: dict[int, str]) -> dict:
    where = _where(path, "annotations", index, rec)
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
    if "category_id" not in rec:
        raise DataError(f"{where}: missing field 'category_id'")
    category = rec["category_id"]
    if type(category) is not int or category not in names:
        raise DataError(f"{where}: field 'category_id': {category!r} is not a category id of {path} "
                        f"(ids: {_listing(sorted(names))})")
    out = {key: rec[key] for key in _ANNOTATION_FIELDS if key in rec}
    out["COCO_category_id"] = category
    out["category_id"] = 0
    return out


def _listing(values: list) -> str:
    """Names quoted (a category name may hold a comma or spaces), in the package's wording."""
    return listing([repr(v) if isinstance(v, str) else v for v in values], _LISTED)


# ----------------------------------------------------------------------------- preferences

def _resolve_categories(task: TaskPreference, names: dict[int, str], source: PathLike) -> dict[CategoryRef, set[int]]:
    """Each category reference of ``task`` -> the category ids it means (a name can be shared).

    Raises :class:`DataError` for a name or id that is not a category of ``source``, with the
    closest name as a suggestion.
    """
    # Names compared in one Unicode form (NFC): "Café" typed on one system and exported on another
    # (NFD: "e" + a combining accent) looked the same and was refused, "did you mean 'Café'?".
    ids_of: dict[str, set[int]] = {}
    for cat_id, name in names.items():
        ids_of.setdefault(unicodedata.normalize("NFC", name), set()).add(cat_id)
    resolved: dict[CategoryRef, set[int]] = {}
    for ref in task.categories:
        if isinstance(ref, int):
            if ref not in names:
                raise DataError(f"{task.where}: preferred_categories: {ref} is not a category id of {source} "
                                f"(ids: {_listing(sorted(names))})")
            resolved[ref] = {ref}
        elif unicodedata.normalize("NFC", ref) in ids_of:
            resolved[ref] = ids_of[unicodedata.normalize("NFC", ref)]
        else:
            raise DataError(f"{task.where}: preferred_categories: {ref!r} is not a category of {source}"
                            f"{_suggestion(ref, sorted(ids_of))}")
    return resolved


def _suggestion(name: str, known: list[str]) -> str:
    by_case = {k.casefold(): k for k in known}
    close = by_case.get(name.casefold()) or next(iter(difflib.get_close_matches(name, known, n=1)), None)
    if close is not None:
        return f"; did you mean {close!r}?"
    hint = f"; its categories are {_listing(known)}" if known else "; it has no category at all"
    if name.strip().isdigit():
        hint += f" (write {name.strip()} without quotes for a category id)"
    return hint


# ----------------------------------------------------------------------------- conversion

# How the files convert-coco writes begin ("info" first, compact JSON): a re-run replaces them.
_OWN_INFO = "COCO-Tasks file written by toist convert-coco"
_OWN_FILE_START = ('{"info":"' + _OWN_INFO).encode()


def convert_coco(coco_file: PathLike, split: str, spec_file: PathLike, out_root: PathLike, *,
                 copy_images_from: Optional[PathLike] = None,
                 image_dir: Optional[PathLike] = None, overwrite: bool = False) -> ConversionSummary:
    """Write ``<out_root>/annotations/task_<k>_<split>.json`` for every task of ``spec_file``.

    Args:
        coco_file: the plain COCO file of ``split`` (e.g. ``instances_train.json``).
        split: the split name of the written files (letters and digits: ``train``, ``test``).
        spec_file: the task specification YAML (see the module docstring).
        out_root: the dataset root (``DataConfig.root``).
        copy_images_from: the folder the ``file_name`` of the images are relative to; when
            given, the images are copied to ``<out_root>/<image_dir>``. Without it, point
            ``DataConfig.image_dirs[split]`` at the images (an absolute path is fine).
        image_dir: the copy's folder relative to ``out_root`` (default ``images/<split>``); only
            with ``copy_images_from`` (:class:`ValueError` otherwise: nothing would be copied there).
        overwrite: replace task files that convert-coco did not write (the real COCO-Tasks
            files, ``toist synth``'s, hand-edited ones; its own are replaced in any case) and
            images at the copy's destination that are another picture than their source.

    Raises :class:`DataError` (nothing written) for a bad specification, a malformed COCO
    file or a specification that does not match it, and ``FileExistsError`` (nothing written)
    for task files of other origin or images of other content at the copy's destination
    without ``overwrite``.
    """
    if image_dir is not None and copy_images_from is None:
        # Nothing would go there, and the task files would not say where the images are: refused,
        # not ignored (a user who meant "my images are in X" would find nothing done).
        raise ValueError(f"image_dir (--image-dir) {image_dir!r} is where the images are copied to, so it needs "
                         "copy_images_from (--copy-images-from DIR); without copying, point the data "
                         f"configuration's image_dirs[{split!r}] at the folder that holds the images")
    if not isinstance(split, str) or not _SPLIT.match(split):
        raise DataError(f"split: expected letters and digits only (it becomes part of task_<k>_<split>.json), "
                        f"got {split!r}")
    tasks = [task.for_split(split) for task in load_task_spec(spec_file)]
    if not overwrite:
        _refuse_foreign_task_files(Path(out_root), [task.task_id for task in tasks], split)
    source = _read_source(coco_file, split)
    resolved = [_resolve_categories(task, source.names, source.path) for task in tasks]
    copies: list[tuple[Path, Path]] = []
    target_dir: Optional[Path] = None
    images = source.images
    if copy_images_from is not None:
        target_dir = Path(out_root) / (image_dir if image_dir is not None else f"images/{split}")
        copies = _image_copies(source, Path(copy_images_from), target_dir)
        # The written name is the copy's path, or the dataset would not find the copy.
        images = [{**rec, "file_name": _copied_name(rec["file_name"])} for rec in source.images]

    _check_destinations(Path(out_root), [task.task_id for task in tasks], split, copies)
    # Which destinations already hold their picture, each read once (a re-run copies nothing).
    copied_before = {dst: _same_file_content(src, dst) for src, dst in copies if dst.is_file()}
    if not overwrite:
        _refuse_other_images([dst for dst, same in copied_before.items() if not same])

    # The images first: a copy that fails leaves no task file naming images that are not there.
    summary = ConversionSummary(source.path, split, [], image_dir=target_dir)
    problem = vocabulary_problem(spec_file)
    if problem is not None:
        summary.warnings.append(problem)
    for src, dst in copies:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not copied_before.get(dst, False):
            _copy_atomic(src, dst)
            summary.images_copied += 1
    for task, refs in zip(tasks, resolved):
        summary.tasks.append(_write_task(source, images, task, refs, split, Path(out_root), summary.warnings))
    left = _earlier_task_files(Path(out_root), [task.task_id for task in tasks], split)
    if left:
        summary.warnings.append(f"{_listing(left)}: written by an earlier conversion for tasks {spec_file} no longer "
                                f"has; a run whose data.tasks names them reads them: delete them if they are gone")
    return summary


def _earlier_task_files(out_root: Path, task_ids: list[int], split: str) -> list[Path]:
    """convert-coco's own task files of ``split`` under ``out_root`` for tasks not in ``task_ids``
    (a re-run with fewer tasks left them, without a word)."""
    left = []
    for path in sorted((out_root / "annotations").glob(f"task_*_{split}.json")):
        try:
            task, file_split = parse_task_file_name(path)
        except DataError:   # not a task file name
            continue
        if file_split == split and task not in task_ids and written_by(path, _OWN_FILE_START):
            left.append(path)
    return left


def _check_destinations(out_root: Path, task_ids: list[int], split: str, copies: list[tuple[Path, Path]]) -> None:
    """DataError, before anything is written, for a file or folder in the way of what will be."""
    for path in [task_file_path(out_root, task_id, split) for task_id in task_ids]:
        if path.is_dir():
            raise DataError(f"{path}: a folder is where this task file goes; move it away")
        _refuse_file_above(path, "the task files' folder", "--out")
    for _, dst in copies:
        if dst.is_dir():
            raise DataError(f"{dst}: a folder is where this image is copied to (--copy-images-from); move it away")
        _refuse_file_above(dst, "the copied images' folder", "--copy-images-from, --image-dir")


def _refuse_file_above(path: Path, what: str, options: str) -> None:
    """DataError when the nearest existing folder above ``path`` is a file."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(f"{parent}: a file is where {what} goes ({options}); move it away")
            return


def _refuse_other_images(others: list[Path]) -> None:
    """``FileExistsError``, before anything is written, naming copy destinations that hold
    another picture: two exports each with a ``frame_000000.png`` copied to one folder gave one
    split the other's pixels under its own annotations, silently."""
    if others:
        raise FileExistsError(f"{listing(others)}: {len(others)} image(s) where this conversion copies its images hold other "
                              "pictures (another split's or export's of the same file name?); nothing was written. "
                              "Copy to another folder (--image-dir), or --overwrite to replace them")


def _same_file_content(a: Path, b: Path) -> bool:
    """Whether ``b`` is ``a`` or a copy of it: the same size, then the same bytes (size and time
    alone would take two same-size pictures saved in one second for one)."""
    if os.path.samefile(a, b):
        return True
    return a.stat().st_size == b.stat().st_size and filecmp.cmp(a, b, shallow=False)


def _refuse_foreign_task_files(out_root: Path, task_ids: list[int], split: str) -> None:
    """``FileExistsError`` naming the task files a conversion would replace that it did not write."""
    paths = [task_file_path(out_root, task_id, split) for task_id in task_ids]
    foreign = [path for path in paths if path.exists() and not written_by(path, _OWN_FILE_START)]
    if foreign:
        raise FileExistsError(f"{out_root}: would replace task files toist convert-coco did not write: "
                              f"{_listing(foreign)}; "
                              "choose another --out, or pass --overwrite (overwrite=True) to replace them")


def _write_task(source: _Source, images: list[dict], task: TaskPreference, refs: dict[CategoryRef, set[int]],
                split: str, out_root: Path, warnings: list[str]) -> TaskSummary:
    """Write one task file listing ``images`` (the source's records, named as written); append
    what deserves a look to ``warnings``."""
    category_ids = set().union(*refs.values()) if refs else set()
    annotations = []
    with_preferred: set[int] = set()
    for ann in source.annotations:
        preferred = ann["COCO_category_id"] in category_ids or ann["id"] in task.instances
        annotations.append({**ann, "category_id": int(preferred)})
        if preferred:
            with_preferred.add(ann["image_id"])
    path = task_file_path(out_root, task.task_id, split)
    _write_json_atomic(path, {
        "info": f"{_OWN_INFO} from {source.path.name} (task {task.task_id})",
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in PREFERENCE_CATEGORIES],
        OWN_CATEGORIES_FIELD: [{"id": cat_id, "name": name} for cat_id, name in source.names.items()],
    })
    num_preferred = sum(a["category_id"] for a in annotations)
    warnings.extend(_task_warnings(source, task, refs, num_preferred, path, split))
    warnings.extend(_skipped_preferred(source, task, category_ids))
    return TaskSummary(task.task_id, path, len(images), len(annotations), num_preferred,
                       len(with_preferred))


def _task_warnings(source: _Source, task: TaskPreference, refs: dict[CategoryRef, set[int]],
                   num_preferred: int, path: Path, split: str) -> list[str]:
    present = {ann["COCO_category_id"] for ann in source.annotations}
    out = []
    for ref, ids in refs.items():
        if not ids & present:
            label = f"{ref!r}" if isinstance(ref, str) else f"{source.names[ref]!r} (id {ref})"
            out.append(f"task {task.task_id}: preferred category {label} has no object in {source.path}")
    known = {ann["id"] for ann in source.annotations}
    missing = sorted(task.instances - known)
    if task.per_split is not None and split not in task.per_split:
        out.append(f"task {task.task_id}: preferred_instances names the splits {_listing(sorted(task.per_split))}, "
                   f"not {split!r}: no single object is preferred in {source.path} (a misspelt split name?)")
    if missing and task.per_split is not None:
        out.append(f"task {task.task_id}: preferred_instances of this split {_listing(missing)} are not annotations "
                   f"of {source.path}")
    elif missing:
        out.append(f"task {task.task_id}: preferred_instances {_listing(missing)} are not annotations of "
                   f"{source.path} (fine if they belong to another split; the ids of a list apply to every split: "
                   "if your exports number their ids each from 1, give them per split, {train: [...], test: [...]})")
    if num_preferred == 0:
        out.append(f"task {task.task_id}: no preferred object in {source.path}: every image of {path.name} "
                   f"is an image without a target")
    return out


def _skipped_preferred(source: _Source, task: TaskPreference, category_ids: set[int]) -> list[str]:
    """Preferred objects that training will not see as targets (what the dataset skips): crowd
    annotations, boxes empty once clipped to the image. CVAT's COCO export marks every mask
    annotation ``iscrowd: 1``, which left a task with no target at all, without a word. And
    targets whose box or mask is not what the evaluation and the mask head need: a ``bbox``
    past the image (training clips it, the evaluation scores against it as written: the exact
    visible box of such an object scored AP 0), one far from its own mask (``[x0, y0, x1, y1]``
    written as ``[x, y, w, h]``), an empty mask (a mask target of no pixel)."""
    from pycocotools import mask as mask_utils

    crowd, empty, past, astray, no_pixel = [], [], [], [], []
    sizes = {image.id: (image.height, image.width) for image in source.parsed.images}
    for image_id, records in source.parsed.annotations.items():
        height, width = sizes[image_id]
        for ann in records:
            if ann.coco_category_id not in category_ids and ann.id not in task.instances:
                continue
            if ann.iscrowd:
                crowd.append(ann.id)
                continue
            if clipped_box(ann, height, width) is None:
                empty.append(ann.id)
                continue
            x, y, w, h = ann.bbox
            rle = annotation_rle(ann, height, width, source.path)
            if x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
                past.append(ann.id)
            elif int(mask_utils.area(rle)) == 0:
                no_pixel.append(ann.id)
            elif _far_from(ann.bbox, [float(v) for v in mask_utils.toBbox(rle)]):
                astray.append(ann.id)
    out = []
    where = f"task {task.task_id}: {{}} preferred object(s) of {source.path}"
    if crowd:
        out.append(f"{where.format(len(crowd))} are crowd annotations "
                   f"(iscrowd 1: annotation ids {_listing(crowd)}), which training skips; if they are single objects "
                   "(CVAT exports every mask with iscrowd 1) set iscrowd to 0")
    if empty:
        out.append(f"{where.format(len(empty))} have a box that is "
                   f"empty inside the image (annotation ids {_listing(empty)}: 'bbox' width or height <= 0, or "
                   "outside the image), which training skips")
    if past:
        out.append(f"{where.format(len(past))} have a 'bbox' reaching past the image (annotation ids "
                   f"{_listing(past)}): training clips it, the evaluation scores against it as written, so even "
                   "the exact visible box of the object may count as missed; clip the boxes to the image")
    if astray:
        out.append(f"{where.format(len(astray))} have a 'bbox' far from their own mask (an edge more than 2 px and "
                   f"a quarter of the object off the mask's extent; annotation ids {_listing(astray)}): are the "
                   "boxes [x0, y0, x1, y1] rather than COCO's [x, y, width, height], or of other objects?")
    if no_pixel:
        out.append(f"{where.format(len(no_pixel))} have a mask that covers no pixel (annotation ids "
                   f"{_listing(no_pixel)}: a polygon or RLE too thin or without area): their mask targets are empty")
    return out


def _far_from(box: tuple, extent: list) -> bool:
    """Whether an edge of the ``[x, y, w, h]`` box is off the mask's extent by more than 2 px and
    a quarter of the object's size along that axis. COCO takes a box from the polygon's outline
    and the mask is drawn in whole pixels: a pixel apart on every edge is normal, and a box IoU
    test took most objects a few pixels across (or one thick) for wrong boxes."""
    x, y, w, h = box
    mx, my, mw, mh = extent
    tolerance_x, tolerance_y = max(2.0, 0.25 * mw), max(2.0, 0.25 * mh)
    return (abs(x - mx) > tolerance_x or abs(x + w - (mx + mw)) > tolerance_x
            or abs(y - my) > tolerance_y or abs(y + h - (my + mh)) > tolerance_y)


def _image_copies(source: _Source, from_dir: Path, to_dir: Path) -> list[tuple[Path, Path]]:
    """(source, destination) per image; every source must exist (checked before writing)."""
    pairs = []
    for index, image in enumerate(source.parsed.images):
        where = f"images[{index}] (id {image.id}), field 'file_name' in {source.path}"
        relative = PurePosixPath(_copied_name(image.file_name))
        if relative.is_absolute() or ".." in relative.parts:
            raise DataError(f"{image.file_name!r} must be a relative path inside the image folder to copy it "
                            f"({where})")
        src = from_dir / relative
        if not src.is_file():
            raise DataError(f"{src}: image file not found ({where})")
        check_image_size(src, image.height, image.width, where)
        _check_complete(src, where)
        pairs.append((src, to_dir / relative))
    return pairs


def _check_complete(path: Path, where: str) -> None:
    """DataError unless training's own decoder (:func:`~toist_core.data.pixels.decode_rgb`)
    reads every pixel of the image: the size check reads the header only, so a file cut short
    (an interrupted copy or download) was converted and copied, and failed at its first read in
    training. Decoded once here, a one-off step (~2 ms per VGA JPEG)."""
    from toist_core.data.pixels import decode_rgb   # (imports torch: only when images are copied)

    try:
        decode_rgb(path, where)
    except DataError as exc:
        raise DataError(f"{exc}; a file cut short (an interrupted copy or download)?") from None


def _copy_atomic(src: Path, dst: Path) -> None:
    """A copy through a temporary file, its times kept: a copy cut short (Ctrl-C, a full disk) left a
    part of the picture at ``dst``, which the re-run then took for another picture and refused."""
    with open(src, "rb") as source:
        atomic_write(dst, lambda handle: shutil.copyfileobj(source, handle, 1 << 20))
    # The times only: the source's mode (an owner-only 0600 download) left a copy that a node or a
    # training job running as another user cannot read; atomic_write gives a new file's mode.
    stat = os.stat(src)
    os.utime(dst, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _copied_name(file_name: str) -> str:
    """``file_name`` of a copied image, relative to the copy's folder: "/" for a backslash (a
    Windows separator), the one rule for where the copy goes and what the task file says."""
    return file_name.replace("\\", "/")


def _write_json_atomic(path: Path, data: dict) -> None:
    """Readers never see half a file (:func:`~toist_core.atomic_file.write_text_atomic`). Written
    as UTF-8 text, or with JSON's escapes where a string holds a lone surrogate (a file name of
    bytes that are not UTF-8, as ``os.fsdecode`` reads it: kept, so that the file is found)."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    write_text_atomic(path, text if is_unicode(text) else json.dumps(data, separators=(",", ":")))
