"""ELBO likelihood estimator: per-sample log-likelihood from the final sample x0 only.

Works with any sampler (ODE included). For each image, timesteps are drawn from the sampler's own
grid; each Monte-Carlo term re-noises x0 at one (t, eps) and scores it with a weighted
flow-matching loss. The SAME x_t feeds the policy (with grad), the old policy and the reference
(no grad): common random numbers make log rho = ELBO_theta - ELBO_old exactly 0 when the weights
agree, instead of a noisy difference of two independent estimates.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from flowrl.errors import FlowrlError
from flowrl.flow import adaptive_x0_loss, flow_matching_error, noised, x0_prediction
from flowrl.kl import ELBO_KL, KLConfig, check_kl, girsanov
from flowrl.registry import register
from flowrl.types import LikelihoodTerms, Rollout, VelocityModel, zeros_like_batch

Weighting = Literal["adaptive", "t", "uniform", "exact"]

#: Offset of the `exact` weight (1 - t) / (t + 1e-3), finite at t = 0 (METHOD.md).
_EXACT_OFFSET = 1e-3


# ------------------------------------------------------------------------------- pure functions


def elbo_weighted(
    v: Tensor, x_t: Tensor, x0: Tensor, eps: Tensor, t: Tensor, weighting: Weighting, guidance: float = 1.0
) -> Tensor:
    """One ELBO Monte-Carlo term (up to a constant) of each sample, [B].

    With u = eps - x0 and means over the non-batch dims:
        adaptive: -mean((x0_hat - x0)^2) / sg(mean|x0_hat - x0|), divided by g = `guidance`
        t: -mean((x0_hat - x0)^2)  (= -t^2 mean((v - u)^2))
        uniform: -mean((v - u)^2), divided by g^2
        exact: -((1 - t) / (t + 1e-3)) mean((v - u)^2)

    The CFG divisions are the paper's code's (`compute_elbo`): with g != 1 the guided velocity's
    error grows about like g, so the adaptive term (error^2 / |error|) is divided by g and the
    uniform one (error^2) by g^2; `t` and `exact` are left undivided there, and so here.

    Args:
        v: [B, C, h, w] velocity at (x_t, t).
        x_t: [B, C, h, w] the noised sample the velocity was computed at.
        x0: [B, C, h, w] the clean sample.
        eps: [B, C, h, w] the noise of x_t.
        t: [B] times.
        weighting: one of the four above.
        guidance: the CFG scale g the velocity was computed with (adaptive and uniform).

    Returns:
        [B] log-likelihood estimate (higher is more likely).
    """
    if weighting == "adaptive":
        out = -adaptive_x0_loss(v, x_t, x0, t)
        # METHOD.md: with CFG on, the adaptive term is divided by the CFG scale.
        return out / guidance if guidance != 1.0 else out
    if weighting == "t":
        return -((x0_prediction(v, x_t, t) - x0) ** 2).flatten(1).mean(dim=1)
    fm = flow_matching_error(v, x0, eps)
    if weighting == "uniform":
        return -fm / guidance**2 if guidance != 1.0 else -fm
    if weighting == "exact":
        return -((1 - t.to(fm.dtype)) / (t.to(fm.dtype) + _EXACT_OFFSET)) * fm
    raise ValueError(f"unknown ELBO weighting {weighting!r}; use adaptive, t, uniform or exact")


def num_terms(n_grid: int, fraction: float) -> int:
    """Timesteps kept per image: ``max(1, int(n_grid * fraction))``, exactly the paper's (and
    FlowGRPO's and DiffusionNFT's) expression: 10 x 0.99 -> 9.

    The float product is truncated as those codes truncate it, so 100 x 0.29 = 28.999999999999996
    keeps 28 there and here; guarding it to 29 would train a step the reference recipes do not.
    """
    return max(1, min(n_grid, int(n_grid * fraction)))


def times_in_range(grid: Tensor, t_range: tuple[float, float]) -> Tensor:
    """The grid times [N] with lo <= t <= hi (to 1e-6), in grid order: [M], M >= 1.

    Raises:
        FlowrlError: no grid time in the range (naming the grid, so the fix is plain).
    """
    lo, hi = t_range
    keep = grid[(grid >= lo - 1e-6) & (grid <= hi + 1e-6)]
    if keep.numel() == 0:
        times = ", ".join(f"{float(t):.3g}" for t in grid)
        raise FlowrlError(
            f"estimator.t_range [{lo:g}, {hi:g}] holds none of the sampler's grid times ({times}); widen it "
            "to include at least one of them"
        )
    return keep


def group_index(group_ids: Tensor) -> tuple[int, Tensor]:
    """(number of distinct groups G, each image's group position in sorted-id order int64 [B]):
    rows of a per-group tensor [G, ...] indexed by it expand to the images [B, ...]."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return int(inverse.max()) + 1 if inverse.numel() else 0, inverse


def draw_timestep_indices(batch: int, n_grid: int, k: int, generator: torch.Generator) -> Tensor:
    """A random permutation of range(n_grid) per image, first k kept: int64 [B, k] (no repeats
    within an image)."""
    keys = torch.rand(batch, n_grid, generator=generator, device=generator.device)
    return keys.argsort(dim=1)[:, :k]


# ------------------------------------------------------------------------------------- the stage


class ElboConfig(BaseModel):
    """Config of the ELBO estimator."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["elbo"] = "elbo"
    weighting: Weighting = Field("adaptive", description="ELBO weighting of the flow-matching loss.")
    timestep_fraction: float = Field(
        0.99, gt=0, le=1, description="Share of the sampler's N grid times used per image (floor, at least 1)."
    )
    guidance: float = Field(1.0, gt=0, description="CFG scale of the velocities (1 = off).")
    t_range: tuple[float, float] = Field(
        (0.0, 1.0),
        description="[lo, hi]: only the sampler's grid times with lo <= t <= hi are drawn (the fraction "
        "applies to those). The default keeps the whole grid. Narrow it to spend the ELBO's terms where "
        "the gradient's signal is (benchmarks/grad_snr.py measures that per time).",
    )
    noise: Literal["per-image", "per-group"] = Field(
        "per-image",
        description="per-image: a fresh (t, eps) per image and term (the paper). per-group: the images of "
        "one prompt share each term's (t, eps). Still unbiased per image, but the group's advantages sum "
        "to zero, so the part of the ELBO gradient that the shared noise makes common cancels: a "
        "lower-variance policy gradient for the same compute. Needs whole groups in each micro-batch "
        "(the trainer keeps them whole).",
    )

    @field_validator("t_range")
    @classmethod
    def _ordered_unit_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"t_range must be [lo, hi] with 0 <= lo <= hi <= 1, got [{lo:g}, {hi:g}]")
        return v


@register("estimator", "elbo")
class ElboEstimator:
    """ELBO estimator; yields one `LikelihoodTerms` per drawn timestep (K terms, weight 1/K).

    Call: ``estimator(rollout, model, kl, generator) -> Iterator[LikelihoodTerms]``; every field of
    LikelihoodTerms is filled, including the velocities the NFT/AWM objectives need.
    """

    Config = ElboConfig
    #: LikelihoodTerms fields this estimator fills (objectives declare what they need).
    provides: ClassVar[frozenset[str]] = frozenset({"l_theta", "l_old", "kl", "t", "v_theta", "v_old", "x0", "eps"})

    def __init__(self, config: ElboConfig | None = None):
        self.config = config if config is not None else ElboConfig()

    def __call__(
        self, rollout: Rollout, model: VelocityModel, kl: KLConfig | None, generator: torch.Generator
    ) -> Iterator[LikelihoodTerms]:
        """Yield the K Monte-Carlo terms of the batch, one at a time.

        Args:
            rollout: the samples; uses x0 [B, C, h, w], sigmas [T + 1] and cond.
            model: policy access; "policy" is called with grad, "old"/"ref" without.
            kl: the objective's KL config (None: no KL term).
            generator: source of the timestep permutations and the noise (on any device).

        Yields:
            LikelihoodTerms with l_theta/l_old/kl/t [B], weight 1/K, v_theta/v_old/x0/eps
            [B, C, h, w] (float32).

        Raises:
            FlowrlError: a KL kind the ELBO estimator cannot compute (gaussian-step).
        """
        check_kl("elbo", kl)
        cfg = self.config
        x0 = rollout.x0.detach().float()
        grid = times_in_range(rollout.sigmas[:-1].to(device=x0.device, dtype=torch.float32), cfg.t_range)
        batch, n_grid = x0.shape[0], grid.shape[0]
        k = num_terms(n_grid, cfg.timestep_fraction)
        # per-group: draw one row per group and expand it to the group's images.
        n_draw, expand = batch, None
        if cfg.noise == "per-group":
            n_draw, expand = group_index(rollout.batch.group_ids)
            expand = expand.to(x0.device)
        idx = draw_timestep_indices(n_draw, n_grid, k, generator).to(x0.device)
        if expand is not None:
            idx = idx[expand]
        need_ref = kl is not None and kl.beta > 0

        for j in range(k):
            t = grid[idx[:, j]]
            eps = torch.randn((n_draw, *x0.shape[1:]), generator=generator, device=generator.device).to(x0.device)
            if expand is not None:
                eps = eps[expand]
            x_t = noised(x0, eps, t)
            # One x_t for all three policies: common random numbers (see module docstring). The
            # policy goes last so its adapter is the active one when the trainer backpropagates
            # (gradient checkpointing re-runs the forward with whatever adapter is active then).
            with torch.no_grad():
                v_old = model.velocity(x_t, t, rollout.cond, "old", cfg.guidance).float()
                v_ref = model.velocity(x_t, t, rollout.cond, "ref", cfg.guidance).float() if need_ref else None
            v_theta = model.velocity(x_t, t, rollout.cond, "policy", cfg.guidance).float()
            l_theta = elbo_weighted(v_theta, x_t, x0, eps, t, cfg.weighting, cfg.guidance)
            l_old = elbo_weighted(v_old, x_t, x0, eps, t, cfg.weighting, cfg.guidance)
            if v_ref is None:
                kl_term = zeros_like_batch(l_theta)
            elif kl.kind == "girsanov":  # type: ignore[union-attr]
                kl_term = girsanov(v_theta, v_ref)
            else:
                l_ref = elbo_weighted(v_ref, x_t, x0, eps, t, cfg.weighting, cfg.guidance)
                kl_term = ELBO_KL[kl.kind](l_theta - l_ref)  # type: ignore[union-attr]
            yield LikelihoodTerms(
                l_theta=l_theta, l_old=l_old, kl=kl_term, t=t, weight=1.0 / k,
                v_theta=v_theta, v_old=v_old, x0=x0, eps=eps,
            )  # fmt: skip
            # Drop this term's tensors before the next forward so its graph can be freed.
            del v_theta, v_old, v_ref, l_theta, l_old, kl_term, x_t, eps
