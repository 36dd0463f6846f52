"""Rollout samplers: explicit time grids and pure step functions (ODE and SDE), a sampling loop with
per-image seeding, and the registered sampler stages. Importing this package registers
euler, dpm2, flow-sde, dance-sde and cps."""

from __future__ import annotations

from flowrl.samplers.common import eps_from_velocity, x0_from_velocity
from flowrl.samplers.loop import (
    METHODS,
    ODE_METHODS,
    SDE_METHODS,
    STEP_NOISE_OFFSET,
    generators_for,
    initial_noise,
    sample,
)
from flowrl.samplers.ode import ddim_step, dpm2_step, euler_step
from flowrl.samplers.schedules import sd3_sigmas
from flowrl.samplers.sde import (
    cps_step,
    dance_sde_step,
    flow_sde_step,
    gaussian_log_prob,
    is_deterministic,
    sde_distribution,
)
from flowrl.samplers.stages import Cps, DanceSde, Dpm2, Euler, FlowSde, step_distribution

__all__ = [
    "METHODS",
    "ODE_METHODS",
    "SDE_METHODS",
    "STEP_NOISE_OFFSET",
    "Cps",
    "DanceSde",
    "Dpm2",
    "Euler",
    "FlowSde",
    "cps_step",
    "dance_sde_step",
    "ddim_step",
    "dpm2_step",
    "eps_from_velocity",
    "euler_step",
    "flow_sde_step",
    "gaussian_log_prob",
    "generators_for",
    "initial_noise",
    "is_deterministic",
    "sample",
    "sd3_sigmas",
    "sde_distribution",
    "step_distribution",
    "x0_from_velocity",
]
