"""Sampling the toy model through diffusers' own pipeline and scoring it with toy GenEval.

This is what `flowrl toy sample` and `make demo` run: prompts -> images (20-step Euler, the
pipeline's FlowMatchEulerDiscreteScheduler) -> shapes detector -> GenEval strict and dense scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flowrl.errors import ModelNotFoundError
from flowrl.rewards.geneval import GenEvalSummary, Judgement, PromptRecord, judge, summarize
from flowrl.toy.model import read_card

Progress = Callable[[int], None]


@dataclass(frozen=True)
class SampleSettings:
    """How images are drawn. Seeds are per image: image i of a run uses seed ``seed + i``."""

    steps: int = 20
    cfg: float = 1.0
    images_per_prompt: int = 4
    seed: int = 0
    batch: int = 64


@dataclass(frozen=True)
class ToyEval:
    """Images and verdicts of one sampling run.

    Attributes:
        images: float32 [N, 3, H, W] in [0, 1], N = len(records).
        records: the prompt record of each image (prompts repeated images_per_prompt times).
        judgements: GenEval verdict of each image.
        summary: per-tag and overall scores.
        settings: how the images were drawn.
    """

    images: torch.Tensor
    records: list[PromptRecord]
    judgements: list[Judgement]
    summary: GenEvalSummary
    settings: SampleSettings


def load_pipeline(model: str | Path):
    """Load a StableDiffusion3Pipeline offline on the CPU in float32 (see flowrl.policy.load_pipeline).

    Returns:
        (pipeline, card) where card is flowrl's build record ({} for other models).

    Raises:
        ModelNotFoundError: the folder does not exist or is not a diffusers pipeline folder.
    """
    from flowrl.policy import load_pipeline as load, resolve_model_path

    path = Path(resolve_model_path(str(model)))
    if not path.exists():
        raise ModelNotFoundError(
            f"no model folder at {path}. The embedded toy model ships in assets/toy-sd3; rebuild it "
            "with `flowrl toy pretrain --out DIR`."
        )
    return load(str(path)), read_card(path)


@torch.no_grad()
def sample(
    pipe,
    prompts: Sequence[str],
    settings: SampleSettings,
    max_sequence_length: int,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Draw one image per prompt with per-image seeded noise (independent of batching).

    Returns:
        float32 [len(prompts), 3, H, W] in [0, 1].
    """
    out = []
    for start in range(0, len(prompts), settings.batch):
        chunk = list(prompts[start : start + settings.batch])
        gens = [torch.Generator().manual_seed(settings.seed + start + i) for i in range(len(chunk))]
        images = pipe(
            chunk,
            num_inference_steps=settings.steps,
            guidance_scale=settings.cfg,
            generator=gens,
            max_sequence_length=max_sequence_length,
            output_type="pt",
        ).images
        out.append(images.float().clamp(0, 1))
        if progress is not None:
            progress(len(chunk))
    return torch.cat(out)


def score(images: torch.Tensor, records: Sequence[PromptRecord], detector=None) -> list[Judgement]:
    """GenEval verdicts of `images` [N, 3, H, W] for `records` (one per image) with the shapes
    detector."""
    from flowrl.toy.detector import ShapesDetector

    detector = detector or ShapesDetector()
    detections = detector(images)
    return [judge(r, d) for r, d in zip(records, detections, strict=True)]


def evaluate(
    model: str | Path,
    records: Sequence[PromptRecord],
    settings: SampleSettings = SampleSettings(),
    progress: Progress | None = None,
    pipe_and_card=None,
) -> ToyEval:
    """Sample `settings.images_per_prompt` images for each record and score them."""
    pipe, card = pipe_and_card or load_pipeline(model)
    expanded = [r for r in records for _ in range(settings.images_per_prompt)]
    images = sample(
        pipe, [r.prompt for r in expanded], settings, card.get("max_sequence_length", 256), progress
    )
    judgements = score(images, expanded)
    summary = summarize(zip(expanded, judgements))
    return ToyEval(images, expanded, judgements, summary, settings)
