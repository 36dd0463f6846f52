"""PickScore (Kirstain et al. 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic human preferences.

score = exp(logit_scale) * cos(image embedding, prompt embedding), with logit_scale read from the
checkpoint. Raw values are about 20-24; FlowGRPO trains on score / 26 (``scale: 1/26``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from flowrl.registry import register
from flowrl.rewards.base import as_float_images, check_batch
from flowrl.rewards.clip_common import (
    check_tokenizer_fits,
    load_clip_model,
    load_clip_tokenizer,
    logit_scale,
    paired_cosine,
    preprocess_spec,
)
from flowrl.rewards.models import ModelRewardConfig, RewardInfo, resolve_device
from flowrl.types import RewardOutput

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


@register("reward", "pickscore")
class PickScoreReward:
    """PickScore of each (image, prompt) pair."""

    info = RewardInfo(
        measures="human preference for an image given its prompt (Pick-a-Pic), about 20-24",
        model=DEFAULT_MODEL,
        licence="MIT code; the weights declare no licence",
    )

    class Config(ModelRewardConfig):
        kind: Literal["pickscore"] = "pickscore"
        processor: str = Field(
            DEFAULT_PROCESSOR,
            description="Local folder or hub id of the tokenizer and preprocessor config (PickScore uses "
            "the LAION ViT-H/14 one).",
        )

    def __init__(self, config: Config | None = None):
        self.config = config or self.Config()
        device = resolve_device(self.config.device)
        model = self.config.model or DEFAULT_MODEL
        self.model = load_clip_model(model, "pickscore", device, self.config.dtype)
        self.tokenizer = load_clip_tokenizer(self.config.processor, "pickscore", field="processor")
        check_tokenizer_fits(self.tokenizer, self.model, self.config.processor, model)
        self.preprocess = preprocess_spec(self.config.processor, self.model.config.vision_config.image_size)
        self.logit_scale = logit_scale(self.model)

    def __call__(self, images, prompts: Sequence[str], metadata: Sequence[object] = ()) -> RewardOutput:
        """Scores [B] float32 = exp(logit_scale) * cosine, for images [B, 3, H, W] in [0, 1].

        Details: 'cosine' [B], the unscaled cosine similarity.
        """
        images = as_float_images(images)
        check_batch(images, prompts, metadata)
        cosine = paired_cosine(self.model, self.tokenizer, self.preprocess, images, prompts, self.config.batch_size)
        return RewardOutput(scores=self.logit_scale * cosine, details={"cosine": cosine})
