"""The sampling loop over the pure step functions, and per-image seeding.

Reproducibility is per image: image i's initial noise comes from its own seed, and an SDE's per-step
noise from its own generator, so a sample never depends on what else is in the batch (up to the
model's batched arithmetic).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from flowrl.samplers.common import compute_dtype, x0_from_velocity
from flowrl.samplers.ode import dpm2_step, euler_step
from flowrl.samplers.sde import (
    CPS_NOISE_LEVEL,
    DANCE_SDE_ETA,
    FLOW_SDE_NOISE_LEVEL,
    REDUCTIONS,
    Reduction,
    gaussian_log_prob,
    sde_distribution,
)
from flowrl.types import Conditioning, Trajectory, VelocityModel

ODE_METHODS: tuple[str, ...] = ("euler", "dpm2")
SDE_METHODS: tuple[str, ...] = ("flow-sde", "dance-sde", "cps")
METHODS: tuple[str, ...] = ODE_METHODS + SDE_METHODS

#: Added to an image's seed to seed its step-noise generator. torch's CPU generator keys on the low
#: 32 bits of a seed only, so the offset lives in that range: with it, the step-noise streams of a run
#: stay disjoint from its initial-noise streams as long as its seeds span fewer than 2^31 integers.
STEP_NOISE_OFFSET = 2**31

# The parameter each SDE method takes, and its default.
_PARAMS: dict[str, tuple[str, float]] = {
    "flow-sde": ("noise_level", FLOW_SDE_NOISE_LEVEL),
    "dance-sde": ("eta", DANCE_SDE_ETA),
    "cps": ("noise_level", CPS_NOISE_LEVEL),
}


def initial_noise(
    seeds: Sequence[int],
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Initial noise, one image per seed, each drawn from ``torch.Generator().manual_seed(seed)``.

    Drawn on the CPU in float32 and then moved and cast, so a seed gives the same noise on any device
    and in any dtype (up to rounding). torch's CPU generator uses the low 32 bits of the seed.

    Args:
        seeds: one int per image, len B >= 1.
        shape: the latent shape of one image, e.g. (C, h, w).
        dtype: dtype of the result.
        device: device of the result (default CPU).

    Returns:
        [B, *shape].
    """
    _check_seeds(seeds)
    noise = [
        torch.randn(tuple(shape), generator=torch.Generator().manual_seed(operator.index(s)), dtype=torch.float32)
        for s in seeds
    ]
    return torch.stack(noise).to(device=device, dtype=dtype)


def generators_for(seeds: Sequence[int], offset: int = STEP_NOISE_OFFSET) -> list[torch.Generator]:
    """Per-image CPU generators for an SDE's step noise, seeded with (seed + offset) mod 2^64.

    The offset keeps them off the streams of ``initial_noise`` for the same seeds (see
    STEP_NOISE_OFFSET). CPU generators make the draws independent of the device the model runs on.

    Args:
        seeds: one int per image, len B.
        offset: added to each seed.

    Returns:
        B generators, one per image, in order.
    """
    _check_seeds(seeds)
    return [torch.Generator().manual_seed((operator.index(s) + offset) % 2**64) for s in seeds]


def sample(
    model: VelocityModel,
    cond: Conditioning,
    noise: Tensor,
    sigmas: Tensor,
    method: str,
    *,
    guidance: float = 1.0,
    noise_level: float | None = None,
    eta: float | None = None,
    generators: Sequence[torch.Generator] | None = None,
    record: bool = False,
    log_prob_reduction: Reduction = "mean",
) -> tuple[Tensor, Trajectory | None]:
    """Integrate from the initial noise over the grid `sigmas` with one of METHODS.

    Every velocity is ``model.velocity(x, t [B], cond, "policy", guidance)`` under no_grad. The
    latents are carried in float32 (float64 if `noise` is float64), whatever dtype the model runs in.

    Args:
        model: the velocity model (the policy weights are used).
        cond: conditioning of the B images.
        noise: [B, C, h, w] the initial latents at t = sigmas[0] (pure noise when sigmas[0] = 1).
        sigmas: [T + 1] strictly decreasing times in [0, 1] (e.g. ``sd3_sigmas``).
        method: "euler", "dpm2", "flow-sde", "dance-sde" or "cps".
        guidance: classifier-free guidance scale passed to the model (1 = off).
        noise_level: flow-sde's a (default 0.7) or cps's a in [0, 1] (default 0.8); SDE methods only.
        eta: dance-sde's noise scale (default 0.3); dance-sde only.
        generators: SDE only, one per image (see ``generators_for``), so that each image's step noise
            is its own; None draws the step noise from torch's global generator, which makes a sample
            depend on the batch it is in.
        record: SDE only: also return the Trajectory (latents, sigmas, per-step log-probs).
        log_prob_reduction: how the per-step Gaussian log-densities are reduced over latent dims.

    Returns:
        (x0 [B, C, h, w], Trajectory with latents [B, T + 1, C, h, w], sigmas [T + 1] and log_probs
        [B, T] under the sampling policy, or None when not recording).
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose one of {', '.join(METHODS)}")
    param = _resolve_param(method, noise_level, eta)
    is_sde = method in SDE_METHODS
    if record and not is_sde:
        raise ValueError(
            f"{method!r} is deterministic and has no per-step likelihood to record; use record=False, or an "
            f"SDE method ({', '.join(SDE_METHODS)}) for a trajectory"
        )
    if generators is not None and not is_sde:
        raise ValueError(f"{method!r} draws no step noise; pass generators=None")
    if log_prob_reduction not in REDUCTIONS:
        raise ValueError(f"log_prob_reduction must be one of {REDUCTIONS}, got {log_prob_reduction!r}")
    ts = _check_grid(sigmas)
    batch = noise.shape[0]
    if generators is not None and len(generators) != batch:
        raise ValueError(
            f"got {len(generators)} generators for {batch} images; pass one per image (generators_for(seeds))"
        )

    with torch.no_grad():
        x = noise.to(compute_dtype(noise))
        latents = [x] if record else []
        log_probs: list[Tensor] = []
        prev_x0: Tensor | None = None
        t_prev: float | None = None
        for k in range(len(ts) - 1):
            t, t_next = ts[k], ts[k + 1]
            t_batch = torch.full((batch,), t, dtype=x.dtype, device=x.device)
            v = model.velocity(x, t_batch, cond, which="policy", guidance=guidance)
            if v.shape != x.shape:
                raise ValueError(
                    f"model.velocity returned shape {tuple(v.shape)} for latents {tuple(x.shape)}; it must match"
                )
            v = v.to(x.dtype)
            if method == "euler":
                x = euler_step(x, v, t, t_next)
            elif method == "dpm2":
                x0_hat = x0_from_velocity(x, v, t)
                x = dpm2_step(x, x0_hat, t, t_next, prev_x0, t_prev)
                prev_x0, t_prev = x0_hat, t
            else:
                mean, std = sde_distribution(method, x, v, t, t_next, param=param, sigma_max=ts[1])
                x_next = mean + std * _step_noise(generators, x)
                if record:
                    log_probs.append(gaussian_log_prob(x_next, mean, std, reduction=log_prob_reduction))
                x = x_next
            if record:
                latents.append(x)

    if not record:
        return x, None
    trajectory = Trajectory(
        latents=torch.stack(latents, dim=1),
        sigmas=sigmas.detach().to("cpu", torch.float32).clone(),
        log_probs=torch.stack(log_probs, dim=1),
    )
    return x, trajectory


def _step_noise(generators: Sequence[torch.Generator] | None, like: Tensor) -> Tensor:
    """z ~ N(0, I) shaped like `like` [B, ...]: row i from generators[i], drawn in float32."""
    if generators is None:
        return torch.randn(like.shape, dtype=torch.float32, device=like.device).to(like.dtype)
    rows = [torch.randn(like.shape[1:], generator=g, dtype=torch.float32, device=g.device) for g in generators]
    return torch.stack(rows).to(device=like.device, dtype=like.dtype)


def _resolve_param(method: str, noise_level: float | None, eta: float | None) -> float:
    """The method's own step parameter (its default when not given); refuses parameters of others."""
    given = {"noise_level": noise_level, "eta": eta}
    own, default = _PARAMS.get(method, (None, 0.0))
    stray = [name for name, value in given.items() if value is not None and name != own]
    if stray:
        takes = f"takes only {own}" if own else "takes no noise parameter"
        raise ValueError(f"{method!r} {takes}, but {', '.join(stray)} was given; drop it")
    if own is None:
        return 0.0
    value = given[own]
    return default if value is None else float(value)


def _check_grid(sigmas: Tensor) -> list[float]:
    """The grid as Python floats, after checking it is a strictly decreasing [T + 1] in [0, 1]."""
    if not isinstance(sigmas, Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError("sigmas must be a 1-D tensor [T + 1] with T >= 1 steps (e.g. sd3_sigmas(steps))")
    ts = [float(s) for s in sigmas.detach().cpu().double()]
    if not all(0.0 <= s <= 1.0 for s in ts) or any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(
            f"sigmas must decrease strictly within [0, 1] (from noise at 1 towards 0), got {ts}; "
            "build them with sd3_sigmas"
        )
    return ts


def _check_seeds(seeds: Sequence[int]) -> None:
    if len(seeds) == 0:
        raise ValueError("seeds is empty; give one int seed per image")
    for s in seeds:
        try:
            if isinstance(s, bool):
                raise TypeError
            operator.index(s)
        except TypeError:
            raise ValueError(f"seeds must be ints (one per image), got {s!r} of type {type(s).__name__}") from None
