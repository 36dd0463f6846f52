"""Pictures people would rather look at than read: sample grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def to_uint8(images) -> np.ndarray:
    """[B, 3, H, W] floats in [0, 1] (numpy or torch) -> uint8 [B, H, W, 3]."""
    arr = images.detach().cpu().float().numpy() if hasattr(images, "detach") else np.asarray(images)
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(arr.shape)}")
    return (np.clip(arr, 0.0, 1.0) * 255 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


def save_grid(
    images,
    path: str | Path,
    ncol: int = 8,
    upscale: int = 4,
    marks: Sequence[bool | None] | None = None,
    pad: int = 2,
) -> Path:
    """Write images as one PNG grid.

    Args:
        images: [B, 3, H, W] in [0, 1].
        ncol: images per row.
        upscale: nearest-neighbour magnification (toy images are 32 px).
        marks: optional per-image verdict drawn as a border: True green, False red, None none.
        pad: border width in pixels (after upscaling).
    """
    from PIL import Image

    tiles = to_uint8(images)
    b, h, w, _ = tiles.shape
    tiles = tiles.repeat(upscale, axis=1).repeat(upscale, axis=2)
    h, w = h * upscale, w * upscale
    ncol = max(1, min(ncol, b))
    nrow = (b + ncol - 1) // ncol
    cell_h, cell_w = h + 2 * pad, w + 2 * pad
    canvas = np.full((nrow * cell_h, ncol * cell_w, 3), 255, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, ncol)
        y, x = r * cell_h, c * cell_w
        mark = marks[i] if marks is not None else None
        if mark is not None:
            canvas[y : y + cell_h, x : x + cell_w] = (40, 170, 60) if mark else (210, 40, 40)
        canvas[y + pad : y + pad + h, x + pad : x + pad + w] = tiles[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path
