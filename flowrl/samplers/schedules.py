"""Sigma (time) grids of the samplers.

A grid is a float32 tensor [T + 1] decreasing from 1 (pure noise) to 0 (the clean sample); step k
goes from ``sigmas[k]`` to ``sigmas[k + 1]``. Samplers take the grid explicitly, never a scheduler
with a step index.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def sd3_sigmas(steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> Tensor:
    """SD3's shifted time grid, exactly as diffusers' ``FlowMatchEulerDiscreteScheduler`` builds it.

    sigma(s) = shift * s / (1 + (shift - 1) * s) on s = linspace(1, s_min, steps), then a final 0.
    ``StableDiffusion3Pipeline`` passes no custom sigmas (nor does the paper's code), so the scheduler
    spaces s from 1 down to its smallest *training* sigma, which diffusers has already shifted once:
    s_min = sigma(1 / num_train_timesteps). The last nonzero time is therefore sigma applied twice to
    1/1000 (0.0089 for shift 3), not sigma(1 / steps) as in Flux's grid.

    Args:
        steps: number of sampler steps T >= 1.
        shift: the time shift (3.0 for SD3.5; 1.0 = unshifted).
        num_train_timesteps: the scheduler's training timesteps (1000 for SD3).

    Returns:
        float32 [T + 1], sigmas[0] = 1, sigmas[T] = 0, strictly decreasing.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}; a sampler needs at least one step")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}; SD3.5 uses 3.0, and 1.0 means no shift")

    def shifted(s: np.ndarray | float) -> np.ndarray | float:
        return shift * s / (1 + (shift - 1) * s)

    s_min = shifted(1.0 / num_train_timesteps)
    s = np.linspace(1.0, s_min, steps, dtype=np.float64)
    sigmas = torch.from_numpy(shifted(s)).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float32)])
