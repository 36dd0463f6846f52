"""GenEval as a reward stage: detector backend -> (CLIP colours) -> judge -> dense or strict score.

Backends (see ``docs/rewards-geneval.md``):

* ``shapes``: the embedded toy world's classical detector; colours come with its detections.
* ``hf-mask2former``: Mask2Former Swin-S (COCO instance) through transformers, default
  ``facebook/mask2former-swin-small-coco-instance``; colours from CLIP ViT-L/14.
* ``mmdet``: GenEval's official mmdet 2.x detector from a local config and checkpoint (extra
  ``flowrl[mmdet]``); colours from CLIP ViT-L/14.

Thresholds, the per-class cap and both scoring rules are :mod:`flowrl.rewards.geneval.scoring`'s
(GenEval's official values); the backends only produce raw detections.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, model_validator

from flowrl.errors import FlowrlError
from flowrl.registry import register
from flowrl.rewards.base import as_float_images, check_batch
from flowrl.rewards.clip_common import model_key
from flowrl.rewards.geneval.colors import DEFAULT_CLIP_MODEL, color_detections, load_color_classifier
from flowrl.rewards.geneval.detectors.base import Detector, ShapesBackend
from flowrl.rewards.geneval.detectors.mask2former import DEFAULT_MODEL as MASK2FORMER_DEFAULT
from flowrl.rewards.geneval.detectors.mask2former import Mask2FormerDetector, load_mask2former
from flowrl.rewards.geneval.metadata import PromptRecord
from flowrl.rewards.geneval.scoring import COUNTING_THRESHOLD, THRESHOLD, judge
from flowrl.rewards.geneval.summary import summarize
from flowrl.rewards.models import DTYPES, ModelRewardConfig, RewardInfo, resolve_device, shared
from flowrl.types import RewardOutput

DEFAULT_DETECTOR = MASK2FORMER_DEFAULT
DEFAULT_CLIP = DEFAULT_CLIP_MODEL

# Fields only some backends read; setting one for another backend is a contradiction, not a no-op.
_BACKEND_FIELDS = {
    "model": ("hf-mask2former",),
    "detector_config": ("mmdet",),
    "detector_checkpoint": ("mmdet",),
    "clip_model": ("hf-mask2former", "mmdet"),
}


@register("reward", "geneval")
class GenEvalReward:
    """GenEval with a pluggable detector. `shapes` is the embedded toy world's detector."""

    info = RewardInfo(
        measures="GenEval compositional correctness: objects, counts, colours, positions (dense 0-1 or strict)",
        model=f"shapes (toy, built in); {DEFAULT_DETECTOR} + {DEFAULT_CLIP}; or GenEval's mmdet Mask2Former",
        licence="GenEval rules MIT; Mask2Former (Meta) and OpenAI CLIP weights under their own terms",
        extra="",  # the default backend/engine needs nothing beyond the default install
    )

    class Config(ModelRewardConfig):
        kind: Literal["geneval"] = "geneval"
        backend: Literal["shapes", "hf-mask2former", "mmdet"] = Field(
            "shapes",
            description="Detector: 'shapes' (toy world), 'hf-mask2former' (transformers), 'mmdet' (GenEval's own).",
        )
        signal: Literal["dense", "strict"] = Field(
            "dense", description="Training score: the dense reward, or 1/0 strict correctness."
        )
        model: str | None = Field(
            None,
            description=f"hf-mask2former: local folder or hub id of the detector (default {DEFAULT_DETECTOR}).",
        )
        detector_config: str | None = Field(
            None, description="mmdet: path of the mmdet config (.py), e.g. GenEval's Mask2Former Swin-S config."
        )
        detector_checkpoint: str | None = Field(None, description="mmdet: path of the detector weights (.pth).")
        clip_model: str | None = Field(
            None, description=f"Colour classifier: local folder or hub id of a CLIP model (default {DEFAULT_CLIP})."
        )

        @model_validator(mode="after")
        def _fields_match_backend(self):
            problems = []
            for name, backends in _BACKEND_FIELDS.items():
                if getattr(self, name) is not None and self.backend not in backends:
                    problems.append(
                        f"`{name}` is only read by backend {' / '.join(backends)}, but backend is "
                        f"{self.backend!r}; remove `{name}` or change `backend`"
                    )
            if self.backend == "mmdet":
                missing = [f for f in ("detector_config", "detector_checkpoint") if getattr(self, f) is None]
                if missing:
                    problems.append(
                        f"backend 'mmdet' needs {' and '.join(missing)}: local paths of the mmdet config (.py) and "
                        "checkpoint (.pth), e.g. from `mim download mmdet --config "
                        "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco --dest <folder>`"
                    )
            if problems:
                raise ValueError("; ".join(problems))
            return self

    def __init__(self, config: Config | None = None):
        self.config = config or self.Config()
        self.detector, self.colors = _build(self.config)

    def __call__(self, images, prompts: Sequence[str], metadata: Sequence[object]) -> RewardOutput:
        """Scores [B] and details {'strict': [B], 'dense': [B]} for images [B, 3, H, W] in [0, 1].

        Raises:
            FlowrlError: when a prompt has no GenEval metadata (plain-text prompt sets), or names a
                class the detector cannot detect.
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
        _check_classes(records, self.detector.class_names, self.config.backend)
        detections = self.detector(images)
        if self.colors is not None:
            detections = color_detections(self.colors, images, detections, records)
        judgements = [judge(r, d) for r, d in zip(records, detections, strict=True)]
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


def _build(cfg: GenEvalReward.Config) -> tuple[Detector, object | None]:
    """The detector backend and, for the neural backends, the CLIP colour classifier."""
    if cfg.backend == "shapes":
        return ShapesBackend(), None
    device = resolve_device(cfg.device)
    # Nothing at or below the lowest threshold can ever count; dropping it early saves mask memory.
    keep_above = min(THRESHOLD, COUNTING_THRESHOLD)
    detector: Detector
    if cfg.backend == "hf-mask2former":
        model_id = cfg.model or DEFAULT_DETECTOR
        net, names = shared(
            ("geneval/mask2former", model_key(model_id), str(device), cfg.dtype),
            lambda: load_mask2former(model_id, device, DTYPES[cfg.dtype], cfg.label),
        )
        detector = Mask2FormerDetector(
            net, names, device=device, dtype=DTYPES[cfg.dtype], batch_size=cfg.batch_size, keep_above=keep_above
        )
    else:
        from flowrl.rewards.geneval.detectors.mmdet_adapter import MMDetDetector, load_mmdet

        config, checkpoint = cfg.detector_config, cfg.detector_checkpoint
        assert config is not None and checkpoint is not None  # the Config validator guarantees it
        model, infer, names = shared(
            ("geneval/mmdet", model_key(config), model_key(checkpoint), str(device)),
            lambda: load_mmdet(config, checkpoint, device),
        )
        detector = MMDetDetector(model, infer, names, batch_size=cfg.batch_size, keep_above=keep_above)
    colors = load_color_classifier(cfg.clip_model or DEFAULT_CLIP, device, cfg.dtype, cfg.batch_size, cfg.label)
    return detector, colors


def _check_classes(records: Sequence[PromptRecord], class_names: Sequence[str], backend: str) -> None:
    """Refuse prompts naming a class the detector cannot report (it would silently score as absent)."""
    known = set(class_names)
    unknown = sorted({c.cls for r in records for c in (*r.include, *r.exclude)} - known)
    if unknown:
        hints = []
        for name in unknown[:5]:
            near = difflib.get_close_matches(name, class_names, n=1, cutoff=0.6)
            hints.append(f"{name!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        raise FlowrlError(
            f"the geneval reward's {backend!r} detector cannot detect {', '.join(hints)}; it knows "
            f"{len(class_names)} classes ({', '.join(list(class_names)[:6])}, ...). Use prompts made for this "
            "detector (GenEval's COCO classes for hf-mask2former/mmdet, the shapes world's for shapes) or "
            "switch `backend`"
        )
