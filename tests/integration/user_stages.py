"""User-defined stages loaded by dotted path ("user_stages:Brightness") in the trainer tests."""

from __future__ import annotations

import os
from typing import Literal

import torch

from flowrl.objectives.policy_gradient import PEPG, ObjectiveConfig
from flowrl.rewards.base import RewardConfig, as_float_images
from flowrl.types import LossOutput, RewardOutput


class Brightness:
    """Mean pixel value: a smooth reward that varies across images, so advantages are never zero."""

    class Config(RewardConfig):
        kind: Literal["user_stages:Brightness"] = "user_stages:Brightness"

    def __init__(self, config: Config):
        self.config = config

    def __call__(self, images, prompts, metadata) -> RewardOutput:
        return RewardOutput(scores=as_float_images(images).mean(dim=(1, 2, 3)))


class NanOnRankOne(PEPG):
    """pepg, except that the first loss of the run on rank 1 (the launcher's RANK) is NaN: a
    non-finite value on one process only, which every process must skip together."""

    class Config(ObjectiveConfig):
        kind: Literal["user_stages:NanOnRankOne"] = "user_stages:NanOnRankOne"

    def __init__(self, config=None):
        super().__init__(config)
        self.calls = 0

    def __call__(self, terms, advantages) -> LossOutput:
        out = super().__call__(terms, advantages)
        self.calls += 1
        if self.calls == 1 and os.environ.get("RANK") == "1":
            return LossOutput(out.loss * torch.nan, out.metrics)
        return out
