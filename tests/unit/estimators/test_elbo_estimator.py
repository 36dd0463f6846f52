"""ELBO estimator: weightings by hand, timestep draws, common random numbers, KL, configs."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from flowrl.errors import FlowrlError
from flowrl.estimators.elbo import ElboConfig, ElboEstimator, draw_timestep_indices, elbo_weighted, num_terms
from flowrl.flow import adaptive_x0_loss, noised
from flowrl.kl import KLConfig

WEIGHTINGS = ("adaptive", "t", "uniform", "exact")


def _terms(model, rollout, seed=0, kl=None, **cfg):
    est = ElboEstimator(ElboConfig(kind="elbo", **cfg))
    return list(est(rollout, model, kl, torch.Generator().manual_seed(seed)))


# ------------------------------------------------------------------------------------ weightings


def _tiny():
    # x0 = [1, -1], eps = [0, 2], t = 0.5, v = [-0.5, 2.5]: u = [-1, 3], v - u = [0.5, -0.5],
    # x_t = [0.5, 0.5], x0_hat = [0.75, -0.75], x0_hat - x0 = [-0.25, 0.25].
    x0 = torch.tensor([[1.0, -1.0]]).view(1, 2, 1, 1)
    eps = torch.tensor([[0.0, 2.0]]).view(1, 2, 1, 1)
    v = torch.tensor([[-0.5, 2.5]]).view(1, 2, 1, 1)
    t = torch.tensor([0.5])
    return v, noised(x0, eps, t), x0, eps, t


@pytest.mark.parametrize(
    "weighting, guidance, expected",
    [
        ("adaptive", 1.0, -0.0625 / 0.25),
        ("adaptive", 2.0, -0.0625 / 0.25 / 2),
        ("t", 1.0, -0.0625),
        ("t", 2.0, -0.0625),  # the paper's code divides only adaptive (by g) and uniform (by g^2)
        ("uniform", 1.0, -0.25),
        ("uniform", 2.0, -0.25 / 4),
        ("uniform", 4.5, -0.25 / 20.25),
        ("exact", 1.0, -(0.5 / 0.501) * 0.25),
        ("exact", 2.0, -(0.5 / 0.501) * 0.25),
    ],
)
def test_weightings_on_hand_values(weighting, guidance, expected):
    v, x_t, x0, eps, t = _tiny()
    assert torch.equal(x_t.flatten(), torch.tensor([0.5, 0.5]))
    out = elbo_weighted(v, x_t, x0, eps, t, weighting, guidance)
    assert out.shape == (1,)
    assert out.item() == pytest.approx(expected, rel=1e-6)


def test_t_weighting_is_t_squared_flow_matching():
    g = torch.Generator().manual_seed(0)
    x0, eps, v = (torch.randn(5, 3, 4, 4, generator=g) for _ in range(3))
    t = torch.rand(5, generator=g)
    x_t = noised(x0, eps, t)
    lhs = elbo_weighted(v, x_t, x0, eps, t, "t")
    rhs = -(t**2) * ((v - (eps - x0)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(lhs, rhs)
    # exact vanishes at t = 1 (pure noise carries no information about x0)
    assert elbo_weighted(v, noised(x0, eps, torch.ones(5)), x0, eps, torch.ones(5), "exact").abs().max() == 0


def test_adaptive_normaliser_is_stop_gradient():
    v, x_t, x0, eps, t = _tiny()
    v = v.clone().requires_grad_(True)
    (g_adaptive,) = torch.autograd.grad(elbo_weighted(v, x_t, x0, eps, t, "adaptive").sum(), v)
    (g_t,) = torch.autograd.grad(elbo_weighted(v, x_t, x0, eps, t, "t").sum(), v)
    # Without the stop-gradient the normaliser's own derivative would change this ratio.
    torch.testing.assert_close(g_adaptive, g_t / 0.25)


def test_adaptive_each_policy_uses_its_own_normaliser():
    v, x_t, x0, eps, t = _tiny()
    # 2v: x0_hat = [1, -2], error [0, -1]: mse 0.5 / its own mae 0.5 = 1 (v's mae 0.25 would give 2).
    assert adaptive_x0_loss(2 * v, x_t, x0, t).item() == pytest.approx(1.0)


def test_adaptive_normaliser_is_floored_at_1e_5():
    """The paper's code and DiffusionNFT clamp sg(mean|x0_hat - x0|) at 1e-5 (in float64): an error
    of 1e-7 per element gives mse 1e-14 / 1e-5 = 1e-9, not 1e-14 / 1e-7 = 1e-7 (the old 1e-8 floor
    would not bind)."""
    x0 = torch.zeros(1, 2, 1, 1)
    eps = torch.zeros(1, 2, 1, 1)
    t = torch.tensor([0.5])
    v = torch.full((1, 2, 1, 1), -2e-7)  # x0_hat = x_t - t v = 1e-7 everywhere
    out = adaptive_x0_loss(v, noised(x0, eps, t), x0, t)
    assert out.item() == pytest.approx(1e-14 / 1e-5, rel=1e-5)
    # above the floor the normaliser is the sample's own mean absolute error
    big = adaptive_x0_loss(torch.full((1, 2, 1, 1), -2e-3), noised(x0, eps, t), x0, t)
    assert big.item() == pytest.approx(1e-6 / 1e-3, rel=1e-5)


# -------------------------------------------------------------------------------- timestep draw


def test_num_terms_is_the_papers_max_1_int_n_f():
    assert num_terms(10, 0.99) == 9
    assert num_terms(10, 1.0) == 10
    assert num_terms(10, 0.01) == 1
    # 100 * 0.29 = 28.999999999999996 in floats: int() truncates it to 28, as the paper's code does
    assert num_terms(100, 0.29) == int(100 * 0.29) == 28
    assert num_terms(100, 0.57) == int(100 * 0.57) == 56  # 56.99999999999999
    for n in range(1, 60):
        for f in (0.07, 0.1, 0.29, 0.3, 0.33, 0.57, 0.7, 0.99, 1.0):
            assert num_terms(n, f) == max(1, int(n * f))


def test_timestep_draw_distinct_grid_values_per_image(fake_model, rollout_factory):
    rollout = rollout_factory(batch=6, steps=10)
    terms = _terms(fake_model, rollout, timestep_fraction=0.99)
    assert len(terms) == 9
    assert all(tr.weight == pytest.approx(1 / 9) for tr in terms)
    ts = torch.stack([tr.t for tr in terms], dim=1)  # [B, K]
    grid = rollout.sigmas[:-1]
    for row in ts:
        assert len(set(row.tolist())) == 9
        assert all(bool((grid == v).any()) for v in row)
        assert not bool((row == 0).any())  # the final 0 of the grid is never drawn
    assert len({tuple(r.tolist()) for r in ts}) > 1, "every image got the same permutation"


def test_t_range_draws_only_grid_times_inside_it(fake_model, rollout_factory):
    rollout = rollout_factory(batch=6, steps=10)
    grid = rollout.sigmas[:-1]
    lo, hi = 0.3, float(grid[3])  # an end exactly on a grid time is kept
    inside = grid[(grid >= lo) & (grid <= hi)]
    terms = _terms(fake_model, rollout, timestep_fraction=1.0, t_range=(lo, hi))
    assert len(terms) == len(inside) >= 2  # the fraction applies to the times in range
    for row in torch.stack([tr.t for tr in terms], dim=1):
        assert sorted(row.tolist()) == sorted(inside.tolist())  # each image: every time in range once


def test_t_range_default_draws_exactly_as_before(fake_model, rollout_factory):
    rollout = rollout_factory(batch=4, steps=10)
    a = _terms(fake_model, rollout, seed=3, timestep_fraction=0.3)
    b = _terms(fake_model, rollout, seed=3, timestep_fraction=0.3, t_range=(0.0, 1.0))
    assert all(torch.equal(x.t, y.t) and torch.equal(x.eps, y.eps) for x, y in zip(a, b, strict=True))


def test_t_range_without_grid_times_names_the_grid(fake_model, rollout_factory):
    rollout = rollout_factory(batch=2, steps=4)
    with pytest.raises(FlowrlError, match=r"holds none of the sampler's grid times \(1, "):
        _terms(fake_model, rollout, t_range=(0.001, 0.002))


def test_draw_indices_are_permutation_prefixes():
    idx = draw_timestep_indices(50, 7, 7, torch.Generator().manual_seed(0))
    assert torch.equal(idx.sort(dim=1).values, torch.arange(7).expand(50, 7))


def test_draw_is_reproducible_from_generator(fake_model, rollout_factory):
    r = rollout_factory()
    a, b = _terms(fake_model, r, seed=3), _terms(fake_model, r, seed=3)
    c = _terms(fake_model, r, seed=4)
    assert all(torch.equal(x.t, y.t) and torch.equal(x.eps, y.eps) for x, y in zip(a, b))
    assert not all(torch.equal(x.eps, y.eps) for x, y in zip(a, c))


# ------------------------------------------------------------------------- common random numbers


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_ratio_exactly_one_at_init(fake_model, rollout_factory, weighting):
    terms = _terms(fake_model, rollout_factory(), weighting=weighting, kl=KLConfig(kind="girsanov", beta=0.1))
    for tr in terms:
        assert torch.equal(tr.l_theta, tr.l_old)  # exact: the same x_t goes to both policies
        assert torch.equal(torch.exp(tr.l_theta - tr.l_old), torch.ones_like(tr.l_theta))


def test_policy_old_and_ref_see_the_same_x_t(fake_model, rollout_factory):
    terms = _terms(fake_model, rollout_factory(), kl=KLConfig(kind="girsanov", beta=0.1))
    calls = fake_model.calls
    # policy last: its adapter must be the active one when the trainer backpropagates the term
    assert [c[0] for c in calls] == ["old", "ref", "policy"] * len(terms)
    for k, tr in enumerate(terms):
        (_, xo, to, go), (_, xr, tr_, gr), (_, xp, tp, gp) = calls[3 * k : 3 * k + 3]
        assert torch.equal(xp, xo) and torch.equal(xp, xr)
        assert torch.equal(tp, to) and torch.equal(tp, tr_) and torch.equal(tp, tr.t)
        assert torch.equal(xp, noised(tr.x0, tr.eps, tr.t))
        assert gp and not go and not gr  # only the policy call builds a graph


def test_independent_noise_would_break_the_ratio(fake_model, rollout_factory):
    # The counterfactual: the old policy scored at a different eps gives a ratio != 1 at init.
    tr = _terms(fake_model, rollout_factory())[0]
    eps2 = torch.randn(tr.eps.shape, generator=torch.Generator().manual_seed(99))
    x_t2 = noised(tr.x0, eps2, tr.t)
    with torch.no_grad():
        v2 = fake_model.velocity(x_t2, tr.t, None, "old")
    l_old_indep = elbo_weighted(v2, x_t2, tr.x0, eps2, tr.t, "adaptive")
    assert not torch.allclose(tr.l_theta.detach(), l_old_indep)


def test_ratio_moves_when_policy_changes_and_gradients_reach_policy_only(fake_model, rollout_factory):
    fake_model.perturb_policy(0.2)
    terms = _terms(fake_model, rollout_factory())
    assert not all(torch.equal(tr.l_theta, tr.l_old) for tr in terms)
    tr = terms[0]
    assert tr.l_theta.requires_grad and not tr.l_old.requires_grad and not tr.v_old.requires_grad
    tr.l_theta.sum().backward()
    assert fake_model.w.grad is not None and fake_model.w.grad.abs().sum() > 0
    assert fake_model.w_old.grad is None


# -------------------------------------------------------------------------------------------- KL


def test_no_kl_means_no_reference_pass(fake_model, rollout_factory):
    for kl in (None, KLConfig(beta=0.0)):
        fake_model.calls.clear()
        terms = _terms(fake_model, rollout_factory(), kl=kl)
        assert "ref" not in {c[0] for c in fake_model.calls}
        assert all(torch.equal(tr.kl, torch.zeros(4)) and not tr.kl.requires_grad for tr in terms)


@pytest.mark.parametrize("kind", ["girsanov", "elbo-k1", "elbo-k2", "elbo-k3"])
def test_kl_zero_at_init_and_positive_after_change(fake_model, rollout_factory, kind):
    kl = KLConfig(kind=kind, beta=1.0)
    assert all(torch.equal(tr.kl, torch.zeros(4)) for tr in _terms(fake_model, rollout_factory(), kl=kl))
    fake_model.perturb_policy(0.3)
    terms = _terms(fake_model, rollout_factory(), kl=kl)
    assert all(tr.kl.requires_grad for tr in terms)
    if kind != "elbo-k1":  # k1 is signed
        assert all(bool((tr.kl >= 0).all()) for tr in terms)
    assert any(bool((tr.kl > 0).any()) for tr in terms)


def test_elbo_k_terms_use_elbo_difference(fake_model, rollout_factory):
    fake_model.perturb_policy(0.3)
    rollout = rollout_factory()
    k1 = _terms(fake_model, rollout, kl=KLConfig(kind="elbo-k1", beta=1.0))
    k3 = _terms(fake_model, rollout, kl=KLConfig(kind="elbo-k3", beta=1.0))
    for a, b in zip(k1, k3):
        d = a.kl.detach()
        torch.testing.assert_close(b.kl.detach(), torch.exp(d) - 1 - d)


def test_gaussian_step_kl_is_refused(fake_model, rollout_factory):
    with pytest.raises(FlowrlError, match="trajectory"):
        _terms(fake_model, rollout_factory(), kl=KLConfig(kind="gaussian-step", beta=0.1))


# ---------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "bad",
    [{"timestep_fraction": 0.0}, {"timestep_fraction": 1.5}, {"weighting": "sqrt"}, {"temperature": 1.0}, {"kind": "trajectory"},
     {"t_range": (0.6, 0.4)}, {"t_range": (-0.1, 0.5)}, {"t_range": (0.5, 1.2)}],
)
def test_config_refuses_bad_values(bad):
    with pytest.raises(ValidationError):
        ElboConfig.model_validate({"kind": "elbo", **bad})


def test_config_defaults():
    c = ElboConfig.model_validate({"kind": "elbo"})
    assert (c.weighting, c.timestep_fraction, c.guidance) == ("adaptive", 0.99, 1.0)


# ------------------------------------------------------------------------------ per-group noise


def test_per_group_noise_shares_t_and_eps_within_groups_only(fake_model, rollout_factory):
    rollout = rollout_factory(batch=6, steps=10)  # groups [0, 0, 1, 1, 2, 2]
    terms = _terms(fake_model, rollout, timestep_fraction=0.5, noise="per-group")
    groups = rollout.batch.group_ids
    for tr in terms:
        for g in range(3):
            members = (groups == g).nonzero().flatten()
            a, b = members.tolist()
            assert tr.t[a] == tr.t[b] and torch.equal(tr.eps[a], tr.eps[b])
        assert not torch.equal(tr.eps[0], tr.eps[2]), "different groups must get different noise"
        assert torch.equal(tr.l_theta, tr.l_old)  # common random numbers still hold
    ts = torch.stack([tr.t for tr in terms], dim=1)
    assert all(len(set(row.tolist())) == ts.shape[1] for row in ts)  # still distinct times per image


def test_per_group_noise_is_unbiased_per_image(fake_model, rollout_factory):
    """Each image's estimate has the same distribution either way: means over many draws agree."""
    rollout = rollout_factory(batch=4, steps=10)
    est = {}
    for noise in ("per-image", "per-group"):
        vals = torch.stack([
            torch.stack([tr.l_theta.detach() for tr in _terms(fake_model, rollout, timestep_fraction=1.0, noise=noise, seed=s)]).mean(0)
            for s in range(300)
        ])
        est[noise] = vals.mean(0)
    assert torch.allclose(est["per-image"], est["per-group"], rtol=0.1, atol=0.05)


def test_per_group_noise_cancels_the_shared_part_of_the_policy_gradient(model_factory, rollout_factory):
    """Identical images in a group with advantages (+1, -1): per-group noise gives exactly zero
    gradient (the two terms cancel); per-image noise does not."""
    from flowrl.types import Rollout

    base = rollout_factory(batch=4, steps=10)
    x0 = base.x0.clone()
    x0[1], x0[3] = x0[0], x0[2]
    rollout = Rollout(base.batch, base.cond, x0, base.images, base.sigmas, None)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    grads = {}
    for noise in ("per-image", "per-group"):
        model = model_factory()
        loss = sum((-(adv * tr.l_theta)).mean() * tr.weight for tr in _terms(model, rollout, noise=noise))
        loss.backward()
        grads[noise] = model.w.grad.abs().sum() + model.b.grad.abs().sum()
    assert grads["per-group"] < 1e-6
    assert grads["per-image"] > 1e-3
