"""GenEval as a reward stage: detector backend -> detections -> judge -> dense or strict score."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from flowrl.errors import FlowrlError
from flowrl.registry import register
from flowrl.rewards.base import RewardConfig, as_float_images, check_batch
from flowrl.rewards.geneval.metadata import PromptRecord
from flowrl.rewards.geneval.scoring import judge
from flowrl.rewards.geneval.summary import summarize
from flowrl.types import RewardOutput


@register("reward", "geneval")
class GenEvalReward:
    """GenEval with a pluggable detector. `shapes` is the embedded toy world's detector."""

    class Config(RewardConfig):
        kind: Literal["geneval"] = "geneval"
        backend: Literal["shapes"] = Field("shapes", description="Detector backend.")
        signal: Literal["dense", "strict"] = Field(
            "dense", description="Training score: the dense reward, or 1/0 strict correctness."
        )

    def __init__(self, config: Config | None = None):
        self.config = config or self.Config()
        from flowrl.toy.detector import ShapesDetector

        self.detector = ShapesDetector()

    def __call__(self, images, prompts: Sequence[str], metadata: Sequence[object]) -> RewardOutput:
        """Scores [B] and details {'strict': [B]} for images [B, 3, H, W] in [0, 1].

        Raises:
            FlowrlError: when a prompt has no GenEval metadata (plain-text prompt sets).
        """
        images = as_float_images(images)
        check_batch(images, prompts, metadata)
        records = list(metadata)
        bad = [i for i, r in enumerate(records) if not isinstance(r, PromptRecord)]
        if not records or bad:
            raise FlowrlError(
                "the geneval reward needs GenEval metadata for every prompt (tag, include clauses); "
                "use a GenEval-format .jsonl prompt set such as toy-train, not plain-text prompts"
            )
        judgements = [judge(r, d) for r, d in zip(records, self.detector(images), strict=True)]
        strict = torch.tensor([float(j.correct) for j in judgements])
        dense = torch.tensor([j.score for j in judgements], dtype=torch.float32)
        scores = dense if self.config.signal == "dense" else strict
        return RewardOutput(scores=scores, details={"strict": strict, "dense": dense})

    @staticmethod
    def eval_summary(output: RewardOutput, metadata: Sequence[PromptRecord]) -> dict[str, float]:
        """Headline ('' key) = GenEval overall (mean of per-tag strict accuracy), plus per tag."""
        s = summarize(zip(metadata, [bool(c) for c in output.details["strict"].tolist()]))
        out = {"": s.overall, "dense": float(output.details["dense"].mean())}
        out |= {f"tag/{k}": v for k, v in s.per_tag.items()}
        return out
