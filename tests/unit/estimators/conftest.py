"""A recording fake VelocityModel: tiny linear velocities per `which`, trainable policy weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flowrl.types import Conditioning, PromptBatch, Rollout


class FakeVelocityModel(nn.Module):
    """v = W x (a 1x1 channel mix) + b t, with one (W, b) per policy.

    The policy's (W, b) are Parameters initialised to the old/ref buffers, so at initialisation all
    three compute bit-identical velocities. Every call is recorded as (which, x, t, grad_enabled).
    """

    def __init__(self, channels: int = 2, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w, b = 0.5 * torch.randn(channels, channels, generator=g), torch.randn(channels, generator=g)
        self.w, self.b = nn.Parameter(w.clone()), nn.Parameter(b.clone())
        for name in ("old", "ref"):
            self.register_buffer(f"w_{name}", w.clone())
            self.register_buffer(f"b_{name}", b.clone())
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor, bool]] = []

    def weights(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.w, self.b) if which == "policy" else (getattr(self, f"w_{which}"), getattr(self, f"b_{which}"))

    def velocity(self, x, t, cond, which="policy", guidance=1.0):
        self.calls.append((which, x, t, torch.is_grad_enabled()))
        w, b = self.weights(which)
        return torch.einsum("oc,bchw->bohw", w, x) + b.view(1, -1, 1, 1) * t.view(-1, 1, 1, 1)

    @torch.no_grad()
    def perturb_policy(self, scale: float = 0.1, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w.add_(scale * torch.randn(self.w.shape, generator=g))
        self.b.add_(scale * torch.randn(self.b.shape, generator=g))


def make_rollout(batch: int = 4, channels: int = 2, size: int = 3, steps: int = 10, seed: int = 0, trajectory=None, sigmas=None) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    cond = Conditioning(prompt_embeds=torch.zeros(batch, 1, 4), pooled=torch.zeros(batch, 4))
    pb = PromptBatch(prompts=["p"] * batch, group_ids=torch.arange(batch) // 2)
    x0 = torch.randn(batch, channels, size, size, generator=g)
    if sigmas is None:
        sigmas = torch.linspace(1.0, 0.0, steps + 1)
    return Rollout(batch=pb, cond=cond, x0=x0, images=torch.zeros(batch, 3, 8, 8), sigmas=sigmas, trajectory=trajectory)


@pytest.fixture
def fake_model() -> FakeVelocityModel:
    return FakeVelocityModel()


@pytest.fixture
def rollout_factory():
    """make_rollout(batch=4, channels=2, size=3, steps=10, seed=0, trajectory=None, sigmas=None)."""
    return make_rollout


@pytest.fixture
def model_factory():
    """FakeVelocityModel(channels=2, seed=0)."""
    return FakeVelocityModel
