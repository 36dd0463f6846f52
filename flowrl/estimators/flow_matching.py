"""Flow-matching pure functions shared by the ELBO estimator and the velocity objectives (NFT, AWM).

A leaf module (imports no other flowrl module) so objectives can use it without an import cycle
through flowrl.estimators -> flowrl.objectives.kl.
"""

from __future__ import annotations

from torch import Tensor

#: Keeps the adaptive normaliser finite when a prediction is exact (never reached in practice).
_ADAPTIVE_FLOOR = 1e-8


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
    (small t) and hard (large t) terms contribute gradients of similar size.
    """
    err = (x0_prediction(v, x_t, t) - x0).flatten(1)
    norm = err.abs().mean(dim=1).detach().clamp_min(_ADAPTIVE_FLOOR)
    return (err**2).mean(dim=1) / norm


def flow_matching_error(v: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
    """mean((v - (eps - x0))^2) over the non-batch dims, [B]."""
    return ((v - (eps - x0)) ** 2).flatten(1).mean(dim=1)
