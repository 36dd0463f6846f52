"""The pure step functions against hand-computed values, and the Gaussian log-density."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from flowrl.samplers import (
    cps_step,
    dance_sde_step,
    ddim_step,
    dpm2_step,
    eps_from_velocity,
    euler_step,
    flow_sde_step,
    gaussian_log_prob,
    is_deterministic,
    x0_from_velocity,
)
from flowrl.samplers.ode import dpm2_inverse_step_ratio

X = torch.full((1, 1, 2, 2), 2.0, dtype=torch.float64)
V = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)


def close(a: torch.Tensor, value: float, tol: float = 1e-12) -> None:
    torch.testing.assert_close(a, torch.full_like(a, value), rtol=0, atol=tol)


# ------------------------------------------------------------------------------------------ ODE


def test_predictions():
    close(x0_from_velocity(X, V, 0.5), 2.0 - 0.5 * 0.5)
    close(eps_from_velocity(X, V, 0.5), 2.0 + 0.5 * 0.5)


def test_euler_step():
    close(euler_step(X, V, 0.5, 0.25), 2.0 - 0.25 * 0.5)


def test_ddim_step_and_its_last_step():
    x0 = torch.full_like(X, 1.75)
    close(ddim_step(X, x0, 0.5, 0.25), 0.5 * 2.0 + 0.5 * 1.75)
    close(ddim_step(X, x0, 0.5, 0.0), 1.75)
    # From pure noise (t = 1), where lambda = -inf, the step stays finite: (t'/t) x + (1 - t'/t) x0.
    close(ddim_step(X, x0, 1.0, 0.8), 0.8 * 2.0 + 0.2 * 1.75)


def test_dpm2_second_order_hand_value():
    lam = lambda t: math.log((1 - t) / t)  # noqa: E731
    h, h_prev = lam(0.25) - lam(0.5), lam(0.5) - lam(0.8)
    r = h_prev / h
    x0, prev = torch.full_like(X, 1.75), torch.full_like(X, 1.5)
    d = (1 + 1 / (2 * r)) * 1.75 - 1 / (2 * r) * 1.5
    close(dpm2_step(X, x0, 0.5, 0.25, prev, 0.8), 0.5 * 2.0 + 0.5 * d)
    # it differs from the first-order step (the previous prediction is used)
    assert not torch.allclose(dpm2_step(X, x0, 0.5, 0.25, prev, 0.8), ddim_step(X, x0, 0.5, 0.25))


def test_dpm2_first_order_cases():
    x0, prev = torch.full_like(X, 1.75), torch.full_like(X, 1.5)
    first = ddim_step(X, x0, 0.5, 0.25)
    torch.testing.assert_close(dpm2_step(X, x0, 0.5, 0.25), first, rtol=0, atol=0)
    # last step: lands on x0_hat exactly, whatever the previous prediction
    close(dpm2_step(X, x0, 0.5, 0.0, prev, 0.8), 1.75, tol=0)
    # previous point at t = 1 (lambda = -inf): r = inf, the step is first order
    torch.testing.assert_close(dpm2_step(X, x0, 0.5, 0.25, prev, 1.0), first, rtol=0, atol=1e-15)
    assert torch.isfinite(dpm2_inverse_step_ratio(1.0, 0.9, 0.0, X)).all()


def test_dpm2_needs_both_previous_values():
    with pytest.raises(ValueError, match="together"):
        dpm2_step(X, X, 0.5, 0.25, prev_x0_hat=X)


def test_per_image_times_equal_scalar_calls():
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v = torch.randn(3, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t, tn = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.7, 0.2, 0.0])
    batched = euler_step(x, v, t, tn)
    for i in range(3):
        torch.testing.assert_close(batched[i], euler_step(x[i : i + 1], v[i : i + 1], float(t[i]), float(tn[i]))[0])
    mean, std = flow_sde_step(x, v, t, tn, 0.7, sigma_max=0.95)
    assert std.shape == (3, 1, 1, 1)
    for i in range(3):
        m_i, s_i = flow_sde_step(x[i : i + 1], v[i : i + 1], float(t[i]), float(tn[i]), 0.7, sigma_max=0.95)
        torch.testing.assert_close(mean[i], m_i[0])
        torch.testing.assert_close(std[i].reshape(()), s_i)
    with pytest.raises(ValueError, match="one time per image"):
        euler_step(x, v, torch.tensor([0.5, 0.4]), 0.2)


def test_half_precision_inputs_step_in_float32():
    out = euler_step(X.bfloat16(), V.bfloat16(), 0.5, 0.25)
    assert out.dtype == torch.float32


# ------------------------------------------------------------------------------------------ SDE


def test_flow_sde_hand_values():
    # a = 0.7, t = 0.5 -> t' = 0.25: std_t = 0.7 sqrt(0.5 / 0.5) = 0.7, dt = -0.25
    mean, std = flow_sde_step(X, V, 0.5, 0.25, 0.7, sigma_max=0.9)
    close(mean, 2.0 * (1 + 0.49 * -0.25 / 1.0) + 0.5 * (1 + 0.49 * 0.5 / 1.0) * -0.25)  # 1.599375
    close(mean, 1.599375)
    close(std, 0.7 * 0.5)


def test_flow_sde_first_step_clamp():
    # t = 1: 1 / (1 - t) is evaluated at sigma_max = sigmas[1] = 0.8: std_t = 0.7 sqrt(1 / 0.2)
    mean, std = flow_sde_step(X, V, 1.0, 0.8, 0.7, sigma_max=0.8)
    var_t = 0.49 * 5
    close(mean, 2.0 * (1 + var_t * -0.2 / 2) + 0.5 * (1 + 0) * -0.2)
    close(std, math.sqrt(var_t * 0.2))  # = 0.7
    assert torch.isfinite(mean).all()
    # later steps (t < sigma_max) are not clamped
    _, std_later = flow_sde_step(X, V, 0.5, 0.25, 0.7, sigma_max=0.8)
    close(std_later, 0.35)


def test_flow_sde_without_noise_is_euler():
    mean, std = flow_sde_step(X, V, 0.5, 0.25, 0.0, sigma_max=0.9)
    torch.testing.assert_close(mean, euler_step(X, V, 0.5, 0.25))
    assert is_deterministic(std)


def test_dance_sde_hand_values():
    # x0_hat = 1.75, score = -(2 - 0.5 * 1.75) / 0.25 = -4.5
    mean, std = dance_sde_step(X, V, 0.5, 0.25, 0.3)
    close(mean, 2.0 - 0.25 * 0.5 - 0.5 * 0.09 * -4.5 * -0.25)  # 1.824375
    close(mean, 1.824375)
    close(std, 0.3 * 0.5)


def test_cps_hand_values_and_last_step():
    # std = 0.25 sin(pi/4); x0_hat = 1.75, eps_hat = 2.25
    mean, std = cps_step(X, V, 0.5, 0.25, 0.5)
    s = 0.25 * math.sin(math.pi / 4)
    close(std, s)
    close(mean, 0.75 * 1.75 + math.sqrt(0.0625 - s * s) * 2.25)
    mean0, std0 = cps_step(X, V, 0.5, 0.0, 0.8)
    close(mean0, 1.75)
    assert is_deterministic(std0)
    # a = 0 is DDIM
    torch.testing.assert_close(cps_step(X, V, 0.5, 0.25, 0.0)[0], ddim_step(X, x0_from_velocity(X, V, 0.5), 0.5, 0.25))


def test_cps_refuses_noise_level_above_one():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cps_step(X, V, 0.5, 0.25, 1.5)


@pytest.mark.parametrize(
    "step", [lambda a: flow_sde_step(X, V, 0.5, 0.25, a, sigma_max=0.9), lambda a: dance_sde_step(X, V, 0.5, 0.25, a)]
)
def test_refuses_negative_noise(step):
    with pytest.raises(ValueError, match=">= 0"):
        step(-0.1)


# ------------------------------------------------------------------------------------ log-prob


@pytest.mark.parametrize("std_shape", ["scalar", "per-image"])
def test_log_prob_matches_torch_normal(std_shape: str):
    g = torch.Generator().manual_seed(0)
    x, mean = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    std = torch.tensor(0.37) if std_shape == "scalar" else torch.tensor([0.2, 0.5, 1.3]).view(3, 1, 1, 1)
    dense = Normal(mean, std.expand_as(mean)).log_prob(x)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std, reduction="mean"), dense.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(gaussian_log_prob(x, mean, std, reduction="sum"), dense.sum(dim=(1, 2, 3)))


def test_log_prob_of_a_flow_sde_step():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    mean, std = flow_sde_step(x, v, 0.6, 0.4, 0.7, sigma_max=0.9)
    x_next = mean + std * torch.randn(x.shape, generator=g)
    expected = Normal(mean, std.expand_as(mean)).log_prob(x_next)
    torch.testing.assert_close(gaussian_log_prob(x_next, mean, std, reduction="mean"), expected.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(gaussian_log_prob(x_next, mean, std, reduction="sum"), expected.sum(dim=(1, 2, 3)))


def test_log_prob_of_a_deterministic_step_is_zero():
    x = torch.randn(2, 3, 4, 4)
    assert gaussian_log_prob(x, x, 0.0, reduction="mean").tolist() == [0.0, 0.0]
    mixed = torch.tensor([0.0, 0.5]).view(2, 1, 1, 1)
    lp = gaussian_log_prob(x, x, mixed, reduction="sum")
    assert lp[0] == 0 and lp[1] == pytest.approx(48 * (-math.log(0.5) - 0.5 * math.log(2 * math.pi)), rel=1e-5)


def test_log_prob_refuses_unknown_reduction_and_negative_std():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="reduction"):
        gaussian_log_prob(x, x, 1.0, reduction="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 0"):
        gaussian_log_prob(x, x, -1.0, reduction="mean")
