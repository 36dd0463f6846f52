"""Objectives (loss functionals over likelihood terms), and the KL-to-reference terms of
flowrl/kl.py re-exported.

Importing this package registers the stages: objectives epg, epg-noratio, pepg, par, grpo, nft,
awm; KL kinds girsanov, gaussian-step, flowgrpo-step, elbo-k1, elbo-k2, elbo-k3.
"""

from __future__ import annotations

from flowrl.kl import (
    KL_ESTIMATORS,
    KLConfig,
    check_kl,
    elbo_k1,
    elbo_k2,
    elbo_k3,
    flowgrpo_step,
    gaussian_step,
    girsanov,
    kl_problem,
    supported_estimators,
    supported_kl_kinds,
)
from flowrl.objectives.policy_gradient import (
    EPG,
    GRPO,
    PAR,
    PEPG,
    EPGNoRatio,
    Objective,
    ObjectiveConfig,
    epg_loss,
    epg_noratio_loss,
    grpo_loss,
    log_ratio,
    par_loss,
    pepg_loss,
    requirement_problem,
)
from flowrl.objectives.nft import NFT, nft_loss, nft_weight  # noqa: E402  (after policy_gradient)
from flowrl.objectives.awm import AWM, awm_loss  # noqa: E402

__all__ = [
    "AWM", "EPG", "GRPO", "KL_ESTIMATORS", "NFT", "PAR", "PEPG", "EPGNoRatio", "KLConfig", "Objective",
    "ObjectiveConfig", "awm_loss", "check_kl", "elbo_k1", "elbo_k2", "elbo_k3", "epg_loss",
    "epg_noratio_loss", "flowgrpo_step", "gaussian_step", "girsanov", "grpo_loss", "kl_problem", "log_ratio", "nft_loss",
    "nft_weight", "par_loss", "pepg_loss", "requirement_problem", "supported_estimators", "supported_kl_kinds",
]  # fmt: skip
