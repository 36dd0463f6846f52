"""The registered sampler stages: configs, the call contract, and step_distribution."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor

from flowrl import registry
from flowrl.errors import FlowrlError
from flowrl.samplers import Cps, DanceSde, Dpm2, Euler, FlowSde, gaussian_log_prob, sd3_sigmas, step_distribution
from flowrl.types import Conditioning

SHAPE = (2, 4, 4)
ALL = {"euler": Euler, "dpm2": Dpm2, "flow-sde": FlowSde, "dance-sde": DanceSde, "cps": Cps}
SDE = ("flow-sde", "dance-sde", "cps")


class PromptPull:
    """Per-image velocity that depends on the image's prompt value c_i and on the CFG scale."""

    def __init__(self) -> None:
        self.guidance: list[float] = []

    def velocity(self, x: Tensor, t: Tensor, cond: Conditioning, which: str = "policy", guidance: float = 1.0) -> Tensor:
        self.guidance.append(guidance)
        c = cond.prompt_embeds.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return x - 0.5 * c * guidance - 0.1 * t.view(-1, 1, 1, 1) * x**2


def cond_for(values: list[float]) -> Conditioning:
    vals = torch.tensor(values).view(-1, 1, 1)
    return Conditioning(vals.expand(-1, 3, 2).clone(), vals.view(-1, 1).clone())


def test_registry_holds_every_sampler():
    assert registry.names("sampler") == sorted(ALL)
    for name, cls in ALL.items():
        assert registry.lookup("sampler", name) is cls
        assert cls.is_sde == (name in SDE)
        assert cls.Config().kind == name


def test_config_defaults():
    assert (Euler.Config().steps, Euler.Config().guidance, Euler.Config().shift) == (10, 1.0, 3.0)
    assert FlowSde.Config().noise_level == 0.7
    assert DanceSde.Config().eta == 0.3
    assert Cps.Config().noise_level == 0.8
    assert all(ALL[n].Config().log_prob_reduction == "mean" for n in SDE)
    assert not hasattr(Euler.Config(), "log_prob_reduction")
    # what config.py does with a YAML section
    assert Euler.Config.model_validate({"kind": "euler", "steps": 20}).steps == 20


@pytest.mark.parametrize(
    ("cls", "fields", "loc"),
    [
        (Euler, {"steps": 0}, "steps"),
        (Dpm2, {"steps": -3}, "steps"),
        (Euler, {"shift": 0.0}, "shift"),
        (Euler, {"guidance": -1.0}, "guidance"),
        (Euler, {"guidance": float("nan")}, "guidance"),
        (FlowSde, {"noise_level": -0.1}, "noise_level"),
        (Cps, {"noise_level": -0.1}, "noise_level"),
        (Cps, {"noise_level": 1.5}, "noise_level"),
        (DanceSde, {"eta": -0.3}, "eta"),
        (FlowSde, {"log_prob_reduction": "max"}, "log_prob_reduction"),
        (Euler, {"noise_level": 0.7}, "noise_level"),
        (Dpm2, {"stepz": 10}, "stepz"),
        (Euler, {"kind": "dpm2"}, "kind"),
    ],
)
def test_config_refuses_bad_values(cls, fields: dict, loc: str):
    with pytest.raises(ValidationError) as err:
        cls.Config(**fields)
    assert any(e["loc"] == (loc,) for e in err.value.errors())


def test_config_is_frozen():
    cfg = Euler.Config()
    with pytest.raises(ValidationError):
        cfg.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize("name", sorted(ALL))
def test_stage_call_contract(name: str):
    stage = ALL[name](ALL[name].Config(steps=4, guidance=2.0))
    model = PromptPull()
    x0, sigmas, traj = stage(model, cond_for([0.5, -1.0]), [3, 4], SHAPE)
    assert x0.shape == (2, *SHAPE) and x0.dtype == torch.float32
    torch.testing.assert_close(sigmas, sd3_sigmas(4, 3.0), rtol=0, atol=0)
    assert model.guidance == [2.0] * 4
    if name in SDE:
        assert traj is not None and traj.latents.shape == (2, 5, *SHAPE) and traj.log_probs.shape == (2, 4)
        assert torch.equal(traj.latents[:, -1], x0)
    else:
        assert traj is None


@pytest.mark.parametrize("name", sorted(ALL))
def test_stage_images_depend_only_on_their_seed(name: str):
    stage = ALL[name](ALL[name].Config(steps=3))
    alone, _, _ = stage(PromptPull(), cond_for([0.5]), [42], SHAPE)
    batch, _, _ = stage(PromptPull(), cond_for([1.0, 0.5]), [7, 42], SHAPE)
    assert torch.equal(batch[1], alone[0])
    again, _, _ = stage(PromptPull(), cond_for([0.5]), [42], SHAPE)
    other, _, _ = stage(PromptPull(), cond_for([0.5]), [43], SHAPE)
    assert torch.equal(again, alone) and not torch.allclose(other, alone)


def test_stage_refuses_seed_count_mismatch():
    with pytest.raises(ValueError, match="one seed per image"):
        Euler(Euler.Config())(PromptPull(), cond_for([0.5, 1.0]), [1], SHAPE)


@pytest.mark.parametrize("name", SDE)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_step_distribution_recomputes_the_recorded_log_probs(name: str, reduction: str):
    cls = ALL[name]
    config = cls.Config(steps=5, log_prob_reduction=reduction)
    model, cond = PromptPull(), cond_for([0.5, -1.0])
    _, sigmas, traj = cls(config)(model, cond, [1, 2], SHAPE)
    assert traj is not None
    for k in range(5):
        x_k, t = traj.latents[:, k], sigmas[k]
        v = model.velocity(x_k, t.expand(2), cond)
        mean, std = step_distribution(name, config, x_k, v, float(t), float(sigmas[k + 1]), traj.sigmas)
        lp = gaussian_log_prob(traj.latents[:, k + 1], mean, std, reduction=config.log_prob_reduction)
        torch.testing.assert_close(lp, traj.log_probs[:, k], rtol=1e-6, atol=1e-6)
        # the method on the stage is the same function
        m2, s2 = cls(config).step_distribution(x_k, v, float(t), float(sigmas[k + 1]), traj.sigmas)
        assert torch.equal(m2, mean) and torch.equal(s2, std)
    # Another policy's velocity gives another mean, hence another log-prob of the stored step.
    k = 1
    x_k = traj.latents[:, k]
    other_v = model.velocity(x_k, sigmas[k].expand(2), cond, guidance=3.0)
    mean, std = step_distribution(name, config, x_k, other_v, float(sigmas[k]), float(sigmas[k + 1]), traj.sigmas)
    other = gaussian_log_prob(traj.latents[:, k + 1], mean, std, reduction=reduction)
    assert not torch.allclose(other, traj.log_probs[:, k])


def test_step_distribution_refuses_ode_samplers_and_wrong_configs():
    x = torch.zeros(1, *SHAPE)
    with pytest.raises(FlowrlError, match="elbo"):
        step_distribution("euler", Euler.Config(), x, x, 0.5, 0.2, sd3_sigmas(3))
    with pytest.raises(TypeError, match="FlowSde.Config"):
        step_distribution("flow-sde", Cps.Config(), x, x, 0.5, 0.2, sd3_sigmas(3))


def test_step_distribution_uses_the_grid_clamp_at_the_first_step():
    config, sigmas = FlowSde.Config(steps=4), sd3_sigmas(4)
    x = torch.ones(1, *SHAPE)
    _, std = step_distribution("flow-sde", config, x, x, 1.0, float(sigmas[1]), sigmas)
    s1 = float(sigmas[1])
    expected = 0.7 * (1.0 / (1 - s1)) ** 0.5 * (1 - s1) ** 0.5  # std_t sqrt(-dt) = 0.7 on the first step
    assert float(std) == pytest.approx(expected, rel=1e-6)
    assert float(std) == pytest.approx(0.7, rel=1e-6)
