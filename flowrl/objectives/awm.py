"""AWM (advantage-weighted matching): the flow-matching loss on the re-noised x0, weighted by A.

Two forms:
- ``weighting: uniform`` (METHOD.md's simplified AWM): loss = A mean((v_theta - u)^2), u = eps - x0.
- ``weighting: ghuber`` (AWM's released SD3 recipe, scxue/advantage_weighted_matching
  config/dgx_awm.py `geneval_sd3_no_cfg_1node`): the per-sample log-likelihood is
  l = -t ((mse + d)^p - d^p) / p with mse = mean((v_theta - u)^2) in float64, p = 0.25, d = 1e-10,
  and the loss -A l. AWM's PPO ratio exp(l - sg(l)) is 1 on-policy (its clip range 1 never acts), so
  the gradient is -A grad l, which is this loss's.

AWM's recipe also scales the advantage (clipped to +-5, then times 1/5: ``advantage_scale: 0.2``) and
adds, besides beta * KL to the reference, ``old_beta`` * mean((v_theta - v_old)^2): a pull toward
its slowly updated second adapter (flowrl's old policy with ``train.old`` rate 0.001, max 0.3).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from flowrl.flow import flow_matching_error
from flowrl.kl import girsanov
from flowrl.objectives.nft import VELOCITY_FIELDS
from flowrl.objectives.policy_gradient import Objective, ObjectiveConfig, finish
from flowrl.registry import register
from flowrl.types import LikelihoodTerms, LossOutput

#: AWM's generalized-Huber offset d: keeps (mse + d)^p differentiable at mse = 0.
GHUBER_OFFSET = 1e-10


def awm_loss(v_theta: Tensor, x0: Tensor, eps: Tensor, adv: Tensor) -> Tensor:
    """A mean((v_theta - (eps - x0))^2), [B]: positive A pulls v toward the target (raises the
    sample's ELBO), negative A pushes it away.

    Args:
        v_theta: [B, C, h, w] with grad; x0, eps: [B, C, h, w]; adv: [B].
    """
    fm = flow_matching_error(v_theta, x0, eps)
    return adv.to(fm.dtype) * fm


def ghuber_log_likelihood(v_theta: Tensor, x0: Tensor, eps: Tensor, t: Tensor, power: float) -> Tensor:
    """AWM's log-likelihood estimate l = -t ((mse + d)^p - d^p) / p, [B] float64.

    mse = mean((v_theta - (eps - x0))^2) over the non-batch dims, formed in float64 as AWM does;
    d = `GHUBER_OFFSET`. p = 1 gives -t mse; smaller p flattens the loss of large errors (a sample's
    gradient weight is t mse^(p - 1)).

    Args:
        v_theta: [B, C, h, w] with grad; x0, eps: [B, C, h, w]; t: [B]; power: p in (0, 1].
    """
    mse = ((v_theta.double() - (eps.double() - x0.double())) ** 2).flatten(1).mean(dim=1)
    d = torch.tensor(GHUBER_OFFSET, dtype=torch.float64)
    return -t.double() * ((mse + d) ** power - d**power) / power


@register("objective", "awm")
class AWM(Objective):
    """Call: ``objective(terms, advantages [B]) -> LossOutput``; needs the elbo estimator."""

    class Config(ObjectiveConfig):
        kind: Literal["awm"] = "awm"
        weighting: Literal["uniform", "ghuber"] = Field(
            "uniform",
            description="uniform: A mean((v - u)^2) (METHOD.md). ghuber: AWM's released recipe, "
            "-A l with l = -t ((mse + 1e-10)^p - 1e-10^p) / p.",
        )
        ghuber_power: float = Field(0.25, gt=0, le=1, description="p of the ghuber weighting (AWM: 0.25).")
        advantage_scale: float = Field(
            1.0, gt=0, description="Advantages are multiplied by this first (AWM: 0.2 = 1 / its clip 5)."
        )
        old_beta: float = Field(
            0.0,
            ge=0,
            description="Weight of mean((v_theta - v_old)^2), a pull toward the old policy (AWM: 1.0, with "
            "train.old rate 0.001 and max 0.3 as its second adapter's schedule).",
        )

    requires: ClassVar[frozenset[str]] = VELOCITY_FIELDS

    def __call__(self, terms: LikelihoodTerms, advantages: Tensor) -> LossOutput:
        cfg = self.config
        adv = advantages * cfg.advantage_scale
        if cfg.weighting == "ghuber":
            ll = ghuber_log_likelihood(terms.v_theta, terms.x0, terms.eps, terms.t, cfg.ghuber_power)
            per = (-adv.double() * ll).to(terms.v_theta.dtype)
        else:
            per = awm_loss(terms.v_theta, terms.x0, terms.eps, adv)
        if cfg.old_beta > 0:
            per = per + cfg.old_beta * girsanov(terms.v_theta, terms.v_old.detach())
        return finish(per, terms, cfg.kl)
