"""Policy-gradient objectives over likelihood estimates: epg, epg-noratio, pepg, par, grpo.

Notation: l = one Monte-Carlo term of a sample's log-likelihood estimate, A = advantage [B],
rho = exp(l_theta - l_old), sg = stop-gradient. Each per-sample loss is a small pure function; a
stage turns one `LikelihoodTerms` into ``weight * (mean_B(loss) + beta * mean_B(kl))``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from flowrl.kl import KLConfig
from flowrl.registry import register
from flowrl.types import LikelihoodTerms, LossOutput

#: LikelihoodTerms fields every likelihood-ratio objective needs (both estimators provide them).
RATIO_FIELDS: frozenset[str] = frozenset({"l_theta", "l_old", "kl"})


# ------------------------------------------------------------------------------- pure functions


def log_ratio(l_theta: Tensor, l_old: Tensor) -> Tensor:
    """log rho = l_theta - l_old, [B] (carries l_theta's grad)."""
    return l_theta - l_old.detach()


def epg_loss(l_theta: Tensor, l_old: Tensor, adv: Tensor) -> Tensor:
    """EPG: -sg(rho) A l_theta, [B]."""
    rho = log_ratio(l_theta, l_old).detach().exp()
    return -rho * adv * l_theta


def epg_noratio_loss(l_theta: Tensor, adv: Tensor) -> Tensor:
    """EPG without ratio (REINFORCE): -A l_theta, [B]."""
    return -adv * l_theta


def pepg_loss(l_theta: Tensor, l_old: Tensor, adv: Tensor) -> Tensor:
    """PEPG: -sg(rho) (A - sg(log rho)) l_theta, [B].

    Its gradient equals PAR's: the sg(log rho) shift is PAR's pull toward the old policy.
    """
    lr = log_ratio(l_theta, l_old).detach()
    return -lr.exp() * (adv - lr) * l_theta


def par_loss(l_theta: Tensor, l_old: Tensor, adv: Tensor) -> Tensor:
    """PAR: 0.5 sg(rho) (A - (l_theta - l_old))^2, [B]."""
    lr = log_ratio(l_theta, l_old)
    return 0.5 * lr.detach().exp() * (adv - lr) ** 2


def grpo_loss(l_theta: Tensor, l_old: Tensor, adv: Tensor, clip_range: float) -> tuple[Tensor, Tensor]:
    """GRPO / PPO-clip: max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) with rho carrying grad.

    Returns:
        (loss [B], clipped [B] bool): `clipped` marks samples whose gradient the clip cut, i.e.
        A > 0 with rho > 1 + eps or A < 0 with rho < 1 - eps.
    """
    rho = log_ratio(l_theta, l_old).exp()
    unclipped = -adv * rho
    clipped_val = -adv * rho.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped_val)
    cut = ((adv > 0) & (rho > 1 + clip_range)) | ((adv < 0) & (rho < 1 - clip_range))
    return loss, cut.detach()


def ratio_metrics(l_theta: Tensor, l_old: Tensor) -> dict[str, float]:
    """ratio_mean/min/max and approx_kl = mean((rho - 1) - log rho) as floats."""
    lr = log_ratio(l_theta, l_old).detach().float()
    rho = lr.exp()
    return {
        "ratio_mean": rho.mean().item(),
        "ratio_min": rho.min().item(),
        "ratio_max": rho.max().item(),
        "approx_kl": ((rho - 1) - lr).mean().item(),
    }


def finish(per_sample: Tensor, terms: LikelihoodTerms, kl: KLConfig, clip_frac: float = 0.0) -> LossOutput:
    """weight * (mean_B(per_sample) + beta * mean_B(kl)) with the shared diagnostics."""
    kl_mean = terms.kl.mean()
    loss = terms.weight * (per_sample.mean() + kl.beta * kl_mean)
    metrics = ratio_metrics(terms.l_theta, terms.l_old)
    metrics.update(clip_frac=float(clip_frac), kl=kl_mean.detach().item(), loss=loss.detach().item())
    return LossOutput(loss=loss, metrics=metrics)


def requirement_problem(objective: type, estimator: type) -> str | None:
    """Why `estimator` cannot feed `objective` (fields it needs but the estimator does not fill), with
    the fix; None when it can. Both are registered stage classes (``requires`` / ``provides``)."""
    needs: frozenset[str] = getattr(objective, "requires", RATIO_FIELDS)
    has: frozenset[str] | None = getattr(estimator, "provides", None)
    if has is None or needs <= has:
        return None
    o_name = getattr(objective, "stage_name", objective.__name__)
    e_name = getattr(estimator, "stage_name", estimator.__name__)
    missing = ", ".join(sorted(needs - has))
    return (
        f"objective {o_name!r} needs {missing} from the likelihood estimator, which {e_name!r} does not "
        "provide; use estimator.kind: elbo (it provides velocities), or a likelihood-ratio objective "
        "(epg, epg-noratio, pepg, par, grpo)"
    )


# ------------------------------------------------------------------------------------- stages


class ObjectiveConfig(BaseModel):
    """Base of every objective's Config: the KL-to-reference term they all add."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kl: KLConfig = Field(default_factory=KLConfig, description="KL to the reference policy.")


class Objective:
    """Shared constructor of the built-in objectives.

    Call: ``objective(terms: LikelihoodTerms, advantages: Tensor [B]) -> LossOutput``.
    """

    #: LikelihoodTerms fields the objective reads (the graph check compares with the estimator's).
    requires: ClassVar[frozenset[str]] = RATIO_FIELDS

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()  # type: ignore[attr-defined]


@register("objective", "epg")
class EPG(Objective):
    """Exact policy gradient with importance ratio: -sg(rho) A l_theta."""

    class Config(ObjectiveConfig):
        kind: Literal["epg"] = "epg"

    def __call__(self, terms: LikelihoodTerms, advantages: Tensor) -> LossOutput:
        return finish(epg_loss(terms.l_theta, terms.l_old, advantages), terms, self.config.kl)


@register("objective", "epg-noratio")
class EPGNoRatio(Objective):
    """REINFORCE: -A l_theta."""

    class Config(ObjectiveConfig):
        kind: Literal["epg-noratio"] = "epg-noratio"

    def __call__(self, terms: LikelihoodTerms, advantages: Tensor) -> LossOutput:
        return finish(epg_noratio_loss(terms.l_theta, advantages), terms, self.config.kl)


@register("objective", "pepg")
class PEPG(Objective):
    """The paper's objective: -sg(rho) (A - sg(log rho)) l_theta."""

    class Config(ObjectiveConfig):
        kind: Literal["pepg"] = "pepg"

    def __call__(self, terms: LikelihoodTerms, advantages: Tensor) -> LossOutput:
        return finish(pepg_loss(terms.l_theta, terms.l_old, advantages), terms, self.config.kl)


@register("objective", "par")
class PAR(Objective):
    """Policy advantage regression: 0.5 sg(rho) (A - log rho)^2."""

    class Config(ObjectiveConfig):
        kind: Literal["par"] = "par"

    def __call__(self, terms: LikelihoodTerms, advantages: Tensor) -> LossOutput:
        return finish(par_loss(terms.l_theta, terms.l_old, advantages), terms, self.config.kl)


@register("objective", "grpo")
class GRPO(Objective):
    """PPO-clip: max(-A rho, -A clip(rho, 1 - eps, 1 + eps))."""

    class Config(ObjectiveConfig):
        kind: Literal["grpo"] = "grpo"
        clip_range: float = Field(1e-3, gt=0, description="PPO clip eps (FlowGRPO uses 1e-4).")

    def __call__(self, terms: LikelihoodTerms, advantages: Tensor) -> LossOutput:
        loss, cut = grpo_loss(terms.l_theta, terms.l_old, advantages, self.config.clip_range)
        return finish(loss, terms, self.config.kl, clip_frac=cut.float().mean().item())
