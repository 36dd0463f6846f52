"""The shapes world: the vocabulary of the embedded toy benchmark.

Four shape classes and four colours stand in for GenEval's 80 COCO classes and ten colours. Every
constant that the renderer, the prompt generator, the detector and the tiny model share lives here,
so that changing the world is one edit.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Side of the square images the toy model generates, in pixels.
RESOLUTION = 32

#: Shape classes, in detector order. A bar is a horizontal 3:1 rectangle.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "bar")

#: Plural forms used by counting prompts ("a photo of three circles").
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}

#: Colours: a subset of GenEval's colour names with well separated hues (sRGB in [0, 1]).
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.14, 0.12),
    "yellow": (0.93, 0.80, 0.10),
    "green": (0.12, 0.62, 0.22),
    "blue": (0.14, 0.30, 0.88),
}
COLORS: tuple[str, ...] = tuple(PALETTE)

#: Neutral light-grey background: zero saturation, so every coloured pixel belongs to an object.
BACKGROUND: tuple[float, float, float] = (0.90, 0.90, 0.90)

#: Number words GenEval uses in counting prompts.
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}

#: Counts a counting prompt may ask for (GenEval uses 2-4).
COUNTS: tuple[int, ...] = (2, 3, 4)


@dataclass(frozen=True)
class SizeRange:
    """Object size range in pixels at RESOLUTION (the longer side of the object's box)."""

    low: float = 8.0
    high: float = 11.0


#: Sizes used when sampling scenes. Four objects of the largest size still fit with gaps.
SIZES = SizeRange()

#: Minimum empty gap between two objects' boxes, in pixels. Smaller gaps let the model merge
#: neighbours into one blob, which wrecks counting.
MIN_GAP = 3.0
