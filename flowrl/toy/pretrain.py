"""Pretraining of the embedded toy model: the VAE on rendered scenes, then the transformer with the
rectified-flow loss on captioned scenes. Seeded and reproducible on a CPU; also runs on a GPU.

The recipe mirrors how SD3 was trained, scaled down: logit-normal timesteps, velocity target
``eps - x0``, caption dropout (for classifier-free guidance), EMA weights saved.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flowrl.rewards.geneval import PromptRecord
from flowrl.toy.model import ToyModelConfig, build_components, make_pipeline, save_model
from flowrl.toy.prompts import all_records
from flowrl.toy.render import render
from flowrl.toy.scenes import sample_scene


@dataclass(frozen=True)
class PretrainConfig:
    """Budget and optimiser settings of `pretrain`. Defaults produce the shipped model."""

    seed: int = 0
    n_scenes: int = 16000
    vae_steps: int = 600
    vae_batch: int = 64
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    steps: int = 6000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.999
    caption_dropout: float = 0.1
    #: Training times are logit-normal(0, 1) pushed through the sampling schedule's shift, so the
    #: high-noise steps that decide layout and counts get the share the sampler gives them.
    timestep_shift: float = 3.0


@dataclass(frozen=True)
class SceneDataset:
    """Rendered training data.

    Attributes:
        images: float32 [N, 3, H, W] in [0, 1].
        prompt_ids: int64 [N], index into `prompts`.
        prompts: the distinct captions.
    """

    images: torch.Tensor
    prompt_ids: torch.Tensor
    prompts: list[str]


def make_dataset(n: int, seed: int, resolution: int) -> SceneDataset:
    """`n` scenes, tags drawn uniformly, then a prompt uniformly within the tag."""
    rng = np.random.default_rng(seed)
    records = all_records()
    by_tag: dict[str, list[PromptRecord]] = {}
    for r in records:
        by_tag.setdefault(r.tag, []).append(r)
    tags = sorted(by_tag)
    prompts = [r.prompt for r in records]
    index = {p: i for i, p in enumerate(prompts)}
    images = np.empty((n, 3, resolution, resolution), dtype=np.float32)
    ids = np.empty(n, dtype=np.int64)
    for i in range(n):
        group = by_tag[tags[rng.integers(len(tags))]]
        record = group[rng.integers(len(group))]
        images[i] = render(sample_scene(record, rng, resolution)).image
        ids[i] = index[record.prompt]
    return SceneDataset(torch.from_numpy(images), torch.from_numpy(ids), prompts)


def lr_at(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to `min_ratio`, as a multiplier of the base rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift t -> shift t / (1 + (shift - 1) t); shift 1 is the identity."""
    return shift * t / (1 + (shift - 1) * t)


Log = Callable[[str, int, int, dict], None]


def train_vae(vae, data: SceneDataset, cfg: PretrainConfig, gen: torch.Generator, log: Log) -> None:
    """Reconstruction + weak KL training of the VAE, in place."""
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    vae.train()
    n = data.images.shape[0]
    for step in range(cfg.vae_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * lr_at(step, cfg.vae_steps, min(100, cfg.vae_steps // 10 + 1), 0.05)
        x = data.images[torch.randint(n, (cfg.vae_batch,), generator=gen)] * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, x)
        loss = rec + cfg.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log("vae", step, cfg.vae_steps, {"loss": loss.item(), "mse": rec.item()})
    vae.eval()


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Posterior means of `images` [N, 3, H, W] in [0, 1]: [N, C, h, w] (unnormalised)."""
    return torch.cat(
        [vae.encode(images[i : i + chunk] * 2 - 1).latent_dist.mean for i in range(0, len(images), chunk)]
    )


def train_transformer(
    transformer,
    latents: torch.Tensor,
    prompt_ids: torch.Tensor,
    embeds: tuple[torch.Tensor, torch.Tensor],
    cfg: PretrainConfig,
    gen: torch.Generator,
    log: Log,
) -> dict[str, torch.Tensor]:
    """Rectified-flow training; returns the EMA state dict.

    Args:
        latents: normalised latents x0 [N, C, h, w].
        prompt_ids: [N] rows of `embeds`; the last row is the empty prompt (caption dropout).
        embeds: (prompt_embeds [P+1, L, D], pooled [P+1, Dp]).
    """
    prompt_embeds, pooled = (e.detach() for e in embeds)
    empty = prompt_embeds.shape[0] - 1
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    ema = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    transformer.train()
    n = latents.shape[0]
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_at(step, cfg.steps, cfg.warmup, cfg.min_lr_ratio)
        idx = torch.randint(n, (cfg.batch,), generator=gen)
        x0 = latents[idx]
        ids = prompt_ids[idx].clone()
        ids[torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout] = empty
        t = shift_time(torch.sigmoid(torch.randn(cfg.batch, generator=gen)), cfg.timestep_shift)
        eps = torch.randn(x0.shape, generator=gen)
        tb = t.view(-1, 1, 1, 1)
        xt = (1 - tb) * x0 + tb * eps
        v = transformer(
            hidden_states=xt,
            encoder_hidden_states=prompt_embeds[ids],
            pooled_projections=pooled[ids],
            timestep=t * 1000,
            return_dict=False,
        )[0]
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            for k, p in transformer.state_dict().items():
                if p.dtype.is_floating_point:
                    ema[k].lerp_(p, 1 - cfg.ema)
        log("transformer", step, cfg.steps, {"loss": loss.item(), "grad_norm": gnorm.item()})
    transformer.eval()
    return ema


def pretrain(
    out: Path,
    model_cfg: ToyModelConfig = ToyModelConfig(),
    cfg: PretrainConfig = PretrainConfig(),
    log: Log | None = None,
) -> Path:
    """Build, train and save the toy model to `out` (a diffusers StableDiffusion3Pipeline folder).

    Returns:
        `out`. Also writes ``out/pretrain_log.jsonl`` (losses) next to the model files.
    """
    out = Path(out)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    records: list[dict] = []
    started = time.perf_counter()

    def record(phase: str, step: int, total: int, values: dict) -> None:
        if step % 50 == 0 or step == total - 1:
            records.append({"phase": phase, "step": step, **values})
        if log is not None:
            log(phase, step, total, values)

    components = build_components(model_cfg, seed=cfg.seed)
    data = make_dataset(cfg.n_scenes, cfg.seed, model_cfg.resolution)
    t_data = time.perf_counter() - started

    vae = components["vae"]
    train_vae(vae, data, cfg, gen, record)
    raw = encode_latents(vae, data.images)
    shift, scale = raw.mean().item(), 1.0 / raw.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = (raw - shift) * scale
    t_vae = time.perf_counter() - started - t_data

    pipe = make_pipeline(components)
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(
            data.prompts + [""], None, None, do_classifier_free_guidance=False,
            max_sequence_length=model_cfg.t5_max_length,
        )
    for p in pipe.transformer.parameters():
        p.requires_grad_(True)
    ema = train_transformer(pipe.transformer, latents, data.prompt_ids, (pe, pooled), cfg, gen, record)
    pipe.transformer.load_state_dict(ema)
    t_total = time.perf_counter() - started

    card = {
        "kind": "flowrl-toy-sd3",
        "pretrain": asdict(cfg),
        "max_sequence_length": model_cfg.t5_max_length,
        "resolution": model_cfg.resolution,
        "seconds": {"data": round(t_data, 1), "vae": round(t_vae, 1), "total": round(t_total, 1)},
        "torch_threads": torch.get_num_threads(),
    }
    save_model(pipe, out, model_cfg, card)
    with open(out / "pretrain_log.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return out
