"""Likelihood estimators: ELBO (final sample only, any sampler) and trajectory (per-step Gaussian,
SDE samplers). Importing this package registers the estimator stages "elbo" and "trajectory".

Call of either: ``estimator(rollout, model, kl, generator) -> Iterator[LikelihoodTerms]``, one
Monte-Carlo term at a time so the trainer can backward each term and free its graph.
"""

from __future__ import annotations

from flowrl.estimators.elbo import ElboConfig, ElboEstimator, draw_timestep_indices, elbo_weighted, num_terms
from flowrl.flow import adaptive_x0_loss, flow_matching_error, noised, x0_prediction
from flowrl.estimators.trajectory import SDE_SAMPLERS, TrajectoryConfig, TrajectoryEstimator, sampler_problems

__all__ = [
    "SDE_SAMPLERS",
    "ElboConfig",
    "ElboEstimator",
    "TrajectoryConfig",
    "TrajectoryEstimator",
    "adaptive_x0_loss",
    "draw_timestep_indices",
    "elbo_weighted",
    "flow_matching_error",
    "noised",
    "num_terms",
    "sampler_problems",
    "x0_prediction",
]
