"""Helpers shared by the step functions: time broadcasting, compute dtype, x0 / eps predictions.

Convention (SD3 rectified flow): x_t = (1 - t) x0 + t eps, t in [0, 1], t = 1 pure noise; the model
predicts the velocity v ~ eps - x0, so x0_hat = x_t - t v and eps_hat = x_t + (1 - t) v.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

#: A time: a Python float, a 0-dim tensor, or a [B] tensor (one time per image).
Time = Union[float, Tensor]


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32: the step arithmetic is never done in half precision
    (bf16 overflows and loses the small dt * v increments)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def as_time(t: Time, x: Tensor) -> Tensor:
    """A time as a float64 tensor broadcastable against x [B, ...].

    Coefficients are formed in float64 (cheap: they are scalars or [B]) and cast once to the compute
    dtype, so the float32 latents see correctly rounded coefficients.

    Args:
        t: float, 0-dim tensor, or [B] tensor.
        x: [B, ...] the tensor the time multiplies.

    Returns:
        0-dim, or [B, 1, ..., 1] with x.ndim dims.
    """
    coef_dtype = torch.float32 if x.device.type == "mps" else torch.float64  # mps has no float64
    tt = torch.as_tensor(t, dtype=coef_dtype, device=x.device)
    if tt.ndim == 0:
        return tt
    if tt.ndim == 1 and tt.shape[0] == x.shape[0]:
        return tt.reshape(-1, *([1] * (x.ndim - 1)))
    raise ValueError(
        f"a time must be a scalar or a [B] tensor with B = {x.shape[0]} (the batch of x {tuple(x.shape)}), "
        f"got shape {tuple(tt.shape)}; pass one time per image or one for all"
    )


def coef(c: Tensor, x: Tensor) -> Tensor:
    """A float64 coefficient cast to x's compute dtype."""
    return c.to(compute_dtype(x))


def x0_from_velocity(x: Tensor, v: Tensor, t: Time) -> Tensor:
    """Predicted clean sample x0_hat = x_t - t v.

    Args:
        x: [B, ...] x_t.
        v: [B, ...] velocity at (x_t, t).
        t: scalar or [B].

    Returns:
        [B, ...] in the compute dtype (float32, or float64 for float64 inputs).
    """
    cd = compute_dtype(x)
    return x.to(cd) - coef(as_time(t, x), x) * v.to(cd)


def eps_from_velocity(x: Tensor, v: Tensor, t: Time) -> Tensor:
    """Predicted noise eps_hat = x_t + (1 - t) v.

    Args:
        x: [B, ...] x_t.
        v: [B, ...] velocity at (x_t, t).
        t: scalar or [B].

    Returns:
        [B, ...] in the compute dtype.
    """
    cd = compute_dtype(x)
    return x.to(cd) + coef(1 - as_time(t, x), x) * v.to(cd)
