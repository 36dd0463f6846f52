"""Deterministic (ODE) step functions: Euler on the velocity, DDIM and DPM-Solver++(2M) on x0_hat.

Each step goes from time t to t_next < t (dt = t_next - t < 0) and is a pure function of its
arguments; the loop in ``loop.py`` carries any state (dpm2's previous x0 prediction).

DPM-Solver++ for rectified flow: alpha_t = 1 - t, sigma_t = t, lambda_t = log(alpha_t / sigma_t).
Its first-order update, (sigma_next / sigma) x - alpha_next (exp(-h) - 1) x0_hat with
h = lambda_next - lambda, simplifies for this schedule to the DDIM form
    x_next = (t_next / t) x + (1 - t_next / t) D,
which needs no logarithm, so it is exact at t = 1 (alpha = 0, lambda = -inf) and at t_next = 0
(lambda = +inf). The 2M step keeps the same form with D extrapolated from the last two predictions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowrl.samplers.common import Time, as_time, coef, compute_dtype


def euler_step(x: Tensor, v: Tensor, t: Time, t_next: Time) -> Tensor:
    """One Euler step of the probability-flow ODE: x_next = x + (t_next - t) v.

    Args:
        x: [B, ...] x_t.
        v: [B, ...] velocity at (x_t, t).
        t: current time, scalar or [B].
        t_next: next time (< t), scalar or [B].

    Returns:
        [B, ...] x_{t_next} in the compute dtype (float32, or float64 for float64 inputs).
    """
    cd = compute_dtype(x)
    dt = as_time(t_next, x) - as_time(t, x)
    return x.to(cd) + coef(dt, x) * v.to(cd)


def ddim_step(x: Tensor, x0_hat: Tensor, t: Time, t_next: Time) -> Tensor:
    """Deterministic DDIM step (= first-order DPM-Solver++): x_next = (t_next/t) x + (1 - t_next/t) x0_hat.

    Equivalently x_next = (1 - t_next) x0_hat + t_next eps_hat: the clean prediction re-noised to
    t_next with the noise the current point implies. t_next = 0 returns x0_hat exactly.

    Args:
        x: [B, ...] x_t.
        x0_hat: [B, ...] the clean-sample prediction at (x_t, t) (or an extrapolated one).
        t: current time (> 0), scalar or [B].
        t_next: next time (< t), scalar or [B].

    Returns:
        [B, ...] x_{t_next} in the compute dtype.
    """
    cd = compute_dtype(x)
    ratio = as_time(t_next, x) / as_time(t, x)
    return coef(ratio, x) * x.to(cd) + coef(1 - ratio, x) * x0_hat.to(cd)


def _log_snr(t: Tensor) -> Tensor:
    """lambda_t = log((1 - t) / t); -inf at t = 1, +inf at t = 0."""
    return torch.log1p(-t) - torch.log(t)


def dpm2_inverse_step_ratio(t_prev: Time, t: Time, t_next: Time, like: Tensor) -> Tensor:
    """1 / r = h / h_prev of DPM-Solver++(2M), with h = lambda(t_next) - lambda(t) and
    h_prev = lambda(t) - lambda(t_prev); 0 where the step must be first order.

    The two limits are the first-order cases: t_next = 0 gives h = inf (the last step, which must land
    on x0_hat), and t_prev = 1 gives h_prev = inf (the second step after a start at pure noise, where
    the previous prediction carries no information about the slope in lambda). Both give 1 / r = 0.

    Args:
        t_prev, t, t_next: times with t_prev > t > t_next, scalars or [B].
        like: [B, ...] a tensor of the target batch/shape (for broadcasting).

    Returns:
        float64 (float32 on mps), 0-dim or [B, 1, ..., 1].
    """
    tp, tc, tn = as_time(t_prev, like), as_time(t, like), as_time(t_next, like)
    second_order = (tn > 0) & (tp < 1)
    # Clamp the inputs of the unused branch so it stays finite (where() picks, but inf/inf is noisy).
    tn_safe = torch.where(second_order, tn, torch.full_like(tn, 0.5))
    tp_safe = torch.where(second_order, tp, torch.full_like(tp, 0.5))
    h = _log_snr(tn_safe) - _log_snr(tc)
    h_prev = _log_snr(tc) - _log_snr(tp_safe)
    return torch.where(second_order, h / h_prev, torch.zeros_like(h))


def dpm2_step(
    x: Tensor,
    x0_hat: Tensor,
    t: Time,
    t_next: Time,
    prev_x0_hat: Tensor | None = None,
    t_prev: Time | None = None,
) -> Tensor:
    """One DPM-Solver++(2M) step on the x0-prediction.

    First order (DDIM) when there is no previous prediction (the first step) and when t_next = 0 (the
    last step, which then returns x0_hat exactly). Otherwise second order with r = h_prev / h and
        D = (1 + 1/(2r)) x0_hat - 1/(2r) prev_x0_hat,   x_next = (t_next/t) x + (1 - t_next/t) D.

    Args:
        x: [B, ...] x_t.
        x0_hat: [B, ...] x0 prediction at (x_t, t).
        t: current time (> 0), scalar or [B].
        t_next: next time (< t), scalar or [B].
        prev_x0_hat: [B, ...] the x0 prediction of the previous step, at time t_prev; None on the
            first step.
        t_prev: the previous step's time (> t); given exactly when prev_x0_hat is.

    Returns:
        [B, ...] x_{t_next} in the compute dtype.
    """
    if (prev_x0_hat is None) != (t_prev is None):
        raise ValueError(
            "dpm2_step needs prev_x0_hat and t_prev together (the previous step's x0 prediction and its "
            "time), or neither on the first step"
        )
    if prev_x0_hat is None:
        return ddim_step(x, x0_hat, t, t_next)
    cd = compute_dtype(x)
    half_inv_r = coef(0.5 * dpm2_inverse_step_ratio(t_prev, t, t_next, x), x)
    x0c = x0_hat.to(cd)
    d = x0c + half_inv_r * (x0c - prev_x0_hat.to(cd))
    return ddim_step(x, d, t, t_next)
