"""Stochastic (SDE) steps as Gaussian transitions, and their log-density.

Each step function returns the (mean, std) of x_next ~ N(mean, std^2 I) as a pure function of the
current point, the velocity and the times, so a likelihood estimator can recompute the mean with
another policy's velocity at the same stored x_t and score the stored x_next.

Going from t to t_next < t, dt = t_next - t < 0:
- Flow-SDE (FlowGRPO), noise level a:
  std_t = a sqrt(t / (1 - t_c)), t_c = min(t, sigma_max) with sigma_max the grid's second value;
  mean = x (1 + std_t^2 dt / (2t)) + v (1 + std_t^2 (1 - t) / (2t)) dt; std = std_t sqrt(-dt).
- Dance-SDE (DanceGRPO), eta: score = -(x - (1 - t) x0_hat) / t^2;
  mean = x + dt v - eta^2 score dt / 2; std = eta sqrt(-dt).
- CPS (coefficients-preserving), a in [0, 1]: std = t_next sin(a pi / 2);
  mean = (1 - t_next) x0_hat + sqrt(t_next^2 - std^2) eps_hat.

The last step (t_next = 0): Flow-SDE and Dance-SDE keep a nonzero std there, as FlowGRPO and
DanceGRPO do. CPS's std is t_next sin(.) = 0: the step is deterministic and lands on x0_hat, the
transition is a point mass with no density, and ``gaussian_log_prob`` gives it log-prob 0 (FlowGRPO's
CPS code also yields 0 there, as (x - mean)^2 = 0). Such a step carries no likelihood information; a
trajectory estimator should skip steps whose std is 0 (see ``is_deterministic``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from flowrl.samplers.common import Time, as_time, coef, compute_dtype, eps_from_velocity, x0_from_velocity

#: Defaults of the step parameters (the stage Configs read them from here).
FLOW_SDE_NOISE_LEVEL = 0.7  # FlowGRPO
DANCE_SDE_ETA = 0.3  # DanceGRPO
CPS_NOISE_LEVEL = 0.8  # FlowGRPO's CPS recipes

#: How a step's log-density is reduced over latent dims. mean / sum: of the exact Gaussian
#: log-density. flowcps: FlowCPS's form -mean((x - mean)^2), without 1 / (2 std^2) and constants.
Reduction = Literal["mean", "sum", "flowcps"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "flowcps")

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def flow_sde_step(
    x: Tensor, v: Tensor, t: Time, t_next: Time, noise_level: float = FLOW_SDE_NOISE_LEVEL, *, sigma_max: Time
) -> tuple[Tensor, Tensor]:
    """Flow-SDE (FlowGRPO) transition from t to t_next.

    std_t = a sqrt(t / (1 - t_c)) diverges at t = 1, so, as FlowGRPO does, the denominator's time is
    clamped to sigma_max = sigmas[1] (the grid's second value): on a grid starting at 1 this changes
    only the first step, where std_t = a sqrt(1 / (1 - sigmas[1])).

    Args:
        x: [B, ...] x_t.
        v: [B, ...] velocity at (x_t, t).
        t: current time in (0, 1], scalar or [B].
        t_next: next time in [0, t), scalar or [B].
        noise_level: a >= 0 (0 = the Euler ODE step).
        sigma_max: the clamp of t in 1 / (1 - t): the sampler grid's second value, sigmas[1].

    Returns:
        (mean [B, ...] in the compute dtype, std 0-dim or [B, 1, ..., 1] in the compute dtype).
    """
    _check_nonnegative("noise_level", noise_level)
    cd = compute_dtype(x)
    tt, tn = as_time(t, x), as_time(t_next, x)
    dt = tn - tt
    t_c = torch.minimum(tt, as_time(sigma_max, x))
    var_t = noise_level**2 * tt / (1 - t_c)  # std_t^2
    mean = coef(1 + var_t * dt / (2 * tt), x) * x.to(cd) + coef((1 + var_t * (1 - tt) / (2 * tt)) * dt, x) * v.to(cd)
    std = coef(torch.sqrt(var_t * -dt), x)
    return mean, std


def dance_sde_step(
    x: Tensor, v: Tensor, t: Time, t_next: Time, eta: float = DANCE_SDE_ETA
) -> tuple[Tensor, Tensor]:
    """Dance-SDE (DanceGRPO) transition from t to t_next.

    Args:
        x: [B, ...] x_t.
        v: [B, ...] velocity at (x_t, t).
        t: current time in (0, 1], scalar or [B].
        t_next: next time in [0, t), scalar or [B].
        eta: noise scale >= 0 (0 = the Euler ODE step).

    Returns:
        (mean [B, ...], std 0-dim or [B, 1, ..., 1]), both in the compute dtype.
    """
    _check_nonnegative("eta", eta)
    cd = compute_dtype(x)
    tt, tn = as_time(t, x), as_time(t_next, x)
    dt = tn - tt
    xc = x.to(cd)
    score = -(xc - coef(1 - tt, x) * x0_from_velocity(x, v, t)) / coef(tt**2, x)
    mean = xc + coef(dt, x) * v.to(cd) - coef(0.5 * eta**2 * dt, x) * score
    std = coef(eta * torch.sqrt(-dt), x)
    return mean, std


def cps_step(
    x: Tensor, v: Tensor, t: Time, t_next: Time, noise_level: float = CPS_NOISE_LEVEL
) -> tuple[Tensor, Tensor]:
    """Coefficients-preserving (CPS) transition from t to t_next.

    The mean re-noises x0_hat to t_next with the implied noise eps_hat, scaled so that the fresh noise
    makes up the rest: (1 - t_next) x0 + sqrt(t_next^2 - std^2) eps_hat + std z has the marginal
    coefficients of x_{t_next}. std = 0 at t_next = 0 (a deterministic last step).

    Args:
        x: [B, ...] x_t.
        v: [B, ...] velocity at (x_t, t).
        t: current time in (0, 1], scalar or [B].
        t_next: next time in [0, t), scalar or [B].
        noise_level: a in [0, 1] (0 = DDIM; 1 = all of eps_hat replaced by fresh noise).

    Returns:
        (mean [B, ...], std 0-dim or [B, 1, ..., 1]), both in the compute dtype.
    """
    _check_nonnegative("noise_level", noise_level)
    if noise_level > 1:
        raise ValueError(
            f"CPS noise_level must be in [0, 1], got {noise_level}: std = t_next sin(a pi / 2) is largest at "
            "a = 1 (all of the predicted noise replaced by fresh noise)"
        )
    tn = as_time(t_next, x)
    std = tn * math.sin(noise_level * math.pi / 2)
    # clamp: at a = 1 the difference is 0 up to rounding, and sqrt of a tiny negative is nan
    kept = torch.sqrt((tn**2 - std**2).clamp_min(0))
    mean = coef(1 - tn, x) * x0_from_velocity(x, v, t) + coef(kept, x) * eps_from_velocity(x, v, t)
    return mean, coef(std, x)


def sde_distribution(
    method: str, x: Tensor, v: Tensor, t: Time, t_next: Time, *, param: float, sigma_max: Time
) -> tuple[Tensor, Tensor]:
    """(mean, std) of an SDE method's step, dispatched by name.

    Args:
        method: "flow-sde", "dance-sde" or "cps".
        x, v, t, t_next: as in the step functions.
        param: the method's parameter (noise_level for flow-sde and cps, eta for dance-sde).
        sigma_max: the grid's second value (used by flow-sde only).

    Returns:
        (mean [B, ...], std 0-dim or [B, 1, ..., 1]).
    """
    if method == "flow-sde":
        return flow_sde_step(x, v, t, t_next, param, sigma_max=sigma_max)
    if method == "dance-sde":
        return dance_sde_step(x, v, t, t_next, param)
    if method == "cps":
        return cps_step(x, v, t, t_next, param)
    raise ValueError(f"unknown SDE method {method!r}; SDE methods are flow-sde, dance-sde, cps")


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor | float, reduction: Reduction) -> Tensor:
    """Log-density of x under N(mean, std^2 I), reduced per image over all non-batch dims.

    Per element: -(x - mean)^2 / (2 std^2) - log std - log(2 pi) / 2, then the mean or the sum over
    dims 1.. ("mean" is what FlowGRPO and the paper use; name it at every call site).
    Elements with std = 0 (a deterministic step such as CPS's last) have no density; they contribute
    0, and callers should not read likelihood information from such steps (``is_deterministic``).

    ``reduction="flowcps"`` is FlowCPS's log-prob instead: -mean((x - mean)^2) over dims 1.., with no
    1 / (2 std^2) and no constants. Its log-ratios are the exact Gaussian's times 2 std^2 per step,
    so a PPO clip range means something else under it: use it for a faithful CPS baseline only.

    Args:
        x: [B, ...] the sample.
        mean: [B, ...] broadcastable to x.
        std: float, 0-dim, or broadcastable to x (e.g. [B, 1, ..., 1]); >= 0.
        reduction: "mean", "sum" or "flowcps" (see above).

    Returns:
        [B] in float32 (float64 for float64 inputs).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    cd = torch.float64 if torch.float64 in (x.dtype, mean.dtype) else torch.float32
    xc, mc = x.to(cd), mean.to(cd)
    s = torch.as_tensor(std, dtype=cd, device=x.device)
    if bool((s < 0).any()) or not bool(torch.isfinite(s).all()):
        raise ValueError("std must be finite and >= 0; check the step's noise parameter and time grid")
    if reduction == "flowcps":
        return -((xc - mc) ** 2).flatten(1).mean(dim=1) if xc.ndim > 1 else -((xc - mc) ** 2)
    point = s == 0
    safe = torch.where(point, torch.ones_like(s), s)
    lp = -((xc - mc) ** 2) / (2 * safe**2) - torch.log(safe) - _HALF_LOG_2PI
    lp = torch.where(point, torch.zeros_like(lp), lp)
    if lp.ndim == 1:
        return lp
    dims = tuple(range(1, lp.ndim))
    return lp.mean(dim=dims) if reduction == "mean" else lp.sum(dim=dims)


def is_deterministic(std: Tensor | float) -> bool:
    """True when a step's std is 0 everywhere (no noise, no density: e.g. CPS's last step)."""
    return bool((torch.as_tensor(std) == 0).all())


def _check_nonnegative(name: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r} (0 gives the deterministic ODE step)")
