"""Typed, frozen records passed between pipeline stages. Shapes are given per tensor field.

Notation: B images in a batch, C latent channels, h x w latent size, H x W image size, T sampler
steps, L text tokens, D text width, Dp pooled width. Time t is the rectified-flow time in [0, 1]
(t = 1 pure noise): x_t = (1 - t) x0 + t eps, and models predict the velocity v ~ eps - x0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor

#: Which weights a velocity is computed with: the trained adapter, the old-policy adapter, or the
#: reference (base model, adapters disabled).
Which = Literal["policy", "old", "ref"]


@dataclass(frozen=True)
class PromptBatch:
    """Prompts of one batch, each repeated group-size times.

    Attributes:
        prompts: the text of each image's prompt, len B.
        group_ids: int64 [B]; images of the same prompt share an id (advantage groups).
        metadata: per-image prompt metadata (e.g. a GenEval PromptRecord), len B, or empty.
    """

    prompts: Sequence[str]
    group_ids: Tensor
    metadata: Sequence[object] = ()

    def subset(self, idx: Tensor) -> PromptBatch:
        """The images at positions `idx` (int64 [b])."""
        ids = idx.tolist()
        meta = [self.metadata[i] for i in ids] if self.metadata else ()
        return PromptBatch([self.prompts[i] for i in ids], self.group_ids[idx], meta)


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning of a batch.

    Attributes:
        prompt_embeds: [B, L, D].
        pooled: [B, Dp].
        neg_prompt_embeds: [B, L, D] of the negative (empty) prompt, for CFG; None without CFG.
        neg_pooled: [B, Dp] or None.
    """

    prompt_embeds: Tensor
    pooled: Tensor
    neg_prompt_embeds: Tensor | None = None
    neg_pooled: Tensor | None = None

    def index(self, idx: Tensor | slice) -> Conditioning:
        """The conditioning of a subset of the batch."""
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Conditioning(pick(self.prompt_embeds), pick(self.pooled), pick(self.neg_prompt_embeds), pick(self.neg_pooled))


class VelocityModel(Protocol):
    """What samplers and estimators need from a policy."""

    def velocity(
        self, x: Tensor, t: Tensor, cond: Conditioning, which: Which = "policy", guidance: float = 1.0
    ) -> Tensor:
        """Velocity [B, C, h, w] at x [B, C, h, w], t [B], with classifier-free guidance `guidance`
        (1 = off). Gradients flow only when called with grad enabled."""
        ...


@dataclass(frozen=True)
class Trajectory:
    """What an SDE rollout records for per-step likelihoods.

    Attributes:
        latents: [B, T + 1, C, h, w]; latents[:, 0] is the initial noise, latents[:, T] the sample.
        sigmas: [T + 1] the time grid, decreasing from about 1 to 0.
        log_probs: [B, T] log p_old(x_{k+1} | x_k) at sampling time (reduced as named in config).
    """

    latents: Tensor
    sigmas: Tensor
    log_probs: Tensor

    def subset(self, idx: Tensor) -> Trajectory:
        return Trajectory(self.latents[idx], self.sigmas, self.log_probs[idx])


@dataclass(frozen=True)
class Rollout:
    """Samples of one batch.

    Attributes:
        batch: the prompts.
        cond: their conditioning.
        x0: final latents [B, C, h, w] (normalised, as the transformer sees them).
        images: decoded images [B, 3, H, W] in [0, 1].
        sigmas: [T + 1] the sampler's time grid (estimators draw ELBO timesteps from it).
        trajectory: recorded for SDE samplers only.
    """

    batch: PromptBatch
    cond: Conditioning
    x0: Tensor
    images: Tensor
    sigmas: Tensor
    trajectory: Trajectory | None = None

    def subset(self, idx: Tensor) -> Rollout:
        """The images at positions `idx` (int64 [b]) with their conditioning and trajectory."""
        traj = self.trajectory.subset(idx) if self.trajectory is not None else None
        return Rollout(self.batch.subset(idx), self.cond.index(idx), self.x0[idx], self.images[idx], self.sigmas, traj)


@dataclass(frozen=True)
class RewardOutput:
    """A reward's verdict on a batch.

    Attributes:
        scores: float32 [B].
        details: named per-image extras for logging, each [B] (e.g. GenEval's strict `correct`).
        failures: number of images whose scoring raised and was handled by policy (never silent).
    """

    scores: Tensor
    details: Mapping[str, Tensor] = field(default_factory=dict)
    failures: int = 0


@dataclass(frozen=True)
class LikelihoodTerms:
    """One Monte-Carlo term of each sample's log-likelihood estimate.

    Attributes:
        l_theta: [B] current policy's estimate, with grad.
        l_old: [B] old policy's estimate of the same term, no grad.
        kl: [B] KL-to-reference term, with grad (zeros when beta = 0 and nothing was computed).
        t: [B] the time of this term.
        weight: the term's share of the sample's total (terms of a sample sum to one).
        v_theta: [B, C, h, w] policy velocity at x_t, with grad (ELBO estimator only).
        v_old: [B, C, h, w] old-policy velocity at the same x_t (ELBO estimator only).
        x0: [B, C, h, w] the clean sample (ELBO estimator only).
        eps: [B, C, h, w] the noise of x_t (ELBO estimator only).
    """

    l_theta: Tensor
    l_old: Tensor
    kl: Tensor
    t: Tensor
    weight: float
    v_theta: Tensor | None = None
    v_old: Tensor | None = None
    x0: Tensor | None = None
    eps: Tensor | None = None


@dataclass(frozen=True)
class LossOutput:
    """An objective's loss for one term, and its diagnostics.

    Attributes:
        loss: scalar tensor with grad (already multiplied by the term's weight).
        metrics: diagnostics as plain floats (ratio mean/min/max, clip fraction, approx KL, ...).
    """

    loss: Tensor
    metrics: Mapping[str, float]


def zeros_like_batch(x: Tensor) -> Tensor:
    """[B] zeros on x's device and dtype."""
    return torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
