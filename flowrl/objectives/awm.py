"""AWM (advantage-weighted matching): the flow-matching loss on the re-noised x0, weighted by A."""

from __future__ import annotations

from typing import ClassVar, Literal

from torch import Tensor

from flowrl.estimators.flow_matching import flow_matching_error

from flowrl.objectives.nft import VELOCITY_FIELDS
from flowrl.objectives.policy_gradient import Objective, ObjectiveConfig, finish
from flowrl.registry import register
from flowrl.types import LikelihoodTerms, LossOutput


def awm_loss(v_theta: Tensor, x0: Tensor, eps: Tensor, adv: Tensor) -> Tensor:
    """A mean((v_theta - (eps - x0))^2), [B]: positive A pulls v toward the target (raises the
    sample's ELBO), negative A pushes it away.

    Args:
        v_theta: [B, C, h, w] with grad; x0, eps: [B, C, h, w]; adv: [B].
    """
    fm = flow_matching_error(v_theta, x0, eps)
    return adv.to(fm.dtype) * fm


@register("objective", "awm")
class AWM(Objective):
    """Call: ``objective(terms, advantages [B]) -> LossOutput``; needs the elbo estimator."""

    class Config(ObjectiveConfig):
        kind: Literal["awm"] = "awm"

    requires: ClassVar[frozenset[str]] = VELOCITY_FIELDS - {"v_old"}

    def __call__(self, terms: LikelihoodTerms, advantages: Tensor) -> LossOutput:
        return finish(awm_loss(terms.v_theta, terms.x0, terms.eps, advantages), terms, self.config.kl)
