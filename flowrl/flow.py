"""Rectified-flow algebra shared by the ELBO estimator and the velocity objectives (NFT, AWM).

A leaf module (imports no other flowrl module), beside flowrl/kl.py, so that estimators and
objectives both import it without importing each other.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Floor of the adaptive normaliser sg(mean|x0_hat - x0|): the paper's code and DiffusionNFT clamp it
#: at 1e-5 (computed in float64), which bounds a near-exact prediction's weight at 1e5.
ADAPTIVE_FLOOR = 1e-5


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, ..., 1] broadcastable against `like` [B, ...]."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def noised(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t eps.

    Args:
        x0: [B, C, h, w]; eps: [B, C, h, w]; t: [B].
    """
    tb = _bcast(t, x0)
    return (1 - tb) * x0 + tb * eps


def x0_prediction(v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """x0_hat = x_t - t v, [B, C, h, w]."""
    return x_t - _bcast(t, x_t) * v


def adaptive_x0_loss(v: Tensor, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
    """Adaptive x0 regression loss mean((x0_hat - x0)^2) / sg(mean|x0_hat - x0|), [B].

    The stop-gradient normaliser rescales each sample's loss to the size of its own error, so easy
    (small t) and hard (large t) terms contribute gradients of similar size. As in the paper's code
    and DiffusionNFT, it is computed in float64 and clamped at `ADAPTIVE_FLOOR` (1e-5); the loss
    keeps the dtype of `v`.
    """
    err = (x0_prediction(v, x_t, t) - x0).flatten(1)
    with torch.no_grad():
        norm = err.double().abs().mean(dim=1).clamp_min(ADAPTIVE_FLOOR).to(err.dtype)
    return (err**2).mean(dim=1) / norm


def flow_matching_error(v: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
    """mean((v - (eps - x0))^2) over the non-batch dims, [B]."""
    return ((v - (eps - x0)) ** 2).flatten(1).mean(dim=1)
