"""CLIPScore: cosine similarity between the CLIP ViT-L/14 embeddings of an image and its prompt.

score = cos(image embedding, prompt embedding) in [-1, 1] (= logits_per_image / 100 for OpenAI CLIP,
whose exp(logit_scale) is 100); about 0.2-0.35 for matching pairs. This is the raw cosine, not the
2.5 * max(cos, 0) of Hessel et al.'s evaluation metric.
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
    paired_cosine,
    preprocess_spec,
)
from flowrl.rewards.models import ModelRewardConfig, RewardInfo, resolve_device
from flowrl.types import RewardOutput

DEFAULT_MODEL = "openai/clip-vit-large-patch14"


@register("reward", "clipscore")
class ClipScoreReward:
    """CLIP image-prompt cosine of each (image, prompt) pair."""

    info = RewardInfo(
        measures="image-prompt agreement: CLIP ViT-L/14 cosine, about 0.2-0.35",
        model=DEFAULT_MODEL,
        licence="OpenAI CLIP, MIT code release",
    )

    class Config(ModelRewardConfig):
        kind: Literal["clipscore"] = "clipscore"
        processor: str | None = Field(
            None, description="Local folder or hub id of the tokenizer and preprocessor config (default: `model`)."
        )

    def __init__(self, config: Config | None = None):
        self.config = config or self.Config()
        device = resolve_device(self.config.device)
        model = self.config.model or DEFAULT_MODEL
        processor, field = (self.config.processor, "processor") if self.config.processor else (model, "model")
        self.model = load_clip_model(model, "clipscore", device, self.config.dtype)
        self.tokenizer = load_clip_tokenizer(processor, "clipscore", field=field)
        check_tokenizer_fits(self.tokenizer, self.model, processor, model)
        self.preprocess = preprocess_spec(processor, self.model.config.vision_config.image_size)

    def __call__(self, images, prompts: Sequence[str], metadata: Sequence[object] = ()) -> RewardOutput:
        """Scores [B] float32 = cos(image, prompt), for images [B, 3, H, W] in [0, 1]."""
        images = as_float_images(images)
        check_batch(images, prompts, metadata)
        cosine = paired_cosine(self.model, self.tokenizer, self.preprocess, images, prompts, self.config.batch_size)
        return RewardOutput(scores=cosine)
