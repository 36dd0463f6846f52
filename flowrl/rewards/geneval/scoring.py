"""Detector-agnostic GenEval scoring: the official strict rule and the dense training reward.

A detector backend (Mask2Former through mmdet, the Hugging Face port, a toy detector in tests)
turns an image into raw per-class detections, and a colour classifier fills in
:attr:`Detection.color`. Everything after that lives here and needs only numpy: thresholds,
per-class truncation, colour and position checks, and the two scores of one image.

Both rules follow ``../shared/reference/REWARDS.md`` (section "GenEval"), which restates the
GenEval paper's ``evaluate_images.py`` and the FlowGRPO / DiffusionNFT dense reward.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from flowrl.rewards.geneval.metadata import COLORS, Clause, PromptRecord

__all__ = [
    "COUNTING_THRESHOLD",
    "MAX_OBJECTS",
    "POSITION_THRESHOLD",
    "THRESHOLD",
    "Detection",
    "Judgement",
    "judge",
    "keep_detections",
    "official_order",
    "relative_position",
]

THRESHOLD = 0.3
"""Detections must score strictly above this to count (all tags except counting)."""

COUNTING_THRESHOLD = 0.9
"""Stricter score threshold for ``counting`` prompts, where a spurious extra object is fatal."""

MAX_OBJECTS = 16
"""At most this many detections per class are kept (the highest-scoring ones)."""

POSITION_THRESHOLD = 0.1
"""Margin, as a fraction of the two objects' summed size per axis, removed from the centre offset."""

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Detection:
    """One detected object, as any detector backend reports it.

    Attributes:
        box: ``(x1, y1, x2, y2)`` in pixels, image y pointing down; ``x2 >= x1``, ``y2 >= y1``.
        score: Detector confidence in ``[0, 1]``. Raw: :func:`judge` applies the thresholds.
        color: The colour classifier's reading (one of :data:`COLORS`), or None when the backend
            did not classify colour. Required for the objects a colour clause inspects.
        mask: Optional boolean instance mask, shape ``[H, W]`` (the image's size). Not used by
            scoring; carried for the colour classifier and for debugging. Excluded from ``==``.
    """

    box: Box
    score: float
    color: str | None = None
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)  # bool [H, W]

    def __post_init__(self) -> None:
        try:
            box = tuple(float(v) for v in self.box)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"Detection.box must be 4 numbers (x1, y1, x2, y2), got {self.box!r}"
            ) from e
        if len(box) != 4 or not all(math.isfinite(v) for v in box):
            raise ValueError(f"Detection.box must be 4 finite numbers (x1, y1, x2, y2), got {self.box!r}")
        x1, y1, x2, y2 = box
        if x2 < x1 or y2 < y1:
            raise ValueError(
                f"Detection.box {self.box!r} has x2 < x1 or y2 < y1; boxes are (x1, y1, x2, y2) with the "
                "top-left corner first: convert (x, y, w, h) or (cx, cy, w, h) boxes before building "
                "Detections"
            )
        object.__setattr__(self, "box", box)
        score = float(self.score)
        if not 0.0 <= score <= 1.0:  # also rejects NaN
            raise ValueError(
                f"Detection.score must lie in [0, 1], got {self.score!r}; pass the detector's probability, "
                "not a logit"
            )
        object.__setattr__(self, "score", score)
        if self.color is not None and self.color not in COLORS:
            raise ValueError(
                f"Detection.color {self.color!r} is not a GenEval colour; use one of {', '.join(COLORS)} "
                "or None when colour was not classified"
            )
        if self.mask is not None:
            mask = self.mask
            if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.dtype != np.bool_:
                if isinstance(mask, np.ndarray):
                    desc = f"{mask.dtype} array of shape {mask.shape}"
                else:
                    desc = type(mask).__name__
                raise ValueError(
                    f"Detection.mask must be a boolean numpy array of shape [H, W], got a {desc}; "
                    "threshold soft masks first, e.g. mask > 0.5"
                )


@dataclass(frozen=True)
class Judgement:
    """GenEval's verdict on one image.

    Attributes:
        correct: The official strict rule (what GenEval's reported score averages).
        score: The dense training reward, ``mean(rewards)``, 0.0 if ``rewards`` is empty. Can be
            negative when far too many objects are found.
        rewards: The dense reward's terms in the order they were appended (see :func:`judge`).
        reasons: Why the strict rule failed, one line per failure; empty when ``correct``.
    """

    correct: bool
    score: float
    rewards: tuple[float, ...]
    reasons: tuple[str, ...]


def official_order(scores: Sequence[float]) -> list[int]:
    """Indices of `scores`, highest first, in exactly the official code's order:
    ``np.argsort(scores)[::-1]`` over the float32 score column (evaluate_images.py).

    Equal scores come out as numpy's default (unstable) argsort leaves them, reversed: for a few
    detections that is the later-listed one first (``[0.5, 0.9, 0.5, 0.9]`` -> ``[3, 1, 2, 0]``).
    Beyond that the tie order depends on numpy's version and the CPU's sort kernels (numpy >= 2 uses
    SIMD sorts on AVX2/AVX-512), exactly as it does for the official code on the same machine.
    """
    if not len(scores):
        return []
    return np.argsort(np.asarray(scores, dtype=np.float32))[::-1].tolist()


def keep_detections(detections: Sequence[Detection], threshold: float) -> list[Detection]:
    """GenEval's per-class filtering: sort by score, keep those strictly above ``threshold``, cap at 16.

    The order is the official one, ties included (see :func:`official_order`): which of two equally
    confident objects comes first decides, e.g., whose colour a one-object prompt checks.

    Args:
        detections: Raw detections of one class, any order, any score.
        threshold: :data:`THRESHOLD` or :data:`COUNTING_THRESHOLD`.

    Returns:
        At most :data:`MAX_OBJECTS` detections, highest score first.
    """
    for d in detections:
        if not isinstance(d, Detection):
            raise TypeError(
                f"expected flowrl.rewards.geneval.Detection objects, got {type(d).__name__}; "
                "wrap detector outputs as Detection(box=..., score=..., color=...)"
            )
    ranked = [detections[i] for i in official_order([d.score for d in detections])]
    # Sorting first matters: the cap must drop the least confident objects, not the last listed.
    return [d for d in ranked if d.score > threshold][:MAX_OBJECTS]


def relative_position(box_a: Sequence[float], box_b: Sequence[float]) -> frozenset[str]:
    """Spatial relations of object A relative to object B, GenEval's rule.

    The centre offset is shrunk per axis by ``POSITION_THRESHOLD * (size_a + size_b)`` so that
    objects which merely overlap do not count as beside one another, then divided by the norm of the
    *raw* offset (not the shrunk one, as GenEval does) and compared with +-0.5.

    Args:
        box_a: ``(x1, y1, x2, y2)`` of A; image y points down, so smaller y is higher up.
        box_b: ``(x1, y1, x2, y2)`` of B.

    Returns:
        A subset of ``{"left of", "right of", "above", "below"}``; empty when the shrunk offset is
        (nearly) zero. A diagonal offset can give two relations.
    """
    boxes = np.asarray([box_a, box_b], dtype=np.float64).reshape(2, 2, 2)  # [object, corner, xy]
    center_a, center_b = boxes.mean(axis=1)  # [2] each
    dim_a, dim_b = np.abs(boxes[:, 1] - boxes[:, 0])  # (w, h) each
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0.0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return frozenset()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return frozenset(relations)


def _colors_of(found: Sequence[Detection], clause: Clause, record: PromptRecord) -> list[str]:
    """Colour readings of ``found``; raises rather than treating a missing reading as a wrong colour."""
    for i, d in enumerate(found):
        if d.color is None:
            raise ValueError(
                f"prompt {record.prompt!r} asks for a {clause.color} {clause.cls}, but kept {clause.cls!r} "
                f"detection #{i} (score {d.score:.3f}) has color=None: the detector backend must supply "
                "colour readings for colour prompts; run the colour classifier on every kept detection of "
                "the classes that colour clauses name and set Detection.color"
            )
    return [d.color for d in found]  # type: ignore[misc]


def _strict(record: PromptRecord, kept: Mapping[str, list[Detection]]) -> tuple[bool, list[str]]:
    """GenEval's official ``evaluate``: every include clause holds and no exclude clause does."""
    correct = True
    reasons: list[str] = []
    matched_groups: list[list[Detection] | None] = []
    for clause in record.include:
        matched = True
        # "At least count": only the `count` most confident objects are inspected further.
        found = kept[clause.cls][: clause.count]
        if len(found) < clause.count:
            correct = matched = False
            reasons.append(f"expected {clause.cls}>={clause.count}, found {len(found)}")
        else:
            if clause.color is not None:
                colors = _colors_of(found, clause, record)
                if colors.count(clause.color) < clause.count:
                    correct = matched = False
                    others = ", ".join(sorted(c for c in set(colors) if c != clause.color))
                    reasons.append(
                        f"expected {clause.color} {clause.cls}>={clause.count}, found "
                        f"{colors.count(clause.color)} {clause.color}; and {others}"
                    )
            # A clause that already failed its colour is not looked at for position.
            if clause.position is not None and matched:
                relation, k = clause.position
                targets = matched_groups[k]
                if targets is None:
                    correct = matched = False
                    reasons.append(f"no target for {clause.cls} to be {relation}")
                else:
                    failure = _first_missing_relation(found, targets, relation)
                    if failure is not None:
                        correct = matched = False
                        reasons.append(
                            f"expected {clause.cls} {relation} target, found "
                            f"{' and '.join(sorted(failure)) or 'no clear relation'}"
                        )
        matched_groups.append(found if matched else None)
    for clause in record.exclude:
        n = len(kept[clause.cls])
        if n >= clause.count:
            correct = False
            reasons.append(f"expected {clause.cls}<{clause.count}, found {n}")
    return correct, reasons


def _first_missing_relation(
    found: Sequence[Detection], targets: Sequence[Detection], relation: str
) -> frozenset[str] | None:
    """The relations of the first (object, target) pair lacking ``relation``; None if every pair has it."""
    for obj in found:
        for target in targets:
            rels = relative_position(obj.box, target.box)
            if relation not in rels:
                return rels
    return None


def _dense(record: PromptRecord, kept: Mapping[str, list[Detection]]) -> list[float]:
    """FlowGRPO / DiffusionNFT dense reward terms (see :func:`judge` for the rule and its quirk)."""
    rewards: list[float] = []
    matched_groups: list[list[Detection] | None] = []
    for clause in record.include:
        matched = True
        found = kept[clause.cls]  # all kept objects: "exactly count" here, unlike the strict rule
        rewards.append(1.0 - abs(clause.count - len(found)) / clause.count)
        if len(found) != clause.count:
            matched = False
            if clause.color is not None or clause.position is not None:
                rewards.append(0.0)
        else:
            if clause.color is not None:
                n = _colors_of(found, clause, record).count(clause.color)
                rewards.append(1.0 - abs(clause.count - n) / clause.count)
                if n != clause.count:
                    matched = False
            if clause.position is not None and matched:
                relation, k = clause.position
                targets = matched_groups[k]
                if targets is None:
                    matched = False
                    rewards.append(0.0)
                else:
                    if _first_missing_relation(found, targets, relation) is not None:
                        matched = False
                        rewards.append(0.0)
                    # Quirk kept from FlowGRPO: the 1 is appended even after a failed pair.
                    rewards.append(1.0)
        matched_groups.append(found if matched else None)
    return rewards


def judge(record: PromptRecord, detections: Mapping[str, Sequence[Detection]]) -> Judgement:
    """Score one image of a GenEval prompt from its raw detections.

    Per class, detections are filtered by :func:`keep_detections` with :data:`COUNTING_THRESHOLD`
    for ``counting`` prompts and :data:`THRESHOLD` otherwise. Classes the record does not name are
    ignored, and a class missing from ``detections`` has no detections.

    Strict rule (``Judgement.correct``, GenEval's reported metric): for each include clause,
    ``found`` = the class's first ``count`` kept detections; the clause fails if fewer than
    ``count`` were found; with a colour, if fewer than ``count`` of ``found`` have it; with a
    position ``(relation, k)``, if clause ``k`` did not match, or any (found, clause-``k`` found)
    pair lacks the relation (:func:`relative_position`). A clause that failed is "unmatched", and
    a clause that failed its colour check is not checked for position. An exclude clause fails if
    the class has at least ``count`` kept detections, so counting prompts mean exactly N.

    Dense reward (``Judgement.score``, the FlowGRPO / DiffusionNFT training signal): for each
    include clause, ``found`` = *all* kept detections of the class, and

    1. append ``1 - |count - len(found)| / count`` (negative when far too many are found);
    2. if ``len(found) != count``: the clause is unmatched, and if it has a colour or position,
       append 0;
    3. otherwise, with a colour: ``n`` = how many of ``found`` have it; append
       ``1 - |count - n| / count``; unmatched if ``n != count``;
    4. with a position, if still matched: if clause ``k`` is unmatched, append 0 (unmatched);
       else if some (found, clause-``k`` found) pair lacks the relation, append 0 (unmatched) and
       stop looking; then append 1.

    The 1 of step 4 is appended even after a failed pair, so a wrong relation costs 0.75 rather
    than 2/3 on a two-object prompt. This is a deliberate quirk of the published reward, kept so
    that rewards match FlowGRPO's. Exclude clauses are ignored by the dense reward. The score is
    the mean of the appended terms, 0.0 if none.

    Args:
        record: The prompt's metadata.
        detections: Raw detections per class name (any score, any order). Extra keys are fine.

    Returns:
        The strict verdict, the dense reward with its terms, and the strict rule's failure reasons.

    Raises:
        ValueError: A colour clause needs the colour of a detection whose ``color`` is None; the
            backend must classify colours (a missing reading is never counted as wrong).
    """
    threshold = COUNTING_THRESHOLD if record.tag == "counting" else THRESHOLD
    names = {c.cls for c in record.include} | {c.cls for c in record.exclude}
    kept = {name: keep_detections(detections.get(name, ()), threshold) for name in names}
    correct, reasons = _strict(record, kept)
    rewards = _dense(record, kept)
    score = sum(rewards) / len(rewards) if rewards else 0.0
    return Judgement(correct=correct, score=score, rewards=tuple(rewards), reasons=tuple(reasons))
