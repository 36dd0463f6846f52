"""KL terms on hand values, their config, and the estimator/KL compatibility check."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from flowrl import registry
from flowrl.errors import FlowrlError
from flowrl.kl import (
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


def test_girsanov_hand_value_and_zero_when_equal():
    v = torch.tensor([[1.0, 2.0], [0.0, -3.0]]).view(2, 2, 1, 1)
    assert girsanov(v, torch.zeros_like(v)).tolist() == [2.5, 4.5]
    assert torch.equal(girsanov(v, v.clone()), torch.zeros(2))


def test_gaussian_step_hand_values_both_reductions():
    m = torch.tensor([[2.0, 4.0]]).view(1, 2, 1, 1)
    # (diff^2) / (2 * 2^2) = [0.5, 2]
    assert gaussian_step(m, torch.zeros_like(m), 2.0, "mean").item() == pytest.approx(1.25)
    assert gaussian_step(m, torch.zeros_like(m), torch.tensor(2.0).view(1, 1, 1, 1), "sum").item() == pytest.approx(2.5)
    with pytest.raises(ValueError):
        gaussian_step(m, m, 1.0, "max")


def test_flowgrpo_step_is_the_exact_kl_times_abs_dt():
    # FlowGRPO divides by 2 std_t^2 with std_t = std / sqrt(-dt): m^2 has mean 5 (sum 10), std 2 and
    # dt -0.25 give 5 / (2 * 4 / 0.25) = 0.15625, i.e. the exact 5 / 8 = 0.625 times 0.25.
    m = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    zero = torch.zeros_like(m)
    assert flowgrpo_step(m, zero, 2.0, -0.25, "mean").item() == pytest.approx(0.15625)
    assert flowgrpo_step(m, zero, 2.0, -0.25, "sum").item() == pytest.approx(0.3125)
    with pytest.raises(ValueError, match="dt"):
        flowgrpo_step(m, zero, 2.0, 0.1)


def test_flowgrpo_beta_is_1_over_dt_weaker_than_the_exact_form_on_the_sd3_grid():
    """The exact form is larger by 1 / |dt|: 3.7x (the 0.278 -> 0.0089 step's neighbour) to 112x
    (the last step) on SD3's 10-step grid, so FlowGRPO's beta 0.04 under it over-regularises."""
    from flowrl.samplers import sd3_sigmas

    s = sd3_sigmas(10).tolist()
    m = torch.full((1, 2, 1, 1), 0.3)
    ratios = [
        (gaussian_step(m, 0 * m, 0.5, "mean") / flowgrpo_step(m, 0 * m, 0.5, s[k + 1] - s[k], "mean")).item()
        for k in range(10)
    ]
    assert min(ratios) == pytest.approx(3.72, abs=0.01) and max(ratios) == pytest.approx(112.0, abs=0.1)


def test_flowcps_reduction_gives_flowcps_kl():
    # FlowCPS: kl = mean((mean_theta - mean_ref)^2), no variance in its log-prob form to divide by
    m = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    assert gaussian_step(m, torch.zeros_like(m), 2.0, "flowcps").item() == pytest.approx(5.0)
    assert flowgrpo_step(m, torch.zeros_like(m), 2.0, -0.25, "flowcps").item() == pytest.approx(5.0)


def test_elbo_k_forms_hand_values():
    d = torch.tensor([-1.0, 0.0, 2.0])
    assert torch.equal(elbo_k1(d), d)
    assert elbo_k2(d).tolist() == [0.5, 0.0, 2.0]
    torch.testing.assert_close(elbo_k3(d), torch.tensor([math.exp(-1), 0.0, math.exp(2) - 3]))


def test_k3_is_nonnegative_and_tangent_to_zero():
    d = torch.linspace(-20, 5, 1001)
    assert bool((elbo_k3(d) >= 0).all())
    d0 = torch.zeros(1, requires_grad=True)
    (g,) = torch.autograd.grad(elbo_k3(d0).sum(), d0)
    assert g.item() == 0.0


def test_kl_config_defaults_and_refusals():
    c = KLConfig()
    assert (c.kind, c.beta) == ("girsanov", 1e-4)
    for bad in ({"beta": -1.0}, {"kind": "reverse"}, {"coef": 1.0}):
        with pytest.raises(ValidationError):
            KLConfig.model_validate(bad)
    with pytest.raises(ValidationError):
        c.beta = 2.0  # frozen


def test_supported_kinds_per_estimator():
    assert supported_kl_kinds("elbo") == ("girsanov", "elbo-k1", "elbo-k2", "elbo-k3")
    assert supported_kl_kinds("trajectory") == ("girsanov", "gaussian-step", "flowgrpo-step")
    assert supported_estimators("flowgrpo-step") == ("trajectory",)
    assert supported_estimators("gaussian-step") == ("trajectory",)
    assert supported_estimators("girsanov") == ("elbo", "trajectory")
    with pytest.raises(ValueError, match="girsanov"):
        supported_estimators("forward")


def test_contradictions_are_refused_with_a_fix():
    msg = kl_problem("elbo", KLConfig(kind="gaussian-step"))
    assert msg is not None and "trajectory" in msg and "girsanov" in msg and "objective.kl.kind" in msg
    assert kl_problem("trajectory", KLConfig(kind="elbo-k3")) is not None
    with pytest.raises(FlowrlError, match="elbo"):
        check_kl("trajectory", KLConfig(kind="elbo-k1"))
    # fine pairings, a switched-off KL, and no KL at all
    assert kl_problem("trajectory", KLConfig(kind="gaussian-step")) is None
    assert kl_problem("elbo", KLConfig(kind="elbo-k2")) is None
    assert kl_problem("elbo", KLConfig(kind="gaussian-step", beta=0.0)) is None
    check_kl("elbo", None)


def test_kl_kinds_are_registered_and_callable():
    assert registry.names("kl") == ["elbo-k1", "elbo-k2", "elbo-k3", "flowgrpo-step", "gaussian-step", "girsanov"]
    k3 = registry.lookup("kl", "elbo-k3")
    assert k3.Config.model_validate({"kind": "elbo-k3", "beta": 0.1}).beta == 0.1
    with pytest.raises(ValidationError):
        k3.Config.model_validate({"kind": "girsanov"})
    assert k3()(torch.tensor([0.0])).item() == 0.0
    v = torch.ones(1, 2, 1, 1)
    assert registry.lookup("kl", "girsanov")()(v, 0 * v).item() == 1.0
