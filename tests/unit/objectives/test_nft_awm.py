"""DiffusionNFT and AWM: advantage mapping, gradient signs, loss composition."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from flowrl.flow import adaptive_x0_loss, noised
from flowrl.objectives import AWM, NFT, KLConfig, awm_loss, nft_loss, nft_weight
from flowrl.objectives.awm import GHUBER_OFFSET, ghuber_log_likelihood
from flowrl.objectives.nft import implicit_policies
from flowrl.types import LikelihoodTerms


def test_nft_weight_on_hand_values():
    adv = torch.tensor([0.0, 5.0, 12.0, -5.0, -7.0, 2.5, -1.0])
    torch.testing.assert_close(nft_weight(adv, 5.0), torch.tensor([0.5, 1.0, 1.0, 0.0, 0.0, 0.75, 0.4]))


def test_implicit_policies():
    v, vo = torch.tensor([2.0]), torch.tensor([1.0])
    vp, vn = implicit_policies(v, vo, 0.1)
    assert vp.item() == pytest.approx(1.1) and vn.item() == pytest.approx(0.9)


def _batch(seed=0, b=4):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(b, 2, 3, 3, generator=g), torch.randn(b, 2, 3, 3, generator=g)
    t = torch.rand(b, generator=g) * 0.8 + 0.1
    v = (eps - x0) + 0.5 * torch.randn(b, 2, 3, 3, generator=g)
    return x0, eps, t, v


def test_nft_gradient_raises_likelihood_of_positive_samples():
    x0, eps, t, v = _batch()
    adv = torch.tensor([3.0, -3.0, 0.0, 10.0])
    v_theta = v.clone().requires_grad_(True)
    (g_nft,) = torch.autograd.grad(nft_loss(v_theta, v, x0, eps, t, adv, 5.0, 0.1).sum(), v_theta)
    x_t = noised(x0, eps, t)
    # per-sample gradient of the sample's likelihood (minus its adaptive loss)
    (g_like,) = torch.autograd.grad((-adaptive_x0_loss(v_theta, x_t, x0, t)).sum(), v_theta)
    step = -g_nft  # gradient-descent direction
    align = (step * g_like).flatten(1).sum(1)
    assert align[0] > 0 and align[3] > 0  # positive advantage: likelihood goes up
    assert align[1] < 0  # negative advantage: likelihood goes down
    assert g_nft[2].abs().max() < 1e-6  # A = 0 (r = 0.5): v+ and v- pulls cancel at v_theta = v_old
    # at v_theta = v_old the gradient is M (2r - 1) dL/dv: hand-check for the clipped sample
    (g_l,) = torch.autograd.grad(adaptive_x0_loss(v_theta, x_t, x0, t).sum(), v_theta)
    torch.testing.assert_close(g_nft[3], 5.0 * g_l[3])


def test_nft_loss_value_at_equal_policies():
    x0, eps, t, v = _batch()
    adv = torch.tensor([3.0, -3.0, 0.0, 10.0])
    x_t = noised(x0, eps, t)
    # v+ = v- = v_old: the loss is M L(v_old) / g whatever r is
    torch.testing.assert_close(nft_loss(v, v, x0, eps, t, adv, 5.0, 0.1), 5.0 * adaptive_x0_loss(v, x_t, x0, t) / 0.1)


def test_awm_hand_gradient_and_sign():
    x0, eps, t, v = _batch()
    adv = torch.tensor([1.0, -2.0, 0.0, 0.5])
    v_theta = v.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(awm_loss(v_theta, x0, eps, adv).sum(), v_theta)
    u = eps - x0
    n = v[0].numel()
    torch.testing.assert_close(g, adv.view(-1, 1, 1, 1) * 2 * (v - u) / n)
    toward_target = (-g * (u - v)).flatten(1).sum(1)
    assert toward_target[0] > 0 and toward_target[3] > 0 and toward_target[1] < 0


def _terms(v_theta, v_old, x0, eps, t, kl):
    l = torch.zeros(x0.shape[0])
    return LikelihoodTerms(l_theta=l, l_old=l, kl=kl, t=t, weight=0.5, v_theta=v_theta, v_old=v_old, x0=x0, eps=eps)


def test_stages_compose_weight_and_kl():
    x0, eps, t, v = _batch()
    adv = torch.tensor([1.0, -2.0, 0.0, 0.5])
    kl = torch.tensor([1.0, 1.0, 3.0, 3.0])
    nft = NFT(NFT.Config(kind="nft", guidance_strength=0.1, kl=KLConfig(beta=0.1)))
    out = nft(_terms(v, v, x0, eps, t, kl), adv)
    assert out.loss.item() == pytest.approx(0.5 * (nft_loss(v, v, x0, eps, t, adv, 5.0, 0.1).mean().item() + 0.1 * 2.0), rel=1e-6)
    awm = AWM(AWM.Config(kind="awm", kl=KLConfig(beta=0.1)))
    out = awm(_terms(v, v, x0, eps, t, kl), adv)
    assert out.loss.item() == pytest.approx(0.5 * (awm_loss(v, x0, eps, adv).mean().item() + 0.1 * 2.0), rel=1e-6)
    assert out.metrics["ratio_mean"] == 1.0


def test_nft_config():
    c = NFT.Config(kind="nft")
    assert (c.adv_clip, c.guidance_strength) == (5.0, 1.0)  # DiffusionNFT's base and GenEval configs
    for bad in ({"adv_clip": 0.0}, {"guidance_strength": -0.1}, {"beta": 1.0}):
        with pytest.raises(ValidationError):
            NFT.Config.model_validate({"kind": "nft", **bad})


def test_awm_ghuber_log_likelihood_hand_values():
    # v - u = 0.5 everywhere: mse = 0.25; t = 0.375, p = 0.25: l = -0.375 ((0.25 + d)^0.25 - d^0.25) / 0.25
    x0, eps = torch.zeros(1, 2, 1, 1), torch.ones(1, 2, 1, 1)
    v = torch.full((1, 2, 1, 1), 1.5)
    t = torch.tensor([0.375])
    d = GHUBER_OFFSET
    want = -0.375 * ((0.25 + d) ** 0.25 - d**0.25) / 0.25
    got = ghuber_log_likelihood(v, x0, eps, t, 0.25)
    assert got.dtype == torch.float64 and got.item() == pytest.approx(want, rel=1e-12)
    # p = 1 is the t-weighted flow-matching error
    assert ghuber_log_likelihood(v, x0, eps, t, 1.0).item() == pytest.approx(-0.375 * 0.25, rel=1e-9)


def test_awm_released_recipe_loss_and_gradient():
    """AWM's recipe: loss -A' l with A' = 0.2 A, plus old_beta mean((v - v_old)^2); its gradient per
    sample is A' t mse^(p - 1) d(mse)/dv + 2 old_beta (v - v_old) / n."""
    x0, eps, t, v = _batch()
    v_old = v + 0.1
    adv = torch.tensor([1.0, -2.0, 0.0, 5.0])
    cfg = AWM.Config(kind="awm", weighting="ghuber", advantage_scale=0.2, old_beta=1.0, kl=KLConfig(beta=0.0))
    v_theta = v.clone().requires_grad_(True)
    kl = torch.zeros(4)
    out = AWM(cfg)(_terms(v_theta, v_old, x0, eps, t, kl), adv)
    u = eps - x0
    n = v[0].numel()
    mse = ((v - u) ** 2).flatten(1).mean(1).double()
    ll = -t.double() * ((mse + GHUBER_OFFSET) ** 0.25 - GHUBER_OFFSET**0.25) / 0.25
    pull = ((v - v_old) ** 2).flatten(1).mean(1)
    want = 0.5 * ((-0.2 * adv.double() * ll).float() + pull).mean()
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)
    (g,) = torch.autograd.grad(out.loss, v_theta)
    a = (0.2 * adv * t).view(-1, 1, 1, 1) * mse.float().view(-1, 1, 1, 1) ** (0.25 - 1)
    hand = 0.5 / 4 * (a * 2 * (v - u) / n + 2 * (v - v_old) / n)
    torch.testing.assert_close(g, hand, rtol=1e-4, atol=1e-8)
