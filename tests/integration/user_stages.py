"""A user-defined reward loaded by dotted path ("user_stages:Brightness") in the trainer tests."""

from __future__ import annotations

from typing import Literal

from flowrl.rewards.base import RewardConfig, as_float_images
from flowrl.types import RewardOutput


class Brightness:
    """Mean pixel value: a smooth reward that varies across images, so advantages are never zero."""

    class Config(RewardConfig):
        kind: Literal["user_stages:Brightness"] = "user_stages:Brightness"

    def __init__(self, config: Config):
        self.config = config

    def __call__(self, images, prompts, metadata) -> RewardOutput:
        return RewardOutput(scores=as_float_images(images).mean(dim=(1, 2, 3)))
