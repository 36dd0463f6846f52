"""The reward contract: (images [B, 3, H, W] in [0, 1], prompts, metadata) -> RewardOutput.

Every reward's Config extends `RewardConfig`, which carries what the pipeline does with the raw
score (weight, scale, clip) and the label it is logged under. Image conversion lives here, once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from flowrl.types import RewardOutput


class RewardConfig(BaseModel):
    """Fields every reward entry of pipeline.yaml has, besides the reward's own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    name: str | None = Field(None, description="Label in metrics (default: the kind).")
    weight: float = Field(1.0, description="Weight in the multi-reward sum.")
    scale: float = Field(
        1.0,
        description="Multiplier applied to the raw score first; a fraction such as 1/26 is accepted (FlowGRPO's "
        "PickScore normalisation, score / 26, which 0.0385 misses by 0.1 %).",
    )
    clip: tuple[float, float] | None = Field(None, description="Clip the scaled score to [low, high].")

    @field_validator("scale", mode="before")
    @classmethod
    def _fraction(cls, v: Any) -> Any:
        return parse_fraction(v) if isinstance(v, str) else v

    @property
    def label(self) -> str:
        return self.name or self.kind


_FRACTION = re.compile(r"\s*([-+]?\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*")


def parse_fraction(text: str) -> float | str:
    """'1/26' -> 1 / 26 as a float (the nearest double); any other string is returned unchanged for
    the float check to refuse with its own message.

    Raises:
        ValueError: a zero denominator.
    """
    match = _FRACTION.fullmatch(text)
    if not match:
        return text
    num, den = float(match.group(1)), float(match.group(2))
    if den == 0:
        raise ValueError(f"{text!r} divides by zero; write the scale as a number or a fraction such as 1/26")
    return num / den


def as_float_images(images: Any) -> Tensor:
    """Any of: float tensor/array [B, 3, H, W] in [0, 1], uint8 [B, H, W, 3], PIL images
    -> float32 tensor [B, 3, H, W] in [0, 1] on the CPU.

    Raises:
        ValueError: a layout or range that is not an image batch, with the shape found.
    """
    if isinstance(images, (list, tuple)) and images and hasattr(images[0], "convert"):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a tensor, an array or PIL images, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be [B, H, W, 3], got {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float() / 255.0
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] floats in [0, 1], got shape {tuple(images.shape)}")
    images = images.detach().float().cpu()
    if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(
            f"images must be in [0, 1], got range [{images.min():.3f}, {images.max():.3f}]; "
            "convert [-1, 1] model outputs with (x + 1) / 2"
        )
    return images.clamp(0, 1)


def transform(scores: Tensor, cfg: RewardConfig) -> Tensor:
    """Scale then clip a raw score [B] as the reward entry says."""
    out = scores * cfg.scale
    if cfg.clip is not None:
        out = out.clamp(cfg.clip[0], cfg.clip[1])
    return out


def check_batch(images: Tensor, prompts: Sequence[str], metadata: Sequence[object]) -> None:
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts; give one prompt per image")
    if metadata and len(metadata) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(metadata)} metadata entries")


__all__ = ["RewardConfig", "RewardOutput", "as_float_images", "transform", "check_batch"]
