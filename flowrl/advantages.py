"""Advantages from rewards: per-prompt grouping, normalisation, multi-reward aggregation.

Images of the same prompt share a group id; an advantage compares an image's reward with the mean
of its group. Groups may have any sizes (a size-1 group gets advantage 0). In distributed runs the
trainer gathers rewards and group ids of every rank before calling a stage, so statistics are over
the global batch.

Stages (kind "advantage"): ``exact`` (the paper's: (beta / alpha) (r - group mean), no std) and
``standard`` ((r - group mean) / (std + eps), std per group or over the batch, clipped).
Call: ``advantage(rewards: Tensor [B], group_ids: Tensor [B] int64) -> Tensor [B]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from flowrl.errors import FlowrlError
from flowrl.registry import register

AggregationMode = Literal["sum-then-normalize", "normalize-then-sum"]


# ------------------------------------------------------------------------------- pure functions


def _check(rewards: Tensor, group_ids: Tensor) -> None:
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [B]; got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )


def group_mean(values: Tensor, group_ids: Tensor) -> Tensor:
    """Each element's group mean, [B] (float).

    Args:
        values: [B].
        group_ids: int [B]; any ids, any group sizes.
    """
    _check(values, group_ids)
    values = values.float()
    _, inv = torch.unique(group_ids, return_inverse=True)
    n = int(inv.max()) + 1 if inv.numel() else 0
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, inv, values)
    counts = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, inv, torch.ones_like(values))
    return (sums / counts)[inv]


def group_std(values: Tensor, group_ids: Tensor) -> Tensor:
    """Each element's group standard deviation (population, ddof 0; a size-1 group gives 0), [B]."""
    centred = values.float() - group_mean(values, group_ids)
    return group_mean(centred**2, group_ids).sqrt()


def exact_advantages(rewards: Tensor, group_ids: Tensor, beta: float = 1e-4, alpha: float = 1e-3) -> Tensor:
    """The paper's advantage (beta / alpha) (r - group mean), no std, [B]."""
    return (beta / alpha) * (rewards.float() - group_mean(rewards, group_ids))


def standard_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    std: Literal["group", "global"] = "group",
    clip: float = 5.0,
    eps: float = 1e-4,
) -> Tensor:
    """(r - group mean) / (std + eps), clipped to [-clip, clip], [B].

    Args:
        rewards: [B].
        group_ids: int [B].
        std: "group" divides by the std of the image's own group; "global" by the std of all
            rewards of the batch (FlowGRPO's global-std; robust for groups whose rewards all tie).
        clip: bound of |A|.
        eps: added to the std so tied groups give 0, not NaN.
    """
    r = rewards.float()
    scale = group_std(r, group_ids) if std == "group" else r.std(unbiased=False).expand_as(r)
    return ((r - group_mean(r, group_ids)) / (scale + eps)).clamp(-clip, clip)


def aggregate(
    scores: Mapping[str, Tensor],
    weights: Mapping[str, float],
    mode: AggregationMode,
    normalize: Callable[[Tensor], Tensor],
) -> Tensor:
    """Advantages of several named rewards, [B].

    Args:
        scores: reward name -> [B] scores.
        weights: reward name -> weight; must name exactly the rewards in `scores`.
        mode: "sum-then-normalize" (weighted sum of scores, then one advantage) or
            "normalize-then-sum" (one advantage per reward, then their weighted sum; no reward
            dominates through its scale).
        normalize: rewards [B] -> advantages [B], e.g. ``lambda r: stage(r, group_ids)``.

    Raises:
        FlowrlError: scores and weights name different rewards, or no reward is given.
    """
    if not scores:
        raise FlowrlError("no rewards to aggregate; list at least one reward under `rewards:`")
    if set(scores) != set(weights):
        raise FlowrlError(
            f"rewards and weights name different rewards: scores {sorted(scores)}, weights {sorted(weights)}; "
            "give every reward exactly one weight"
        )
    if mode == "sum-then-normalize":
        return normalize(sum(weights[k] * scores[k].float() for k in scores))
    if mode == "normalize-then-sum":
        return sum(weights[k] * normalize(scores[k].float()) for k in scores)
    raise FlowrlError(f"unknown reward aggregation {mode!r}; use sum-then-normalize or normalize-then-sum")


# ------------------------------------------------------------------------------------- stages


@register("advantage", "exact")
class ExactAdvantage:
    """A = (beta / alpha) (r - group mean); beta = 1e-4, alpha = 1e-3 give 0.1 (r - r_bar)."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        kind: Literal["exact"] = "exact"
        beta: float = Field(1e-4, gt=0, description="KL weight of the regularised objective the advantage comes from.")
        alpha: float = Field(1e-3, gt=0, description="Temperature; the advantage scale is beta / alpha.")

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()

    def __call__(self, rewards: Tensor, group_ids: Tensor) -> Tensor:
        return exact_advantages(rewards, group_ids, self.config.beta, self.config.alpha)


@register("advantage", "standard")
class StandardAdvantage:
    """A = clip((r - group mean) / (std + eps), -clip, clip), std per group or global."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        kind: Literal["standard"] = "standard"
        std: Literal["group", "global"] = Field("group", description="Std of the image's group, or of the whole batch.")
        clip: float = Field(5.0, gt=0, description="Advantages are clipped to [-clip, clip].")
        eps: float = Field(1e-4, gt=0, description="Added to the std (tied groups give 0, not NaN).")

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()

    def __call__(self, rewards: Tensor, group_ids: Tensor) -> Tensor:
        c = self.config
        return standard_advantages(rewards, group_ids, c.std, c.clip, c.eps)
