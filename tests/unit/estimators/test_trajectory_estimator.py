"""Trajectory estimator: refusals, agreement with the sampler's recorded log-probs, KL, step draws."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from flowrl import registry
from flowrl.errors import FlowrlError
from flowrl.estimators.trajectory import TrajectoryConfig, TrajectoryEstimator, sampler_problems
from flowrl.kl import KLConfig
from flowrl.samplers import sample, sd3_sigmas
from flowrl.samplers.stages import Cps, DanceSde, Dpm2, FlowSde

SDE = {"flow-sde": FlowSde, "dance-sde": DanceSde, "cps": Cps}


def _recorded(model, rollout_factory, name, steps=6, batch=3, reduction="mean", **params):
    """An SDE rollout sampled by the fake model's policy weights, with its trajectory."""
    sigmas = sd3_sigmas(steps)
    base = rollout_factory(batch=batch, steps=steps, sigmas=sigmas)
    noise = torch.randn(base.x0.shape, generator=torch.Generator().manual_seed(5))
    gens = [torch.Generator().manual_seed(100 + i) for i in range(batch)]
    x0, traj = sample(model, base.cond, noise, sigmas, name, generators=gens, record=True, log_prob_reduction=reduction, **params)
    model.calls.clear()
    return type(base)(batch=base.batch, cond=base.cond, x0=x0, images=base.images, sigmas=sigmas, trajectory=traj)


def _estimator(name, fraction=1.0, reduction="mean", **sampler_kw):
    cfg = TrajectoryConfig(kind="trajectory", timestep_fraction=fraction, reduction=reduction)
    s_cfg = SDE[name].Config(kind=name, log_prob_reduction=reduction, **sampler_kw)
    return TrajectoryEstimator(cfg, sampler_name=name, sampler_config=s_cfg)


def test_refuses_rollout_without_trajectory(fake_model, rollout_factory):
    est = _estimator("flow-sde")
    with pytest.raises(FlowrlError, match="SDE sampler.*elbo"):
        next(est(rollout_factory(), fake_model, None, torch.Generator()))


def test_refuses_unbound_sampler_and_elbo_kl(fake_model, rollout_factory):
    rollout = _recorded(fake_model, rollout_factory, "flow-sde")
    with pytest.raises(FlowrlError, match="sampler_name"):
        next(TrajectoryEstimator()(rollout, fake_model, None, torch.Generator()))
    with pytest.raises(FlowrlError, match="elbo"):
        next(_estimator("flow-sde")(rollout, fake_model, KLConfig(kind="elbo-k3"), torch.Generator()))


@pytest.mark.parametrize(
    "name, reduction", [("flow-sde", "mean"), ("dance-sde", "sum"), ("cps", "mean"), ("cps", "flowcps")]
)
def test_l_old_matches_recorded_sampling_log_probs(fake_model, rollout_factory, name, reduction):
    rollout = _recorded(fake_model, rollout_factory, name, reduction=reduction)
    terms = list(_estimator(name, reduction=reduction)(rollout, fake_model, None, torch.Generator().manual_seed(0)))
    steps = rollout.trajectory.log_probs.shape[1]
    # CPS's last step is deterministic (std = 0, no density) and is skipped
    assert len(terms) == (steps - 1 if name == "cps" else steps)
    grid = rollout.trajectory.sigmas.tolist()
    for tr in terms:
        k = grid.index(tr.t[0].item())
        torch.testing.assert_close(tr.l_old, rollout.trajectory.log_probs[:, k])
        assert torch.equal(tr.l_theta.detach(), tr.l_old)  # policy == old at initialisation
        assert tr.l_theta.requires_grad and not tr.l_old.requires_grad
        assert tr.weight == pytest.approx(1 / len(terms))


def test_policy_change_moves_l_theta_and_gradients_reach_policy(fake_model, rollout_factory):
    rollout = _recorded(fake_model, rollout_factory, "flow-sde")
    fake_model.perturb_policy(0.2)
    terms = list(_estimator("flow-sde")(rollout, fake_model, None, torch.Generator()))
    assert not torch.allclose(terms[0].l_theta.detach(), terms[0].l_old)
    terms[0].l_theta.sum().backward()
    assert fake_model.w.grad is not None and fake_model.w.grad.abs().sum() > 0


def test_step_subset_by_fraction(fake_model, rollout_factory):
    rollout = _recorded(fake_model, rollout_factory, "flow-sde", steps=10)
    a = [tr.t[0].item() for tr in _estimator("flow-sde", 0.5)(rollout, fake_model, None, torch.Generator().manual_seed(1))]
    b = [tr.t[0].item() for tr in _estimator("flow-sde", 0.5)(rollout, fake_model, None, torch.Generator().manual_seed(2))]
    assert len(a) == len(b) == 5 and len(set(a)) == 5
    assert a != b  # a random subset, not always the first steps
    assert set(a) <= set(rollout.sigmas[:-1].tolist())


@pytest.mark.parametrize("kind", ["gaussian-step", "flowgrpo-step", "girsanov"])
def test_kl_zero_at_init_then_positive(fake_model, rollout_factory, kind):
    rollout = _recorded(fake_model, rollout_factory, "flow-sde")
    kl = KLConfig(kind=kind, beta=1.0)
    est = _estimator("flow-sde")
    assert all(torch.equal(tr.kl, torch.zeros(3)) for tr in est(rollout, fake_model, kl, torch.Generator()))
    assert [c[0] for c in fake_model.calls[:3]] == ["old", "ref", "policy"]  # policy last (active at backward)
    fake_model.perturb_policy(0.2)
    terms = list(est(rollout, fake_model, kl, torch.Generator()))
    assert all(bool((tr.kl > 0).all()) and tr.kl.requires_grad for tr in terms)


def _flow_sde_kl_parts(model, rollout, tr):
    """(c^2 (v_theta - v_ref)^2 [B, ...], std_t^2, -dt) of a Flow-SDE term by hand: the step mean is
    linear in v with coefficient c = (1 + std_t^2 (1 - t) / (2t)) dt."""
    s = rollout.sigmas.tolist()
    k = s.index(tr.t[0].item())
    t, tn, a = s[k], s[k + 1], 0.7
    var_t = a**2 * t / (1 - min(t, s[1]))
    c = (1 + var_t * (1 - t) / (2 * t)) * (tn - t)
    x = rollout.trajectory.latents[:, k]
    with torch.no_grad():
        dv = model.velocity(x, tr.t, None, "policy") - model.velocity(x, tr.t, None, "ref")
    return c**2 * dv**2, var_t, t - tn


def test_gaussian_step_kl_matches_hand_formula(fake_model, rollout_factory):
    # The KL is c^2 (v_theta - v_ref)^2 / (2 std^2), std^2 = std_t^2 (-dt), reduced by mean.
    rollout = _recorded(fake_model, rollout_factory, "flow-sde", steps=4)
    fake_model.perturb_policy(0.2)
    kl = KLConfig(kind="gaussian-step", beta=1.0)
    tr = next(_estimator("flow-sde", 1.0)(rollout, fake_model, kl, torch.Generator().manual_seed(0)))
    sq, var_t, minus_dt = _flow_sde_kl_parts(fake_model, rollout, tr)
    expected = (sq / (2 * var_t * minus_dt)).flatten(1).mean(1)
    torch.testing.assert_close(tr.kl.detach(), expected, rtol=1e-4, atol=1e-7)


def test_sampler_problems():
    cfg = TrajectoryConfig()
    assert "elbo" in sampler_problems(cfg, "dpm2", Dpm2.Config())[0]
    assert sampler_problems(cfg, "flow-sde", FlowSde.Config()) == []
    probs = sampler_problems(cfg, "flow-sde", FlowSde.Config(log_prob_reduction="sum", guidance=4.5))
    assert len(probs) == 2 and "reduction" in probs[0] and "4.5" in probs[1]


def test_default_sampler_config_is_looked_up():
    est = TrajectoryEstimator(sampler_name="dance-sde")
    assert isinstance(est.sampler_config, DanceSde.Config)


@pytest.mark.parametrize("bad", [{"timestep_fraction": 0.0}, {"reduction": "max"}, {"steps": 3}, {"guidance": -1.0}])
def test_config_refuses_bad_values(bad):
    with pytest.raises(ValidationError):
        TrajectoryConfig.model_validate({"kind": "trajectory", **bad})


def test_flowgrpo_step_kl_matches_flowgrpos_formula(fake_model, rollout_factory):
    # FlowGRPO: ((mean_theta - mean_ref)^2).mean(dims) / (2 std_dev_t^2), std_dev_t = a sqrt(t / (1 - t_c))
    # without the sqrt(-dt) of the step's std: c^2 (v_theta - v_ref)^2 / (2 var_t).
    rollout = _recorded(fake_model, rollout_factory, "flow-sde", steps=4)
    fake_model.perturb_policy(0.2)
    kl = KLConfig(kind="flowgrpo-step", beta=1.0)
    for tr in _estimator("flow-sde", 1.0)(rollout, fake_model, kl, torch.Generator().manual_seed(0)):
        sq, var_t, _ = _flow_sde_kl_parts(fake_model, rollout, tr)
        torch.testing.assert_close(tr.kl.detach(), (sq / (2 * var_t)).flatten(1).mean(1), rtol=1e-4, atol=1e-7)


def test_flowcps_log_prob_is_minus_mean_squared_error(fake_model, rollout_factory):
    """FlowCPS: log_prob = -((x_next - mean)^2).mean(dims), no 1 / (2 std^2), no constants."""
    from flowrl.samplers import gaussian_log_prob, step_distribution

    rollout = _recorded(fake_model, rollout_factory, "cps", reduction="flowcps", steps=4)
    traj = rollout.trajectory
    s = traj.sigmas.tolist()
    cfg = registry.lookup("sampler", "cps").Config()
    for k in range(3):
        x, x_next = traj.latents[:, k], traj.latents[:, k + 1]
        with torch.no_grad():
            v = fake_model.velocity(x, torch.full((x.shape[0],), s[k]), None, "policy")
        mean, std = step_distribution("cps", cfg, x, v, s[k], s[k + 1], traj.sigmas)
        want = -((x_next - mean) ** 2).flatten(1).mean(1)
        torch.testing.assert_close(traj.log_probs[:, k], want, rtol=1e-5, atol=1e-7)
        exact = gaussian_log_prob(x_next, mean, std, "mean")
        assert not torch.allclose(exact, want)  # a different scale: ratios and clip differ
