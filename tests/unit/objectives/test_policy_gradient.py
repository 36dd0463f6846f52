"""Policy-gradient objectives: gradient identities, GRPO clipping, stage loss and metrics, configs."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from flowrl import registry
from flowrl.objectives import (
    EPG,
    GRPO,
    PAR,
    PEPG,
    EPGNoRatio,
    KLConfig,
    epg_loss,
    epg_noratio_loss,
    grpo_loss,
    par_loss,
    pepg_loss,
)
from flowrl.types import LikelihoodTerms


def _random(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    l_theta = (torch.randn(n, generator=g) * 0.3).requires_grad_(True)
    l_old = l_theta.detach() + torch.randn(n, generator=g) * 0.2
    adv = torch.randn(n, generator=g)
    return l_theta, l_old, adv


def _grad(fn, l_theta, *args):
    (g,) = torch.autograd.grad(fn(l_theta, *args).sum(), l_theta)
    return g


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pepg_and_par_have_equal_gradients(seed):
    l_theta, l_old, adv = _random(seed)
    g_pepg, g_par = _grad(pepg_loss, l_theta, l_old, adv), _grad(par_loss, l_theta, l_old, adv)
    torch.testing.assert_close(g_pepg, g_par)
    # and both equal -rho (A - log rho)
    lr = l_theta.detach() - l_old
    torch.testing.assert_close(g_pepg, -lr.exp() * (adv - lr))


def test_epg_equals_pepg_when_policies_agree():
    l_theta, _, adv = _random()
    l_old = l_theta.detach().clone()
    torch.testing.assert_close(epg_loss(l_theta, l_old, adv), pepg_loss(l_theta, l_old, adv))
    torch.testing.assert_close(_grad(epg_loss, l_theta, l_old, adv), _grad(pepg_loss, l_theta, l_old, adv))
    torch.testing.assert_close(_grad(epg_loss, l_theta, l_old, adv), -adv)


def test_epg_gradient_is_ratio_weighted():
    l_theta, l_old, adv = _random()
    torch.testing.assert_close(_grad(epg_loss, l_theta, l_old, adv), -(l_theta.detach() - l_old).exp() * adv)


def test_epg_noratio_gradient_is_minus_advantage():
    l_theta, _, adv = _random()
    torch.testing.assert_close(_grad(epg_noratio_loss, l_theta, adv), -adv)


def test_grpo_clipping_on_hand_values():
    eps = 0.1
    rho = torch.tensor([1.5, 0.5, 1.05, 0.5, 1.5, 1.0])
    adv = torch.tensor([1.0, -1.0, 2.0, 1.0, -1.0, 0.0])
    l_old = torch.zeros(6)
    l_theta = rho.log().requires_grad_(True)
    loss, cut = grpo_loss(l_theta, l_old, adv, eps)
    torch.testing.assert_close(loss.detach(), torch.tensor([-1.1, 0.9, -2.1, -0.5, 1.5, 0.0]))
    (g,) = torch.autograd.grad(loss.sum(), l_theta)
    # d(-A rho)/d l = -A rho where unclipped; 0 where the clip is active
    torch.testing.assert_close(g, torch.tensor([0.0, 0.0, -2.1, -0.5, 1.5, 0.0]))
    assert cut.tolist() == [True, True, False, False, False, False]


def _terms(l_theta, l_old, kl=None, weight=1.0):
    return LikelihoodTerms(l_theta=l_theta, l_old=l_old, kl=torch.zeros_like(l_old) if kl is None else kl, t=torch.full_like(l_old, 0.5), weight=weight)


def test_grpo_stage_clip_frac_and_metrics():
    rho = torch.tensor([1.5, 0.5, 1.05, 0.5])
    adv = torch.tensor([1.0, -1.0, 2.0, 1.0])
    out = GRPO(GRPO.Config(kind="grpo", clip_range=0.1, kl=KLConfig(beta=0.0)))(_terms(rho.log().requires_grad_(True), torch.zeros(4)), adv)
    m = out.metrics
    assert m["clip_frac"] == 0.5
    assert m["ratio_max"] == pytest.approx(1.5) and m["ratio_min"] == pytest.approx(0.5)
    assert m["ratio_mean"] == pytest.approx(0.8875)
    expected_akl = sum((r - 1) - math.log(r) for r in rho.tolist()) / 4
    assert m["approx_kl"] == pytest.approx(expected_akl, rel=1e-5)
    assert out.loss.item() == pytest.approx((-1.1 + 0.9 - 2.1 - 0.5) / 4, rel=1e-5)
    assert all(isinstance(v, float) for v in m.values())


@pytest.mark.parametrize("cls", [EPG, EPGNoRatio, PEPG, PAR, GRPO])
def test_stage_loss_is_weighted_mean_plus_beta_kl(cls):
    l_theta, l_old, adv = _random(n=4)
    kl = torch.tensor([0.0, 1.0, 2.0, 3.0], requires_grad=True)
    obj = cls(cls.Config(kind=cls.stage_name, kl=KLConfig(beta=0.5)))
    out = obj(_terms(l_theta, l_old, kl, weight=0.25), adv)
    per = {"epg": epg_loss(l_theta, l_old, adv), "epg-noratio": epg_noratio_loss(l_theta, adv), "pepg": pepg_loss(l_theta, l_old, adv),
           "par": par_loss(l_theta, l_old, adv), "grpo": grpo_loss(l_theta, l_old, adv, 1e-3)[0]}[cls.stage_name]  # fmt: skip
    assert out.loss.item() == pytest.approx(0.25 * (per.mean().item() + 0.5 * 1.5), rel=1e-6)
    assert out.metrics["kl"] == pytest.approx(1.5)
    assert out.metrics["loss"] == pytest.approx(out.loss.item())
    assert set(out.metrics) >= {"ratio_mean", "ratio_min", "ratio_max", "clip_frac", "approx_kl", "kl", "loss"}
    out.loss.backward()
    assert kl.grad is not None and kl.grad[0].item() == pytest.approx(0.25 * 0.5 / 4)
    if cls is not GRPO:
        assert out.metrics["clip_frac"] == 0.0


def test_ratio_metrics_at_init_are_exactly_one():
    l = torch.randn(8, requires_grad=True)
    m = PEPG()(_terms(l, l.detach().clone()), torch.randn(8)).metrics
    assert (m["ratio_mean"], m["ratio_min"], m["ratio_max"], m["approx_kl"]) == (1.0, 1.0, 1.0, 0.0)


def test_configs_refuse_bad_values_and_default_kl():
    assert PEPG.Config(kind="pepg").kl == KLConfig()
    assert GRPO.Config(kind="grpo").clip_range == 1e-3
    for cls, bad in [
        (GRPO, {"clip_range": 0.0}),
        (GRPO, {"clip_range": -1e-3}),
        (PEPG, {"kl": {"beta": -1.0}}),
        (PEPG, {"clip_range": 0.1}),  # pepg has no clip
        (EPG, {"kind": "pepg"}),
    ]:
        with pytest.raises(ValidationError):
            cls.Config.model_validate({"kind": cls.stage_name, **bad})


def test_registered_objectives_and_requirements():
    assert registry.names("objective") == ["awm", "epg", "epg-noratio", "grpo", "nft", "par", "pepg"]
    assert registry.lookup("objective", "pepg").requires == {"l_theta", "l_old", "kl"}
    for name in ("nft", "awm"):
        assert {"v_theta", "x0", "eps", "t"} <= registry.lookup("objective", name).requires


def test_requirement_problem_between_objectives_and_estimators():
    from flowrl.objectives import requirement_problem

    elbo, traj = registry.lookup("estimator", "elbo"), registry.lookup("estimator", "trajectory")
    for name in registry.names("objective"):
        assert requirement_problem(registry.lookup("objective", name), elbo) is None
    msg = requirement_problem(registry.lookup("objective", "nft"), traj)
    assert msg is not None and "v_theta" in msg and "estimator.kind: elbo" in msg
    assert requirement_problem(registry.lookup("objective", "awm"), traj) is not None
    assert requirement_problem(registry.lookup("objective", "pepg"), traj) is None
