"""DiffusionNFT: a negative-aware flow-matching objective on the ELBO estimator's re-noised x0.

The policy velocity is mixed with the old one into an implicit positive policy
v+ = g v_theta + (1 - g) v_old and negative policy v- = (1 + g) v_old - g v_theta; each sample
regresses v+ toward its x0 with weight r and v- with weight 1 - r, r the advantage mapped to [0, 1].
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import Tensor

from flowrl.flow import adaptive_x0_loss, noised
from flowrl.objectives.policy_gradient import Objective, ObjectiveConfig, finish
from flowrl.registry import register
from flowrl.types import LikelihoodTerms, LossOutput

#: NFT regresses velocities, so it needs the ELBO estimator's (x0, eps, t, v_theta, v_old).
VELOCITY_FIELDS: frozenset[str] = frozenset({"l_theta", "l_old", "kl", "t", "v_theta", "v_old", "x0", "eps"})


def nft_weight(adv: Tensor, adv_clip: float) -> Tensor:
    """r = clip(clip(A, -M, M) / M / 2 + 0.5, 0, 1), [B]: A = 0 -> 0.5, A >= M -> 1, A <= -M -> 0."""
    return (adv.clamp(-adv_clip, adv_clip) / adv_clip / 2 + 0.5).clamp(0, 1)


def implicit_policies(v_theta: Tensor, v_old: Tensor, strength: float) -> tuple[Tensor, Tensor]:
    """(v+, v-) = (g v_theta + (1 - g) v_old, (1 + g) v_old - g v_theta), each [B, C, h, w]."""
    v_old = v_old.detach()
    return strength * v_theta + (1 - strength) * v_old, (1 + strength) * v_old - strength * v_theta


def nft_loss(
    v_theta: Tensor, v_old: Tensor, x0: Tensor, eps: Tensor, t: Tensor, adv: Tensor, adv_clip: float, strength: float
) -> Tensor:
    """Per-sample NFT loss M (r L(v+) + (1 - r) L(v-)) / g, [B].

    L is the adaptive x0 regression loss at x_t = (1 - t) x0 + t eps.

    Args:
        v_theta: [B, C, h, w] with grad; v_old: [B, C, h, w]; x0, eps: [B, C, h, w]; t, adv: [B].
        adv_clip: M; strength: g.
    """
    x_t = noised(x0, eps, t)
    v_pos, v_neg = implicit_policies(v_theta, v_old, strength)
    r = nft_weight(adv, adv_clip).to(v_theta.dtype)
    pos, neg = adaptive_x0_loss(v_pos, x_t, x0, t), adaptive_x0_loss(v_neg, x_t, x0, t)
    return adv_clip * (r * pos + (1 - r) * neg) / strength


@register("objective", "nft")
class NFT(Objective):
    """DiffusionNFT. Call: ``objective(terms, advantages [B]) -> LossOutput``; needs the elbo
    estimator (velocities)."""

    class Config(ObjectiveConfig):
        kind: Literal["nft"] = "nft"
        adv_clip: float = Field(5.0, gt=0, description="M: advantages are clipped to +-M and mapped to [0, 1].")
        guidance_strength: float = Field(
            1.0,
            gt=0,
            description="g: mixing strength of the implicit policies. DiffusionNFT's base config and its "
            "GenEval, PickScore and HPSv2 configs use 1.0; its OCR and multi-reward configs 0.1.",
        )

    requires: ClassVar[frozenset[str]] = VELOCITY_FIELDS

    def __call__(self, terms: LikelihoodTerms, advantages: Tensor) -> LossOutput:
        cfg = self.config
        per = nft_loss(
            terms.v_theta, terms.v_old, terms.x0, terms.eps, terms.t, advantages, cfg.adv_clip, cfg.guidance_strength
        )
        return finish(per, terms, cfg.kl)
