"""GenEval prompt metadata: typed records, validation with line-numbered errors, JSON-lines I/O.

The official file (``evaluation_metadata.jsonl`` from the GenEval repository, MIT) holds one JSON
object per line::

    {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
     {"class": "dog", "count": 1, "position": ["right of", 0]}], "prompt": "a photo of a dog ..."}

flowrl never ships a copy of it; callers pass a path. :func:`load_metadata` checks the whole file
and reports every problem at once, so a hand-edited file can be fixed in one pass.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "COLORS",
    "RELATIONS",
    "TAGS",
    "Clause",
    "MetadataError",
    "PromptRecord",
    "load_metadata",
    "parse_record",
    "write_metadata",
]

TAGS: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)
"""The six GenEval task tags, in the order the paper reports them."""

COLORS: tuple[str, ...] = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
)
"""The colours GenEval's CLIP colour classifier chooses between."""

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
"""Spatial relations of a position clause (object of this clause relative to the referenced one)."""

_RECORD_KEYS = ("tag", "prompt", "include", "exclude")
_REQUIRED_RECORD_KEYS = ("tag", "prompt", "include")
_CLAUSE_KEYS = ("class", "count", "color", "position")


class MetadataError(ValueError):
    """GenEval metadata is malformed.

    Attributes:
        problems: One line per problem, each ``"<file>:<line>: what is wrong; what is allowed;
            how to fix"``.
    """

    def __init__(self, problems: Iterable[str], header: str | None = None) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        n = len(self.problems)
        head = header or f"{n} problem{'s' if n != 1 else ''} in GenEval metadata"
        super().__init__(head + ":\n  " + "\n  ".join(self.problems))


def _nearest(word: object, choices: Iterable[str]) -> str:
    """A ``"; did you mean 'x'?"`` suffix naming the closest valid choice, or ``""`` if none is close."""
    if not isinstance(word, str):
        return ""
    choices = list(choices)
    # Whole-word containment first: GenEval renames some COCO classes ("mouse" -> "computer mouse"),
    # and difflib alone would suggest "horse".
    hits = [c for c in choices if word.lower() in c.lower().split()][:1]
    hits = hits or difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {hits[0]!r}?" if hits else ""


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `"count": true` is a typo, not a count of 1.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Clause:
    """One object requirement of a GenEval prompt.

    Attributes:
        cls: COCO class name as the detector names it (e.g. ``"computer mouse"``); JSON key ``class``.
        count: How many objects of the class. In an include clause: at least / exactly this many
            (see :func:`flowrl.rewards.geneval.judge`); in an exclude clause: fewer than this many.
        color: Required colour (one of :data:`COLORS`), or None for no colour requirement.
        position: ``(relation, k)``: each object of this clause must be ``relation`` (one of
            :data:`RELATIONS`) relative to each object of include clause ``k``, with ``k`` an
            earlier clause; None for no position requirement.
    """

    cls: str
    count: int
    color: str | None = None
    position: tuple[str, int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.position, list):  # JSON gives lists; a tuple keeps the clause hashable
            object.__setattr__(self, "position", tuple(self.position))
        problems = (
            _class_problems(self.cls)
            + _count_problems(self.count)
            + _color_problems(self.color)
            + _position_problems(self.position)
        )
        if problems:
            raise ValueError(f"invalid GenEval clause {self!r}: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        """GenEval's own dict layout: ``class``, ``count``, then ``color``/``position`` if set."""
        out: dict[str, Any] = {"class": self.cls, "count": self.count}
        if self.color is not None:
            out["color"] = self.color
        if self.position is not None:
            out["position"] = [self.position[0], self.position[1]]
        return out


@dataclass(frozen=True)
class PromptRecord:
    """One GenEval prompt with what an image of it must show.

    Attributes:
        tag: Task tag, one of :data:`TAGS`.
        prompt: The text prompt.
        include: Clauses that must hold, in file order (position clauses refer to them by index).
        exclude: Clauses that must not hold (the official file uses them for counting only:
            ``count + 1`` of the class, so that "two clocks" means exactly two).
    """

    tag: str
    prompt: str
    include: tuple[Clause, ...]
    exclude: tuple[Clause, ...] = ()

    def __post_init__(self) -> None:
        # Accept lists from hand-written code but store tuples so the record stays hashable.
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        problems: list[str] = []
        if self.tag not in TAGS:
            problems.append(f"unknown tag {self.tag!r}; allowed: {', '.join(TAGS)}{_nearest(self.tag, TAGS)}")
        if not isinstance(self.prompt, str):
            problems.append(f"prompt must be a string, got {type(self.prompt).__name__}")
        strays = [c for c in self.include + self.exclude if not isinstance(c, Clause)]
        if strays:
            raise TypeError(
                f"PromptRecord clauses must be Clause objects, got {strays[0]!r}; "
                "build them with Clause(cls, count, ...) or turn GenEval dicts into records with parse_record"
            )
        if not self.include:
            problems.append("include is empty; a prompt needs at least one include clause")
        for i, clause in enumerate(self.include):
            if clause.position is not None and not 0 <= clause.position[1] < i:
                problems.append(
                    f"include[{i}].position index {clause.position[1]} does not point to an earlier "
                    f"include clause; use an index in 0..{i - 1}"
                    if i
                    else "include[0] has a position, but there is no earlier clause to refer to"
                )
        for i, clause in enumerate(self.exclude):
            if clause.color is not None or clause.position is not None:
                problems.append(
                    f"exclude[{i}] has a color or position; exclude clauses use only class and count"
                )
        if problems:
            raise ValueError(f"invalid GenEval record for prompt {self.prompt!r}: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        """GenEval's own dict layout: ``tag``, ``include``, ``exclude`` (only if non-empty), ``prompt``."""
        out: dict[str, Any] = {"tag": self.tag, "include": [c.to_json() for c in self.include]}
        if self.exclude:
            out["exclude"] = [c.to_json() for c in self.exclude]
        out["prompt"] = self.prompt
        return out


def _class_problems(cls: object) -> list[str]:
    if isinstance(cls, str) and cls.strip():
        return []
    return [f"class must be a non-empty string (a COCO class name), got {cls!r}"]


def _count_problems(count: object) -> list[str]:
    if _is_int(count) and count >= 1:  # type: ignore[operator]
        return []
    return [f"count must be a positive integer, got {count!r}; write e.g. \"count\": 2"]


def _color_problems(color: object) -> list[str]:
    if color is None or color in COLORS:
        return []
    return [f"unknown color {color!r}; allowed: {', '.join(COLORS)}{_nearest(color, COLORS)}"]


def _position_problems(position: object) -> list[str]:
    """Shape, relation and index type of a position value (not whether the index is earlier)."""
    if position is None:
        return []
    if not isinstance(position, (list, tuple)) or len(position) != 2:
        return [
            f"position must be a 2-list [relation, index of an earlier include clause], got {position!r}; "
            'write e.g. "position": ["left of", 0]'
        ]
    relation, index = position
    problems = []
    if relation not in RELATIONS:
        problems.append(
            f"unknown position relation {relation!r}; allowed: {', '.join(RELATIONS)}"
            f"{_nearest(relation, RELATIONS)}"
        )
    if not _is_int(index):
        problems.append(f"position index must be an integer clause index, got {index!r}")
    return problems


def _check_clause(
    obj: object, label: str, *, index: int, in_exclude: bool, classes: Collection[str] | None
) -> tuple[Clause | None, list[str]]:
    """Validate one clause dict; returns the clause (None if invalid) and the problems found."""
    if not isinstance(obj, Mapping):
        example = '{"class": "dog", "count": 1}'
        return None, [f"{label} must be a JSON object like {example}, got {obj!r}"]
    problems: list[str] = []
    for key in obj:
        if key not in _CLAUSE_KEYS:
            problems.append(
                f"{label} has unknown field {key!r}; allowed: {', '.join(_CLAUSE_KEYS)}"
                f"{_nearest(key, _CLAUSE_KEYS)}"
            )
    for key in ("class", "count"):
        if key not in obj:
            problems.append(f"{label} is missing required field {key!r}; add it")
    cls, count = obj.get("class"), obj.get("count")
    color, position = obj.get("color"), obj.get("position")
    value_problems = (
        (_class_problems(cls) if "class" in obj else [])
        + (_count_problems(count) if "count" in obj else [])
        + _color_problems(color)
        + _position_problems(position)
    )
    problems += [f"{label}: {p}" for p in value_problems]
    if in_exclude and (color is not None or position is not None):
        problems.append(
            f"{label} has a color or position, which GenEval ignores in exclude clauses; "
            "keep only class and count there"
        )
    if (
        not in_exclude
        and isinstance(position, (list, tuple))
        and len(position) == 2
        and _is_int(position[1])
        and not 0 <= position[1] < index
    ):
        problems.append(
            f"{label}: position index {position[1]} does not point to an earlier include clause; "
            + (f"use an index in 0..{index - 1}" if index else "the first clause cannot have a position")
        )
    if classes is not None and isinstance(cls, str) and cls not in classes:
        problems.append(
            f"{label}: class {cls!r} is not one of the detector's {len(classes)} class names"
            f"{_nearest(cls, classes)}"
        )
    if problems:
        return None, problems
    pos = None if position is None else (str(position[0]), int(position[1]))
    return Clause(cls=cls, count=count, color=color, position=pos), []


def _check_record(
    obj: object, *, classes: Collection[str] | None
) -> tuple[PromptRecord | None, list[str]]:
    """Validate one record dict; returns the record (None if invalid) and problems (no location prefix)."""
    if not isinstance(obj, Mapping):
        return None, [
            f"expected a JSON object with fields {', '.join(_RECORD_KEYS)}, got {type(obj).__name__}; "
            "write one object per line"
        ]
    problems: list[str] = []
    for key in obj:
        if key not in _RECORD_KEYS:
            problems.append(
                f"unknown field {key!r}; allowed: {', '.join(_RECORD_KEYS)}{_nearest(key, _RECORD_KEYS)}"
            )
    for key in _REQUIRED_RECORD_KEYS:
        if key not in obj:
            problems.append(f"missing required field {key!r}; add it")
    tag = obj.get("tag")
    if "tag" in obj and tag not in TAGS:
        problems.append(f"unknown tag {tag!r}; allowed: {', '.join(TAGS)}{_nearest(tag, TAGS)}")
    prompt = obj.get("prompt")
    if "prompt" in obj and (not isinstance(prompt, str) or not prompt.strip()):
        problems.append(f"prompt must be a non-empty string, got {prompt!r}")

    groups: dict[str, list[Clause]] = {"include": [], "exclude": []}
    for field_name in ("include", "exclude"):
        if field_name not in obj:
            continue
        items = obj[field_name]
        if not isinstance(items, list):
            problems.append(f"{field_name} must be a list of clause objects, got {type(items).__name__}")
            continue
        if field_name == "include" and not items:
            problems.append("include is empty; a prompt needs at least one include clause")
        for i, item in enumerate(items):
            clause, clause_problems = _check_clause(
                item, f"{field_name}[{i}]", index=i, in_exclude=field_name == "exclude", classes=classes
            )
            problems += clause_problems
            if clause is not None:
                groups[field_name].append(clause)
    if problems:
        return None, problems
    record = PromptRecord(
        tag=tag, prompt=prompt, include=tuple(groups["include"]), exclude=tuple(groups["exclude"])
    )
    return record, []


def parse_record(
    obj: Mapping[str, Any], where: str = "<record>", classes: Collection[str] | None = None
) -> PromptRecord:
    """Build a :class:`PromptRecord` from one GenEval metadata dict, checking every field.

    Args:
        obj: One decoded JSON line (``tag``, ``prompt``, ``include``, optional ``exclude``).
        where: Location used as the prefix of each problem, e.g. ``"meta.jsonl:12"``.
        classes: If given, every clause class must be one of these names (e.g. the detector's
            ``object_names.txt``).

    Returns:
        The validated record.

    Raises:
        MetadataError: Listing every problem of the record, each prefixed with ``where``.
    """
    record, problems = _check_record(obj, classes=classes)
    if record is None:
        raise MetadataError([f"{where}: {p}" for p in problems])
    return record


def load_metadata(path: str | os.PathLike[str], classes: Collection[str] | None = None) -> list[PromptRecord]:
    """Read and validate a GenEval metadata file (JSON lines; blank lines are skipped).

    Args:
        path: The ``evaluation_metadata.jsonl`` file.
        classes: If given, every clause class must be one of these names.

    Returns:
        The records, in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message gives the absolute path looked at).
        MetadataError: The file has problems; all of them are listed, each as ``file:line: ...``.
    """
    path = Path(path)
    if not path.is_file():
        where = path.resolve()
        reason = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"GenEval metadata {where} {reason}; pass the path of evaluation_metadata.jsonl from the "
            "GenEval repository (a copy for development lives in ../shared/data/geneval/)"
        )
    if classes is not None and not isinstance(classes, (set, frozenset, dict)):
        classes = frozenset(classes)  # membership tests per clause; keep them O(1)
    records: list[PromptRecord] = []
    problems: list[str] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(
                    f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must hold one "
                    "JSON object; fix the syntax or delete the line"
                )
                continue
            record, record_problems = _check_record(obj, classes=classes)
            problems += [f"{where}: {p}" for p in record_problems]
            if record is not None:
                records.append(record)
    if problems:
        n = len(problems)
        raise MetadataError(problems, header=f"{n} problem{'s' if n != 1 else ''} in GenEval metadata {path}")
    if not records:
        raise MetadataError(
            [f"{path}: the file holds no records; expected one JSON object per line"],
            header=f"empty GenEval metadata {path}",
        )
    return records


def write_metadata(records: Iterable[PromptRecord], path: str | os.PathLike[str]) -> None:
    """Write records as GenEval JSON lines (the layout of :meth:`PromptRecord.to_json`).

    Args:
        records: Records to write, in order.
        path: Output file; overwritten if it exists.
    """
    with Path(path).open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record.to_json()) + "\n")
