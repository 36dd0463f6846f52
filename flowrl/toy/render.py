"""Anti-aliased rendering of shapes-world scenes with numpy (no graphics library needed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowrl.toy.scenes import Scene, ShapeObject, extent
from flowrl.toy.world import BACKGROUND, PALETTE

#: Sub-pixels per pixel side used for anti-aliasing.
SUPERSAMPLE = 4


@dataclass(frozen=True)
class RenderedScene:
    """A rendered scene with its ground truth.

    Attributes:
        image: float32 [3, H, W] in [0, 1].
        masks: bool [N, H, W], one per object (pixels at least half covered).
        boxes: float32 [N, 4] analytic (x1, y1, x2, y2) in pixels.
        scene: the scene that was drawn.
    """

    image: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    scene: Scene


def coverage(obj: ShapeObject, resolution: int, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel covered by `obj`: float32 [H, W] in [0, 1]."""
    n = resolution * supersample
    coords = (np.arange(n, dtype=np.float32) + 0.5) / supersample
    y, x = np.meshgrid(coords, coords, indexing="ij")
    w, h = extent(obj.shape, obj.size)
    dx, dy = x - obj.cx, y - obj.cy
    if obj.shape == "circle":
        inside = dx**2 + dy**2 <= (w / 2) ** 2
    elif obj.shape in ("square", "bar"):
        inside = (np.abs(dx) <= w / 2) & (np.abs(dy) <= h / 2)
    elif obj.shape == "triangle":
        # Apex up: the half-width grows linearly from 0 at the top edge to w/2 at the base.
        depth = (dy + h / 2) / h
        inside = (depth >= 0) & (depth <= 1) & (np.abs(dx) <= depth * w / 2)
    else:  # extent() already refuses unknown shapes; kept for the type checker
        raise ValueError(obj.shape)
    return inside.reshape(resolution, supersample, resolution, supersample).mean(axis=(1, 3))


def render(scene: Scene, supersample: int = SUPERSAMPLE) -> RenderedScene:
    """Draw `scene` over the neutral background.

    Returns:
        RenderedScene with image float32 [3, H, W] in [0, 1], masks bool [N, H, W], boxes [N, 4].
    """
    res = scene.resolution
    image = np.empty((3, res, res), dtype=np.float32)
    image[:] = np.asarray(BACKGROUND, dtype=np.float32)[:, None, None]
    masks = np.zeros((len(scene.objects), res, res), dtype=bool)
    for i, obj in enumerate(scene.objects):
        alpha = coverage(obj, res, supersample)
        color = np.asarray(PALETTE[obj.color], dtype=np.float32)[:, None, None]
        image = image * (1 - alpha) + color * alpha
        masks[i] = alpha >= 0.5
    boxes = np.asarray([o.box for o in scene.objects], dtype=np.float32).reshape(-1, 4)
    return RenderedScene(image.astype(np.float32), masks, boxes, scene)
