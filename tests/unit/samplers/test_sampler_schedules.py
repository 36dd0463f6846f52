"""The SD3 time grid equals what diffusers' scheduler (as StableDiffusion3Pipeline drives it) builds."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

from flowrl.samplers import sd3_sigmas


@pytest.mark.parametrize("steps", [1, 2, 10, 20, 40])
@pytest.mark.parametrize("shift", [3.0, 1.0])
def test_equals_diffusers_scheduler(steps: int, shift: float):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    ours = sd3_sigmas(steps, shift)
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,)
    torch.testing.assert_close(ours, scheduler.sigmas, rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps", [10, 40])
def test_equals_the_grid_the_sd3_pipeline_uses(steps: int):
    # The pipeline calls retrieve_timesteps without custom sigmas; this is that call.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=None)
    torch.testing.assert_close(sd3_sigmas(steps), scheduler.sigmas, rtol=0, atol=1e-6)


def test_hand_values():
    # shift 3: s = linspace(1, s_min, 2) with s_min = 3e-3 / 1.002; sigma(s) = 3s / (1 + 2s).
    s_min = 3 * 0.001 / (1 + 2 * 0.001)
    expected = torch.tensor([1.0, 3 * s_min / (1 + 2 * s_min), 0.0])
    torch.testing.assert_close(sd3_sigmas(2), expected, rtol=0, atol=1e-7)
    assert sd3_sigmas(1).tolist() == [1.0, 0.0]


def test_shape_and_order():
    s = sd3_sigmas(10)
    assert s[0] == 1.0 and s[-1] == 0.0
    assert bool((s[1:] < s[:-1]).all())


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_refuses_bad_steps(bad):
    with pytest.raises(ValueError, match="steps"):
        sd3_sigmas(bad)


def test_refuses_bad_shift():
    with pytest.raises(ValueError, match="shift"):
        sd3_sigmas(10, shift=0.0)
