"""The sampling loop on fake velocity models with known exact answers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from flowrl.samplers import (
    METHODS,
    SDE_METHODS,
    gaussian_log_prob,
    generators_for,
    initial_noise,
    sample,
    sd3_sigmas,
    sde_distribution,
)
from flowrl.types import Conditioning

SHAPE = (2, 4, 4)


def cond_for(batch: int, values: list[float] | None = None) -> Conditioning:
    """A conditioning whose prompt embedding of image i is filled with values[i]."""
    vals = torch.tensor(values if values is not None else [0.0] * batch).view(batch, 1, 1)
    return Conditioning(vals.expand(batch, 3, 2).clone(), vals.view(batch, 1).clone())


def per_image(t: Tensor, x: Tensor) -> Tensor:
    return t.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class PointMass:
    """The exact velocity field of a single data point x0*: v = (x - x0*) / t."""

    def __init__(self, x0: Tensor) -> None:
        self.x0 = x0

    def velocity(self, x: Tensor, t: Tensor, cond: Conditioning, which: str = "policy", guidance: float = 1.0) -> Tensor:
        return (x - self.x0.to(x.dtype)) / per_image(t, x)


class GaussianData:
    """Exact velocity of data N(mu, s^2 I): v = (t - (1-t) s^2) / sigma_t^2 (x - (1-t) mu) - mu,
    sigma_t^2 = (1-t)^2 s^2 + t^2. Its ODE maps noise eps to mu + s eps (closed form)."""

    def __init__(self, mu: float, s: float) -> None:
        self.mu, self.s = mu, s

    def velocity(self, x: Tensor, t: Tensor, cond: Conditioning, which: str = "policy", guidance: float = 1.0) -> Tensor:
        t = per_image(t, x)
        var = (1 - t) ** 2 * self.s**2 + t**2
        return (t - (1 - t) * self.s**2) / var * (x - (1 - t) * self.mu) - self.mu

    def ode_solution(self, noise: Tensor) -> Tensor:
        return self.mu + self.s * noise


class Recorder:
    """Records every call. The conditional velocity adds a pull towards the prompt value c_i to the
    unconditional one (unless cond_effect is False) and CFG mixes them: v = v_u + g (v_c - v_u)."""

    def __init__(self, cond_effect: bool = True) -> None:
        self.cond_effect = cond_effect
        self.calls: list[dict] = []

    def velocity(self, x: Tensor, t: Tensor, cond: Conditioning, which: str = "policy", guidance: float = 1.0) -> Tensor:
        self.calls.append({"which": which, "guidance": guidance, "t": t.clone(), "grad": torch.is_grad_enabled()})
        c = cond.prompt_embeds.mean(dim=(1, 2)).view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        v_uncond = x - 0.3 * x.mean(dim=tuple(range(1, x.ndim)), keepdim=True) ** 2
        v_cond = v_uncond - c if self.cond_effect else v_uncond
        return v_uncond + guidance * (v_cond - v_uncond)


def method_kwargs(method: str, level: float | None) -> dict:
    if method == "dance-sde":
        return {"eta": level}
    if method in ("flow-sde", "cps"):
        return {"noise_level": level}
    return {}


# ----------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    ("method", "level"),
    [("euler", None), ("dpm2", None), ("flow-sde", 0.0), ("dance-sde", 0.0), ("cps", 0.0), ("cps", 0.8), ("cps", 1.0)],
)
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_point_mass_is_reached_exactly(method: str, level: float | None, steps: int):
    target = torch.linspace(-1.5, 2.0, math.prod(SHAPE), dtype=torch.float64).view(SHAPE)
    noise = initial_noise([0, 1, 2], SHAPE, dtype=torch.float64)
    gens = generators_for([0, 1, 2]) if method in SDE_METHODS else None
    model = PointMass(target)
    x0, _ = sample(model, cond_for(3), noise, sd3_sigmas(steps), method, generators=gens, **method_kwargs(method, level))
    torch.testing.assert_close(x0, target.expand_as(x0), rtol=0, atol=1e-5)


def test_flow_sde_with_noise_does_not_reach_the_point_mass():
    # Counter-check for the test above: with noise, Flow-SDE's last step (nonzero std) scatters the sample.
    target = torch.zeros(SHAPE, dtype=torch.float64)
    noise = initial_noise([0, 1], SHAPE, dtype=torch.float64)
    gens = generators_for([0, 1])
    x0, _ = sample(PointMass(target), cond_for(2), noise, sd3_sigmas(10), "flow-sde", noise_level=0.7, generators=gens)
    assert (x0 - target).abs().max() > 1e-3


def test_gaussian_reference_solution_is_the_limit_of_many_euler_steps():
    model = GaussianData(0.5, 0.8)
    noise = initial_noise([0, 1], SHAPE, dtype=torch.float64)
    x0, _ = sample(model, cond_for(2), noise, torch.linspace(1, 0, 2001, dtype=torch.float64), "euler")
    torch.testing.assert_close(x0, model.ode_solution(noise), rtol=0, atol=2e-3)


@pytest.mark.parametrize(("mu", "s"), [(0.5, 0.8), (1.0, 1.5), (-0.5, 0.6)])
def test_dpm2_is_more_accurate_than_euler(mu: float, s: float):
    model = GaussianData(mu, s)
    noise = initial_noise([0, 1, 2, 3], SHAPE, dtype=torch.float64)
    exact = model.ode_solution(noise)
    grid = torch.linspace(1, 0, 11, dtype=torch.float64)
    err = {m: (sample(model, cond_for(4), noise, grid, m)[0] - exact).abs().max().item() for m in ("euler", "dpm2")}
    assert err["dpm2"] < err["euler"] / 3, err


def test_dpm2_is_more_accurate_than_euler_along_the_sd3_grid():
    # Up to the SD3 grid's last nonzero time; its final gaps (to 0.0089, then 0) are checked by the
    # exactness tests, and for smooth data both solvers take them as one large step.
    model = GaussianData(0.5, 0.6)
    noise = initial_noise([0, 1, 2, 3], SHAPE, dtype=torch.float64)
    grid = sd3_sigmas(10).double()[:-2]
    t_end = float(grid[-1])
    exact = (1 - t_end) * model.mu + math.sqrt((1 - t_end) ** 2 * model.s**2 + t_end**2) * noise
    err = {m: (sample(model, cond_for(4), noise, grid, m)[0] - exact).abs().max().item() for m in ("euler", "dpm2")}
    assert err["dpm2"] < err["euler"] / 3, err


@pytest.mark.parametrize(
    ("method", "level"), [("flow-sde", 0.7), ("flow-sde", 1.2), ("dance-sde", 0.3), ("dance-sde", 0.8)]
)
def test_sdes_sample_the_data_distribution(method: str, level: float):
    # Flow-SDE and Dance-SDE are marginal-preserving: with small steps their samples of N(mu, s^2)
    # have its mean and std (32 000 scalars; the std estimate's own error is about 0.001).
    torch.manual_seed(0)
    model = GaussianData(0.5, 0.3)
    noise = torch.randn(500, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x0, _ = sample(model, cond_for(500), noise, torch.linspace(1, 0, 201), method, **method_kwargs(method, level))
    assert x0.mean().item() == pytest.approx(0.5, abs=0.01)
    assert x0.std().item() == pytest.approx(0.3, abs=0.01)


# ---------------------------------------------------------------------------------- trajectory


@pytest.mark.parametrize("method", SDE_METHODS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_trajectory_is_consistent(method: str, reduction: str):
    model, seeds, steps = Recorder(), [4, 9], 6
    cond, sigmas = cond_for(2, [0.5, -1.0]), sd3_sigmas(steps)
    noise = initial_noise(seeds, SHAPE)
    gens = generators_for(seeds)
    x0, traj = sample(model, cond, noise, sigmas, method, generators=gens, record=True, log_prob_reduction=reduction)
    assert traj is not None
    assert traj.latents.shape == (2, steps + 1, *SHAPE)
    assert traj.log_probs.shape == (2, steps)
    torch.testing.assert_close(traj.sigmas, sigmas, rtol=0, atol=0)
    assert torch.equal(traj.latents[:, 0], noise)
    assert torch.equal(traj.latents[:, -1], x0)
    assert torch.isfinite(traj.log_probs).all()
    # Recompute each step's log-prob from the stored latents with the same model.
    param = {"flow-sde": 0.7, "dance-sde": 0.3, "cps": 0.8}[method]
    for k in range(steps):
        t, t_next = float(sigmas[k]), float(sigmas[k + 1])
        x_k = traj.latents[:, k]
        v = model.velocity(x_k, torch.full((2,), t), cond)
        mean, std = sde_distribution(method, x_k, v, t, t_next, param=param, sigma_max=float(sigmas[1]))
        lp = gaussian_log_prob(traj.latents[:, k + 1], mean, std, reduction=reduction)
        torch.testing.assert_close(lp, traj.log_probs[:, k], rtol=1e-6, atol=1e-6)
    if method == "cps":
        assert traj.log_probs[:, -1].tolist() == [0.0, 0.0]  # deterministic last step


def test_recorded_log_probs_are_those_of_the_drawn_noise():
    # Mean-reduced over 1024 dims, log N(mean + std z; mean, std) = -log std - log(2 pi)/2 - mean(z^2)/2,
    # and mean(z^2) is about 1 (+- 0.05) for the noise actually drawn; a log-prob of any other draw
    # (or of the wrong std) would be off.
    model, seeds, steps = GaussianData(0.2, 0.7), [1, 2, 3], 5
    sigmas = sd3_sigmas(steps)
    noise, gens = initial_noise(seeds, (4, 16, 16)), generators_for(seeds)
    _, traj = sample(model, cond_for(3), noise, sigmas, "dance-sde", generators=gens, record=True)
    dt = sigmas[:-1] - sigmas[1:]
    expected = -torch.log(0.3 * dt.sqrt()) - 0.5 * math.log(2 * math.pi) - 0.5
    torch.testing.assert_close(traj.log_probs, expected.expand(3, steps), rtol=0, atol=0.1)


def test_ode_methods_return_no_trajectory():
    x0, traj = sample(Recorder(), cond_for(1), initial_noise([0], SHAPE), sd3_sigmas(3), "dpm2")
    assert traj is None and x0.shape == (1, *SHAPE)
    with pytest.raises(ValueError, match="deterministic"):
        sample(Recorder(), cond_for(1), initial_noise([0], SHAPE), sd3_sigmas(3), "euler", record=True)


# ------------------------------------------------------------------------------------- seeding


def test_initial_noise_is_per_seed():
    a = initial_noise([7], SHAPE)
    b = initial_noise([3, 7, 5], SHAPE)
    assert torch.equal(a[0], b[1])
    assert not torch.equal(b[0], b[1])
    assert torch.equal(a[0], torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)))
    assert initial_noise([7], SHAPE, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_step_noise_stream_differs_from_initial_noise():
    g = generators_for([7])[0]
    assert not torch.equal(torch.randn(SHAPE, generator=g), initial_noise([7], SHAPE)[0])
    first, second = (torch.randn(SHAPE, generator=generators_for([7])[0]) for _ in range(2))
    assert torch.equal(first, second)


@pytest.mark.parametrize("method", METHODS)
def test_an_image_does_not_depend_on_its_batch(method: str):
    def run(seeds: list[int], values: list[float]) -> Tensor:
        gens = generators_for(seeds) if method in SDE_METHODS else None
        noise = initial_noise(seeds, SHAPE)
        x0, _ = sample(Recorder(), cond_for(len(seeds), values), noise, sd3_sigmas(5), method, generators=gens)
        return x0

    alone = run([11], [0.4])
    batched = run([3, 11, 5], [-1.0, 0.4, 2.0])
    assert torch.equal(batched[1], alone[0])
    assert not torch.allclose(batched[0], batched[1])


def test_sde_without_generators_uses_the_global_rng():
    noise = initial_noise([0], SHAPE)
    torch.manual_seed(1)
    a, _ = sample(Recorder(), cond_for(1), noise, sd3_sigmas(3), "flow-sde")
    torch.manual_seed(1)
    b, _ = sample(Recorder(), cond_for(1), noise, sd3_sigmas(3), "flow-sde")
    c, _ = sample(Recorder(), cond_for(1), noise, sd3_sigmas(3), "flow-sde")
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------------------- CFG


@pytest.mark.parametrize("method", METHODS)
def test_guidance_reaches_the_model(method: str):
    model = Recorder()
    sigmas = sd3_sigmas(4)
    with torch.enable_grad():
        sample(model, cond_for(2, [1.0, 2.0]), initial_noise([0, 1], SHAPE), sigmas, method, guidance=4.5)
    assert len(model.calls) == 4
    assert all(c["guidance"] == 4.5 and c["which"] == "policy" and not c["grad"] for c in model.calls)
    for k, call in enumerate(model.calls):
        assert call["t"].shape == (2,)
        assert torch.equal(call["t"], torch.full((2,), float(sigmas[k])))


def test_guidance_changes_the_sample_only_when_cond_and_uncond_differ():
    noise, cond = initial_noise([0, 1], SHAPE), cond_for(2, [1.0, 2.0])

    def run(cond_effect: bool, guidance: float) -> Tensor:
        return sample(Recorder(cond_effect), cond, noise, sd3_sigmas(4), "euler", guidance=guidance)[0]

    assert not torch.allclose(run(True, 1.0), run(True, 4.5))
    assert torch.equal(run(False, 1.0), run(False, 4.5))


# ---------------------------------------------------------------------------------- validation


def test_refuses_bad_arguments():
    noise, cond = initial_noise([0], SHAPE), cond_for(1)
    with pytest.raises(ValueError, match="unknown sampling method"):
        sample(Recorder(), cond, noise, sd3_sigmas(3), "heun")
    with pytest.raises(ValueError, match="takes only noise_level"):
        sample(Recorder(), cond, noise, sd3_sigmas(3), "flow-sde", eta=0.3)
    with pytest.raises(ValueError, match="takes no noise parameter"):
        sample(Recorder(), cond, noise, sd3_sigmas(3), "euler", noise_level=0.7)
    with pytest.raises(ValueError, match="decrease strictly"):
        sample(Recorder(), cond, noise, torch.tensor([1.0, 0.5, 0.5, 0.0]), "euler")
    with pytest.raises(ValueError, match="decrease strictly"):
        sample(Recorder(), cond, noise, torch.tensor([0.0, 1.0]), "euler")
    with pytest.raises(ValueError, match="one per image"):
        sample(Recorder(), cond, noise, sd3_sigmas(3), "cps", generators=generators_for([0, 1]))
    with pytest.raises(ValueError, match="log_prob_reduction"):
        sample(Recorder(), cond, noise, sd3_sigmas(3), "cps", record=True, log_prob_reduction="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seeds"):
        initial_noise([], SHAPE)
    with pytest.raises(ValueError, match="ints"):
        initial_noise([1.5], SHAPE)  # type: ignore[list-item]
