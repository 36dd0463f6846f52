"""A weighted mix of named rewards: every part is computed, transformed and kept for logging.

A pipeline's ``rewards:`` list becomes one `RewardMix`. Per batch the mix converts the images once,
runs every reward on them, applies each entry's ``scale`` then ``clip`` (`base.transform`) and
returns a `MixOutput` with the raw parts, the transformed scores and their weighted sum::

    total[i] = sum_k weight_k * clip_k(scale_k * raw_k[i])

What is logged (`mix_metrics`) and how advantages are formed (`mix_advantages`, both aggregation
modes of `flowrl.advantages.aggregate`) are pure functions of a `MixOutput`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flowrl import registry
from flowrl.advantages import AggregationMode, aggregate
from flowrl.errors import FlowrlError
from flowrl.rewards.base import RewardConfig, as_float_images, check_batch, transform
from flowrl.types import RewardOutput


@dataclass(frozen=True)
class MixOutput:
    """The verdict of every reward of a mix on one batch.

    Attributes:
        parts: label -> the reward's own output (raw scores [B], details each [B], failures).
        scores: label -> float32 [B], the raw scores after that entry's scale and clip.
        weights: label -> weight in the sum.
        total: float32 [B], sum over labels of weight * transformed score.
    """

    parts: Mapping[str, RewardOutput]
    scores: Mapping[str, Tensor]
    weights: Mapping[str, float]
    total: Tensor

    @property
    def labels(self) -> tuple[str, ...]:
        """The rewards' labels, in the order of the ``rewards:`` list."""
        return tuple(self.parts)


# ------------------------------------------------------------------------------- pure functions


def check_labels(configs: Sequence[RewardConfig]) -> None:
    """Refuse an empty list or two entries logged under the same label.

    Raises:
        FlowrlError: no entry, or a repeated label (naming it and how to tell the entries apart).
    """
    if not configs:
        raise FlowrlError("a reward mix needs at least one reward; list one under `rewards:`")
    labels = [c.label for c in configs]
    dups = sorted({x for x in labels if labels.count(x) > 1})
    if dups:
        raise FlowrlError(
            f"two rewards are labelled {dups[0]!r}; give each entry a distinct `name` "
            f"(e.g. `name: {dups[0]}-2`) so their scores are logged apart"
        )


def weighted_total(scores: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """sum_k weights[k] * scores[k], float32 [B] (labels in the order of `scores`)."""
    return sum(weights[k] * scores[k].float() for k in scores)  # type: ignore[return-value]


def check_part(label: str, out: RewardOutput, batch: int) -> None:
    """A reward's output must hold finite scores [B] and details [B].

    Raises:
        FlowrlError: naming the reward, what it returned and what a reward must return.
    """
    if not isinstance(out, RewardOutput):
        raise FlowrlError(f"reward {label!r} returned {type(out).__name__}; a reward must return a RewardOutput")
    if tuple(out.scores.shape) != (batch,):
        raise FlowrlError(
            f"reward {label!r} returned scores of shape {tuple(out.scores.shape)} for {batch} images; "
            f"a reward must return one score per image, shape ({batch},)"
        )
    for name, value in out.details.items():
        if tuple(value.shape) != (batch,):
            raise FlowrlError(
                f"reward {label!r} returned detail {name!r} of shape {tuple(value.shape)} for {batch} images; "
                f"details must be per image, shape ({batch},)"
            )
    bad = int((~torch.isfinite(out.scores.float())).sum())
    if bad:
        raise FlowrlError(
            f"reward {label!r} returned {bad} non-finite score(s) (NaN or inf) out of {batch}; a reward must "
            "count images it could not score in `failures` and give them a finite score, never NaN"
        )


def combine(parts: Mapping[str, RewardOutput], configs: Mapping[str, RewardConfig]) -> MixOutput:
    """Transform each part as its config says and sum them with the configs' weights.

    Args:
        parts: label -> raw output, scores [B].
        configs: label -> the entry's config (weight, scale, clip); same labels as `parts`.
    """
    scores = {k: transform(out.scores.float(), configs[k]) for k, out in parts.items()}
    weights = {k: float(configs[k].weight) for k in parts}
    return MixOutput(parts=dict(parts), scores=scores, weights=weights, total=weighted_total(scores, weights))


def mix_metrics(out: MixOutput) -> dict[str, float]:
    """What the trainer logs for one batch.

    Keys: ``reward/<label>`` mean raw score of each part; ``reward/<label>/<detail>`` mean of each
    detail; ``reward/<label>/failures`` count of images the reward could not score (only when
    non-zero); ``reward/mean`` mean of the weighted total of transformed scores.
    """
    logged = {f"reward/{k}": float(o.scores.float().mean()) for k, o in out.parts.items()}
    logged["reward/mean"] = float(out.total.mean())
    for k, o in out.parts.items():
        for name, value in o.details.items():
            logged[f"reward/{k}/{name}"] = float(value.float().mean())
        if o.failures:
            logged[f"reward/{k}/failures"] = o.failures
    return logged


def mix_advantages(out: MixOutput, mode: AggregationMode, normalize: Callable[[Tensor], Tensor]) -> Tensor:
    """Advantages [B] of a mix: `aggregate` over its transformed scores and weights.

    Args:
        out: the mix's output on the batch.
        mode: "sum-then-normalize" normalises the weighted total; "normalize-then-sum" normalises
            each transformed score, then sums with the weights.
        normalize: rewards [B] -> advantages [B], e.g. ``lambda r: stage(r, group_ids)``.
    """
    return aggregate(out.scores, out.weights, mode, normalize)


# ------------------------------------------------------------------------------------- the mix


class RewardMix:
    """The rewards of a pipeline, built once, called together.

    Iterating a mix yields its reward stages in list order (each has ``.config``), so code that
    needs one reward at a time (evaluation summaries) can still reach them.

    Args:
        configs: validated reward configs (subclasses of `RewardConfig`), e.g. a resolved
            pipeline's ``rewards``.
        build: config -> reward stage; by default the registered class of ``config.kind`` (or the
            user's "package.module:Class") constructed with the config.

    Raises:
        FlowrlError: no config, a duplicated label, or an unknown reward kind.
    """

    def __init__(self, configs: Sequence[RewardConfig], build: Callable[[RewardConfig], Any] | None = None):
        configs = tuple(configs)
        check_labels(configs)
        make = build or (lambda c: registry.lookup("reward", c.kind)(c))
        self.configs: Mapping[str, RewardConfig] = {c.label: c for c in configs}
        self.rewards: tuple[Any, ...] = tuple(make(c) for c in configs)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.configs)

    @property
    def weights(self) -> dict[str, float]:
        return {k: float(c.weight) for k, c in self.configs.items()}

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rewards)

    def __len__(self) -> int:
        return len(self.rewards)

    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[object] = ()) -> MixOutput:
        """Score a batch with every reward.

        Args:
            images: [B, 3, H, W] floats in [0, 1] on any device (or uint8 [B, H, W, 3], PIL
                images); converted once to float32 on the CPU for all rewards.
            prompts: B prompts.
            metadata: B per-prompt records (GenEval), or empty.

        Returns:
            MixOutput with raw parts, transformed scores [B] and the weighted total [B].
        """
        images = as_float_images(images)
        check_batch(images, prompts, metadata)
        parts = {}
        for label, reward in zip(self.configs, self.rewards, strict=True):
            out = reward(images, prompts, metadata)
            check_part(label, out, images.shape[0])
            parts[label] = out
        return combine(parts, self.configs)

    def advantages(self, out: MixOutput, mode: AggregationMode, normalize: Callable[[Tensor], Tensor]) -> Tensor:
        """`mix_advantages` of this mix's output (see there)."""
        return mix_advantages(out, mode, normalize)




def split_reward_names(text: str) -> tuple[str, ...]:
    """'geneval, clipscore' -> ('geneval', 'clipscore').

    Raises:
        FlowrlError: no name, or a name given twice.
    """
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise FlowrlError("--reward needs at least one reward name, e.g. --reward geneval or --reward ocr,clipscore")
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise FlowrlError(f"--reward names {dups[0]!r} twice; list each reward once")
    return tuple(names)


__all__ = [
    "MixOutput",
    "RewardMix",
    "check_labels",
    "check_part",
    "combine",
    "mix_advantages",
    "mix_metrics",
    "split_reward_names",
    "weighted_total",
]
