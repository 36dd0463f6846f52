"""Rollouts: seeds derived from (seed, epoch, ...), prompts encoded once per batch, the sampler run
with one weight set pinned, decoding in chunks, and the autocast of the no-grad passes."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from flowrl.policy import FlowPolicy
from flowrl.types import Conditioning, PromptBatch, Rollout


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixing), stable across runs."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class Pinned:
    """A VelocityModel view of a policy whose "policy" weights are replaced by `which`
    (e.g. sampling rollouts with the old policy, or evaluating the EMA)."""

    def __init__(self, policy: FlowPolicy, which: str):
        self.policy, self.which = policy, which

    def velocity(self, x, t, cond, which="policy", guidance=1.0):
        return self.policy.velocity(x, t, cond, self.which if which == "policy" else which, guidance)


def encode_batch(policy: FlowPolicy, prompts: list[str], with_negative: bool) -> Conditioning:
    """Encode each distinct prompt once, then expand to the batch."""
    unique = list(dict.fromkeys(prompts))
    cond = policy.encode(unique, with_negative=with_negative)
    index = torch.tensor([unique.index(p) for p in prompts], device=cond.prompt_embeds.device)
    return cond.index(index)


def decode_in_chunks(policy: FlowPolicy, x0: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([policy.decode(x0[i : i + chunk]) for i in range(0, x0.shape[0], chunk)])


def roll_out(policy, sampler, batch: PromptBatch, cond: Conditioning, seeds: list[int], which: str, chunk: int) -> Rollout:
    """Sample and decode `batch` in chunks of `chunk` images (per-image seeds: chunking is invisible)."""
    xs, trajs, sigmas = [], [], None
    model = Pinned(policy, which)
    for i in range(0, len(seeds), chunk):
        idx = torch.arange(i, min(i + chunk, len(seeds)))
        x0, sigmas, traj = sampler(model, cond.index(idx), seeds[i : i + chunk], policy.latent_shape)
        xs.append(x0)
        trajs.append(traj)
    x0 = torch.cat(xs)
    trajectory = None
    if trajs[0] is not None:
        from flowrl.types import Trajectory

        trajectory = Trajectory(torch.cat([t.latents for t in trajs]), trajs[0].sigmas, torch.cat([t.log_probs for t in trajs]))
    images = decode_in_chunks(policy, x0, chunk)
    return Rollout(batch, cond, x0, images, sigmas, trajectory)


def rollout_autocast(device: torch.device, precision: str):
    """Autocast context for rollouts: bf16 matmuls when asked, else a no-op."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, precision))
