"""The registered sampler stages: euler, dpm2 (ODE) and flow-sde, dance-sde, cps (SDE).

A stage holds its pydantic ``Config`` and is called as
``stage(model, cond, seeds, latent_shape) -> (x0, sigmas, Trajectory | None)``: it builds the SD3 grid,
draws each image's initial noise from its seed (and, for SDEs, its step noise from a generator derived
from the same seed) and runs ``loop.sample``. SDE stages always record the trajectory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from flowrl.errors import FlowrlError
from flowrl.registry import register
from flowrl.samplers.common import Time
from flowrl.samplers.loop import generators_for, initial_noise, sample
from flowrl.samplers.schedules import sd3_sigmas
from flowrl.samplers.sde import CPS_NOISE_LEVEL, DANCE_SDE_ETA, FLOW_SDE_NOISE_LEVEL, sde_distribution
from flowrl.types import Conditioning, Trajectory, VelocityModel


class _Common(BaseModel):
    """Fields every sampler has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(10, gt=0, description="Sampler steps T (the grid has T + 1 times).")
    guidance: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="Classifier-free guidance scale (1 = off, no negative prompt)."
    )
    shift: float = Field(3.0, gt=0, allow_inf_nan=False, description="SD3 time shift of the grid (3.0 for SD3.5).")


class _SdeCommon(_Common):
    log_prob_reduction: Literal["mean", "sum", "flowcps"] = Field(
        "mean",
        description="Reduction of each step's Gaussian log-density over latent dims (FlowGRPO: mean); flowcps: "
        "FlowCPS's -mean((x - mean)^2) without the 1 / (2 std^2) and constants.",
    )


class _Sampler:
    """Shared behaviour of the sampler stages (the method name and the Config differ)."""

    Config: ClassVar[type[_Common]]
    method: ClassVar[str]
    is_sde: ClassVar[bool]

    def __init__(self, config: _Common | None = None) -> None:
        self.config = self.Config() if config is None else config
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{type(self).__name__} takes a {type(self).__name__}.Config, got {type(self.config).__name__}")

    def sigmas(self) -> Tensor:
        """The time grid, float32 [steps + 1] on the CPU."""
        return sd3_sigmas(self.config.steps, self.config.shift)

    def _params(self) -> dict[str, float]:
        return {}

    def __call__(
        self,
        model: VelocityModel,
        cond: Conditioning,
        seeds: Sequence[int],
        latent_shape: tuple[int, ...],
        *,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor, Trajectory | None]:
        """Sample one image per seed.

        Args:
            model: the velocity model (policy weights).
            cond: conditioning of the B images (B = len(seeds)).
            seeds: one int per image; image i's noise depends on seeds[i] only.
            latent_shape: (C, h, w) of one latent.
            device: where the latents live; default: the conditioning's device.

        Returns:
            (x0 [B, C, h, w] float32, sigmas [T + 1] float32 CPU, Trajectory for SDE stages else None).
        """
        batch = cond.prompt_embeds.shape[0]
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for a conditioning of {batch} images; give one seed per image")
        device = cond.prompt_embeds.device if device is None else device
        sigmas = self.sigmas()
        x0, trajectory = sample(
            model,
            cond,
            initial_noise(seeds, tuple(latent_shape), device=device),
            sigmas,
            self.method,
            guidance=self.config.guidance,
            generators=generators_for(seeds) if self.is_sde else None,
            record=self.is_sde,
            log_prob_reduction=getattr(self.config, "log_prob_reduction", "mean"),
            **self._params(),
        )
        return x0, sigmas, trajectory

    def step_distribution(self, x: Tensor, v: Tensor, t: Time, t_next: Time, sigmas: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) of one step from t to t_next; see ``step_distribution``."""
        return step_distribution(self.method, self.config, x, v, t, t_next, sigmas)


@register("sampler", "euler")
class Euler(_Sampler):
    """Euler on the probability-flow ODE (the paper's evaluation sampler, 40 steps)."""

    class Config(_Common):
        kind: Literal["euler"] = "euler"

    method = "euler"
    is_sde = False


@register("sampler", "dpm2")
class Dpm2(_Sampler):
    """DPM-Solver++(2M) on x0_hat, first order at the first and last step (the paper's rollout sampler)."""

    class Config(_Common):
        kind: Literal["dpm2"] = "dpm2"

    method = "dpm2"
    is_sde = False


@register("sampler", "flow-sde")
class FlowSde(_Sampler):
    """FlowGRPO's SDE; records per-step log-probs for the trajectory estimator."""

    class Config(_SdeCommon):
        kind: Literal["flow-sde"] = "flow-sde"
        noise_level: float = Field(
            FLOW_SDE_NOISE_LEVEL, ge=0, allow_inf_nan=False, description="Noise level a of std_t = a sqrt(t / (1 - t))."
        )

    method = "flow-sde"
    is_sde = True

    def _params(self) -> dict[str, float]:
        return {"noise_level": self.config.noise_level}


@register("sampler", "dance-sde")
class DanceSde(_Sampler):
    """DanceGRPO's SDE; records per-step log-probs for the trajectory estimator."""

    class Config(_SdeCommon):
        kind: Literal["dance-sde"] = "dance-sde"
        eta: float = Field(DANCE_SDE_ETA, ge=0, allow_inf_nan=False, description="Noise scale; step std = eta sqrt(-dt).")

    method = "dance-sde"
    is_sde = True

    def _params(self) -> dict[str, float]:
        return {"eta": self.config.eta}


@register("sampler", "cps")
class Cps(_Sampler):
    """Coefficients-preserving sampler; its last step is deterministic (std = 0, log-prob 0)."""

    class Config(_SdeCommon):
        kind: Literal["cps"] = "cps"
        noise_level: float = Field(
            CPS_NOISE_LEVEL, ge=0, le=1, allow_inf_nan=False, description="a in [0, 1]; step std = t_next sin(a pi / 2)."
        )

    method = "cps"
    is_sde = True

    def _params(self) -> dict[str, float]:
        return {"noise_level": self.config.noise_level}


_SDE_STAGES: dict[str, type[_Sampler]] = {"flow-sde": FlowSde, "dance-sde": DanceSde, "cps": Cps}


def step_distribution(
    name: str, config: BaseModel, x: Tensor, v: Tensor, t: Time, t_next: Time, sigmas: Tensor
) -> tuple[Tensor, Tensor]:
    """(mean, std) of an SDE sampler's step x_next ~ N(mean, std^2 I), for likelihood estimators.

    Recompute the mean with any policy's velocity v at the stored x_t and score the stored x_{t_next}
    with ``gaussian_log_prob(x_next, mean, std, reduction=config.log_prob_reduction)``.

    Args:
        name: the sampler's registered name ("flow-sde", "dance-sde" or "cps").
        config: that sampler's Config (it carries the noise parameter).
        x: [B, C, h, w] x_t.
        v: [B, C, h, w] velocity at (x_t, t) (with grad if the estimator wants it).
        t: current time, scalar or [B] (sigmas[k]).
        t_next: next time, scalar or [B] (sigmas[k + 1]).
        sigmas: [T + 1] the rollout's grid (Flow-SDE clamps t to sigmas[1] in its 1 / (1 - t)).

    Returns:
        (mean [B, C, h, w], std 0-dim or [B, 1, 1, 1]); std = 0 marks a deterministic step.
    """
    stage = _SDE_STAGES.get(name)
    if stage is None:
        raise FlowrlError(
            f"sampler {name!r} has no per-step Gaussian (it is deterministic or unknown); the trajectory "
            f"estimator needs one of {', '.join(_SDE_STAGES)}, or use the elbo estimator"
        )
    if not isinstance(config, stage.Config):
        raise TypeError(f"step_distribution({name!r}) needs a {stage.__name__}.Config, got {type(config).__name__}")
    param = config.eta if name == "dance-sde" else config.noise_level  # type: ignore[attr-defined]
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError("sigmas must be the rollout's [T + 1] grid (Trajectory.sigmas)")
    return sde_distribution(name, x, v, t, t_next, param=param, sigma_max=float(sigmas[1]))
