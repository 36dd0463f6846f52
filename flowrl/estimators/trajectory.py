"""Trajectory likelihood estimator: per-step Gaussian log-densities along a recorded SDE rollout.

For a step k of the stored trajectory (x_k at t = sigmas[k] to x_{k+1} at t' = sigmas[k + 1]),
l = log N(x_{k+1}; mean_which(x_k), std_k^2 I), where (mean, std) come from the rollout sampler's own
step function (``flowrl.samplers.step_distribution``) with the velocity of the policy being scored.
Each step is its own Monte-Carlo term (FlowGRPO puts each step in its own PPO term).

Binding to the sampler: the estimator must know which SDE produced the trajectory and its noise
parameter, which the Rollout does not carry. Construct it with ``sampler_name`` and
``sampler_config`` (the graph builder passes the pipeline's sampler section), e.g.
``TrajectoryEstimator(cfg, sampler_name="flow-sde", sampler_config=FlowSde.Config())``.

Steps drawn: one random subset of the T steps shared by the whole batch (the steps' times are the
same for every image, so one batched model call per step). Deterministic steps (std = 0, e.g. CPS's
last step, which lands on x0_hat) have no density and are never drawn.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from flowrl.errors import FlowrlError
from flowrl.estimators.elbo import num_terms
from flowrl.kl import KLConfig, check_kl, flowgrpo_step, gaussian_step, girsanov
from flowrl import registry
from flowrl.registry import register
from flowrl.samplers import gaussian_log_prob, step_distribution
from flowrl.types import LikelihoodTerms, Rollout, VelocityModel, zeros_like_batch

#: Samplers that record a trajectory (the ones with a per-step Gaussian).
SDE_SAMPLERS: tuple[str, ...] = ("flow-sde", "dance-sde", "cps")


class TrajectoryConfig(BaseModel):
    """Config of the trajectory estimator."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["trajectory"] = "trajectory"
    timestep_fraction: float = Field(
        1.0, gt=0, le=1, description="Share of the T sampler steps scored per batch (floor, at least 1)."
    )
    reduction: Literal["mean", "sum", "flowcps"] = Field(
        "mean",
        description="Reduction of each step's log-density over latent dims; keep it equal to the sampler's "
        "(flowcps: FlowCPS's -mean((x - mean)^2), for a faithful CPS baseline).",
    )
    guidance: float = Field(1.0, gt=0, description="CFG scale of the velocities; keep it equal to the sampler's.")


def sampler_problems(config: TrajectoryConfig, sampler_name: str, sampler_config: BaseModel | None) -> list[str]:
    """Contradictions between the trajectory estimator and the rollout sampler, each with its fix.

    Args:
        config: the estimator's config.
        sampler_name: the rollout sampler's registered name.
        sampler_config: its Config (None: defaults assumed, only the name is checked).

    Returns:
        Messages; empty when the pair is consistent.
    """
    if sampler_name not in SDE_SAMPLERS:
        return [
            f"the trajectory estimator needs per-step Gaussian transitions, but sampler {sampler_name!r} is "
            f"deterministic and records no trajectory; set sampler.kind to one of {', '.join(SDE_SAMPLERS)}, "
            "or use estimator.kind: elbo, which works with any sampler"
        ]
    out = []
    s_red = getattr(sampler_config, "log_prob_reduction", None)
    if s_red is not None and s_red != config.reduction:
        out.append(
            f"estimator.reduction is {config.reduction!r} but sampler.log_prob_reduction is {s_red!r}: the "
            "recorded and recomputed log-probs would be on different scales; set both to the same value"
        )
    s_cfg = getattr(sampler_config, "guidance", None)
    if s_cfg is not None and s_cfg != config.guidance:
        out.append(
            f"estimator.guidance is {config.guidance} but the sampler rolled out with guidance {s_cfg}: the "
            "old policy's step densities would not be the sampling ones; set estimator.guidance to "
            f"{s_cfg}"
        )
    return out


@register("estimator", "trajectory")
class TrajectoryEstimator:
    """Per-step Gaussian estimator over a recorded SDE trajectory; one term per drawn step.

    Call: ``estimator(rollout, model, kl, generator) -> Iterator[LikelihoodTerms]``; fills l_theta,
    l_old, kl and t (no velocities: the NFT/AWM objectives need the elbo estimator).
    """

    Config = TrajectoryConfig
    #: LikelihoodTerms fields this estimator fills (objectives declare what they need).
    provides: ClassVar[frozenset[str]] = frozenset({"l_theta", "l_old", "kl", "t"})

    def __init__(
        self,
        config: TrajectoryConfig | None = None,
        *,
        sampler_name: str | None = None,
        sampler_config: BaseModel | None = None,
    ):
        """
        Args:
            config: the estimator's config (defaults when None).
            sampler_name: the rollout sampler's registered name (flow-sde, dance-sde or cps).
            sampler_config: that sampler's Config (its noise parameter); None uses its defaults.
        """
        self.config = config if config is not None else TrajectoryConfig()
        self.sampler_name = sampler_name
        if sampler_name is not None and sampler_config is None and sampler_name in SDE_SAMPLERS:
            sampler_config = registry.lookup("sampler", sampler_name).Config()
        self.sampler_config = sampler_config

    def __call__(
        self, rollout: Rollout, model: VelocityModel, kl: KLConfig | None, generator: torch.Generator
    ) -> Iterator[LikelihoodTerms]:
        """Yield one term per drawn step, one at a time.

        Args:
            rollout: the samples with their Trajectory (latents [B, T + 1, C, h, w], sigmas [T + 1]).
            model: policy access; "policy" is called with grad, "old"/"ref" without.
            kl: the objective's KL config (girsanov, gaussian-step or flowgrpo-step; None: no KL term).
            generator: source of the step subset.

        Yields:
            LikelihoodTerms with l_theta/l_old/kl/t [B] and weight 1/K.

        Raises:
            FlowrlError: no trajectory (ODE rollout), no sampler bound, or an ELBO-only KL kind.
        """
        traj = rollout.trajectory
        if traj is None:
            raise FlowrlError(
                "the trajectory estimator needs the rollout's recorded trajectory, but this rollout has none: "
                "only SDE samplers (" + ", ".join(SDE_SAMPLERS) + ") record one, ODE samplers (euler, dpm2) do "
                "not. Set sampler.kind to an SDE sampler, or use estimator.kind: elbo, which works with any sampler"
            )
        if self.sampler_name is None:
            raise FlowrlError(
                "the trajectory estimator was built without its sampler; construct it as "
                "TrajectoryEstimator(config, sampler_name=..., sampler_config=...) with the rollout sampler's "
                "name and Config (flowrl.graph does this from the pipeline)"
            )
        check_kl("trajectory", kl)
        cfg, name, s_cfg = self.config, self.sampler_name, self.sampler_config
        device = rollout.x0.device
        sigmas = traj.sigmas.to(device)
        ts = [float(s) for s in traj.sigmas.detach().cpu().double()]
        batch = traj.latents.shape[0]

        def dist(x: Tensor, v: Tensor, k: int) -> tuple[Tensor, Tensor]:
            return step_distribution(name, s_cfg, x, v, ts[k], ts[k + 1], sigmas)

        # std depends on the times and the noise parameter only, so a zero velocity finds it.
        probe = traj.latents[:1, 0].to(device)
        steps = [k for k in range(len(ts) - 1) if bool((dist(probe, torch.zeros_like(probe), k)[1] > 0).all())]
        if not steps:
            raise FlowrlError(
                f"every step of this {name} trajectory is deterministic (std = 0), so it has no likelihood; "
                "raise the sampler's noise parameter or use estimator.kind: elbo"
            )
        n = num_terms(len(steps), cfg.timestep_fraction)
        pick = torch.randperm(len(steps), generator=generator, device=generator.device)[:n].sort().values.tolist()
        need_ref = kl is not None and kl.beta > 0

        for i in pick:
            k = steps[i]
            x = traj.latents[:, k].to(device)
            x_next = traj.latents[:, k + 1].to(device)
            t = torch.full((batch,), ts[k], dtype=x.dtype, device=device)
            # The policy goes last so its adapter is the active one when the trainer backpropagates
            # (gradient checkpointing re-runs the forward with whatever adapter is active then).
            with torch.no_grad():
                v_old = model.velocity(x, t, rollout.cond, "old", cfg.guidance)
                v_ref = model.velocity(x, t, rollout.cond, "ref", cfg.guidance) if need_ref else None
            v_theta = model.velocity(x, t, rollout.cond, "policy", cfg.guidance)
            mean_theta, std = dist(x, v_theta, k)
            l_theta = gaussian_log_prob(x_next, mean_theta, std, reduction=cfg.reduction)
            with torch.no_grad():
                l_old = gaussian_log_prob(x_next, dist(x, v_old, k)[0], std, reduction=cfg.reduction)
            if v_ref is None:
                kl_term = zeros_like_batch(l_theta)
            elif kl.kind == "gaussian-step":  # type: ignore[union-attr]
                kl_term = gaussian_step(mean_theta, dist(x, v_ref, k)[0], std, cfg.reduction)
            elif kl.kind == "flowgrpo-step":  # type: ignore[union-attr]
                kl_term = flowgrpo_step(mean_theta, dist(x, v_ref, k)[0], std, ts[k + 1] - ts[k], cfg.reduction)
            else:
                kl_term = girsanov(v_theta.float(), v_ref.float())
            yield LikelihoodTerms(l_theta=l_theta, l_old=l_old, kl=kl_term, t=t, weight=1.0 / n)
            # Drop this step's tensors before the next forward so its graph can be freed.
            del v_theta, v_old, v_ref, mean_theta, l_theta, l_old, kl_term, x, x_next
