"""Scenes of the shapes world: what is where, sampled to satisfy a GenEval-style prompt record."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowrl.rewards.geneval import PromptRecord, relative_position
from flowrl.toy.world import COLORS, MIN_GAP, RESOLUTION, SHAPES, SIZES


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene.

    Attributes:
        shape: one of `world.SHAPES`.
        color: one of `world.COLORS`.
        cx: centre x in pixels (0 = left edge of the image).
        cy: centre y in pixels (0 = top edge; y points down as in images).
        size: the object's nominal size in pixels (see `extent`).
    """

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        """Analytic bounding box (x1, y1, x2, y2) in pixels."""
        w, h = extent(self.shape, self.size)
        return (self.cx - w / 2, self.cy - h / 2, self.cx + w / 2, self.cy + h / 2)


@dataclass(frozen=True)
class Scene:
    """Objects on the neutral background of a square image of side `resolution` pixels."""

    objects: tuple[ShapeObject, ...]
    resolution: int = RESOLUTION


def extent(shape: str, size: float) -> tuple[float, float]:
    """Width and height in pixels of a shape of nominal `size`.

    Squares are a little smaller than circles of the same size so that both cover similar areas;
    a bar is a 3:1 horizontal rectangle, longer than the others so that it stays thick enough.
    """
    if shape == "circle":
        return size, size
    if shape == "square":
        return 0.86 * size, 0.86 * size
    if shape == "triangle":
        return size, 0.9 * size
    if shape == "bar":
        return 1.3 * size, 1.3 * size / 3.0
    raise ValueError(f"unknown shape {shape!r}; the shapes world has {', '.join(SHAPES)}")


def _gap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Empty space between two boxes: the larger of the horizontal and vertical separations."""
    dx = max(b[0] - a[2], a[0] - b[2])
    dy = max(b[1] - a[3], a[1] - b[3])
    return max(dx, dy)


def _holds_robustly(relation: str, box_a, box_b, slack: float = 1.0) -> bool:
    """`relation` holds for A relative to B even with A moved by `slack` px in any direction.

    A relation that holds by a hair on the exact boxes can flip once a detector rounds boxes to
    whole pixels; ground truth should not depend on that.
    """
    for dx in (-slack, 0.0, slack):
        for dy in (-slack, 0.0, slack):
            moved = (box_a[0] + dx, box_a[1] + dy, box_a[2] + dx, box_a[3] + dy)
            if relation not in relative_position(moved, box_b):
                return False
    return True


def _place(
    shape: str,
    color: str,
    placed: list[ShapeObject],
    rng: np.random.Generator,
    resolution: int,
    relation: tuple[str, ShapeObject] | None,
    tries: int = 200,
) -> ShapeObject | None:
    """Rejection-sample one object that fits the image, keeps MIN_GAP from the others and, if asked,
    stands in `relation` to a reference object. None when no position was found in `tries`."""
    scale = resolution / RESOLUTION
    margin = 1.0 * scale
    for _ in range(tries):
        size = rng.uniform(SIZES.low, SIZES.high) * scale
        w, h = extent(shape, size)
        cx = rng.uniform(margin + w / 2, resolution - margin - w / 2)
        cy = rng.uniform(margin + h / 2, resolution - margin - h / 2)
        obj = ShapeObject(shape, color, float(cx), float(cy), float(size))
        if any(_gap(obj.box, o.box) < MIN_GAP * scale for o in placed):
            continue
        if relation is not None and not _holds_robustly(relation[0], obj.box, relation[1].box):
            continue
        return obj
    return None


def sample_scene(
    record: PromptRecord, rng: np.random.Generator, resolution: int = RESOLUTION, tries: int = 50
) -> Scene:
    """A scene that satisfies every include clause of `record` and nothing more.

    Objects without a colour in the prompt get a random colour each. Exclude clauses hold by
    construction since exactly `count` objects of each class are drawn.

    Raises:
        ValueError: a class outside the shapes world, or no layout found (too many objects).
    """
    for clause in record.include:
        if clause.cls not in SHAPES:
            raise ValueError(
                f"prompt {record.prompt!r} asks for {clause.cls!r}, which the shapes world cannot "
                f"draw; use one of {', '.join(SHAPES)}"
            )
    for _ in range(tries):
        placed: list[ShapeObject] = []
        first_of_clause: list[ShapeObject] = []
        ok = True
        for clause in record.include:
            for i in range(clause.count):
                color = clause.color or str(rng.choice(COLORS))
                rel = None
                if clause.position is not None:
                    rel = (clause.position[0], first_of_clause[clause.position[1]])
                obj = _place(clause.cls, color, placed, rng, resolution, rel)
                if obj is None:
                    ok = False
                    break
                placed.append(obj)
                if i == 0:
                    first_of_clause.append(obj)
            if not ok:
                break
        if ok:
            return Scene(tuple(placed), resolution)
    raise ValueError(f"no layout found for {record.prompt!r} at {resolution}px after {tries} tries")
