"""Pretraining of the embedded toy model: the VAE on rendered scenes, then the transformer with the
rectified-flow loss on captioned scenes. Seeded and reproducible on a CPU; also runs on a GPU.

The recipe mirrors how SD3 was trained, scaled down: logit-normal timesteps, velocity target
``eps - x0``, caption dropout (for classifier-free guidance), EMA weights saved.

A run can also continue from an existing model folder (``init``): the VAE, text encoders and
latent normalisation are kept, and only the transformer trains on. That is how the shipped model
was strengthened on a GPU after its CPU pretraining (its card keeps both runs in ``history``).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flowrl.errors import FlowrlError
from flowrl.toy.model import TOY_CARD, ToyModelConfig, build_components, make_pipeline, read_card, save_model
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
    #: Relative odds of each task tag among the rendered scenes (a tag not named: 1). Empty: every
    #: tag equally likely, the shipped recipe.
    tag_weights: tuple[tuple[str, float], ...] = ()


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


#: Scenes per independently seeded chunk of the dataset: the data depend on (seed, n) only, not on
#: how many worker processes render it.
CHUNK = 2048


def tag_odds(tags: list[str], weights: tuple[tuple[str, float], ...]) -> np.ndarray | None:
    """Probabilities of `tags` from (tag, weight) pairs (a tag not named: 1); None for no weights.

    Raises:
        FlowrlError: a weight names no tag of the world, is negative, or all are 0.
    """
    if not weights:
        return None
    given = dict(weights)
    unknown = sorted(set(given) - set(tags))
    if unknown:
        raise FlowrlError(f"--tag-weights names {unknown}; the toy world's tags are {tags}")
    w = np.array([float(given.get(t, 1.0)) for t in tags])
    if (w < 0).any() or w.sum() <= 0:
        raise FlowrlError(f"--tag-weights must be >= 0 with at least one > 0, got {given}")
    return w / w.sum()


def _render_chunk(args: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The `count` scenes of chunk `chunk`: (images float32 [count, 3, H, W], prompt ids int64 [count])."""
    seed, chunk, count, resolution, weights = args
    rng = np.random.default_rng([seed, chunk])
    records = all_records()
    by_tag: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_tag.setdefault(r.tag, []).append(i)
    tags = sorted(by_tag)
    odds = tag_odds(tags, weights)
    images = np.empty((count, 3, resolution, resolution), dtype=np.float32)
    ids = np.empty(count, dtype=np.int64)
    for i in range(count):
        tag = tags[rng.integers(len(tags))] if odds is None else tags[rng.choice(len(tags), p=odds)]
        group = by_tag[tag]
        ids[i] = group[rng.integers(len(group))]
        images[i] = render(sample_scene(records[ids[i]], rng, resolution)).image
    return images, ids


def make_dataset(
    n: int, seed: int, resolution: int, workers: int = 1, tag_weights: tuple[tuple[str, float], ...] = ()
) -> SceneDataset:
    """`n` scenes, tags drawn uniformly (or with `tag_weights`' odds), then a prompt uniformly
    within the tag.

    Rendered in chunks of `CHUNK` scenes, each seeded by (seed, chunk index), on `workers`
    processes; the result does not depend on `workers`.
    """
    tag_odds(sorted({r.tag for r in all_records()}), tag_weights)  # refuse bad weights before rendering
    jobs = [(seed, c, min(CHUNK, n - c * CHUNK), resolution, tag_weights) for c in range(math.ceil(n / CHUNK))]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            parts = list(pool.map(_render_chunk, jobs))
    else:
        parts = [_render_chunk(job) for job in jobs]
    images = np.concatenate([p[0] for p in parts]) if parts else np.empty((0, 3, resolution, resolution), np.float32)
    ids = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.int64)
    return SceneDataset(torch.from_numpy(images), torch.from_numpy(ids), [r.prompt for r in all_records()])


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
def encode_latents(vae, images: torch.Tensor, chunk: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    """Posterior means of `images` [N, 3, H, W] in [0, 1]: [N, C, h, w] (unnormalised), on `device`.

    The VAE runs on `device` for the call and is returned to where it was.
    """
    home = next(vae.parameters()).device
    vae.to(device)
    try:
        return torch.cat(
            [vae.encode(images[i : i + chunk].to(device) * 2 - 1).latent_dist.mean for i in range(0, len(images), chunk)]
        )
    finally:
        vae.to(home)


def _transformer_step(transformer, opt, params, batch: dict, cfg: PretrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One rectified-flow step on `batch` (x0, t, eps, prompt_embeds, pooled); returns (loss, grad norm), 0-d tensors."""
    t = batch["t"]
    tb = t.view(-1, 1, 1, 1)
    xt = (1 - tb) * batch["x0"] + tb * batch["eps"]
    v = transformer(
        hidden_states=xt,
        encoder_hidden_states=batch["prompt_embeds"],
        pooled_projections=batch["pooled"],
        timestep=t * 1000,
        return_dict=False,
    )[0]
    loss = F.mse_loss(v, batch["eps"] - batch["x0"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    return loss.detach(), gnorm.detach()


def _draw_batch(latents, prompt_ids, embeds, cfg: PretrainConfig, gen: torch.Generator) -> dict:
    """A training batch: data rows, caption dropout to the last (empty) prompt, shifted logit-normal t."""
    prompt_embeds, pooled = embeds
    empty = prompt_embeds.shape[0] - 1
    device = latents.device
    idx = torch.randint(latents.shape[0], (cfg.batch,), generator=gen, device=device)
    x0 = latents[idx]
    ids = prompt_ids[idx].clone()
    ids[torch.rand(cfg.batch, generator=gen, device=device) < cfg.caption_dropout] = empty
    t = shift_time(torch.sigmoid(torch.randn(cfg.batch, generator=gen, device=device)), cfg.timestep_shift)
    eps = torch.randn(x0.shape, generator=gen, device=device)
    return {"x0": x0, "t": t, "eps": eps, "prompt_embeds": prompt_embeds[ids], "pooled": pooled[ids]}


def _optimizer(transformer, cfg: PretrainConfig):
    params = [p for p in transformer.parameters() if p.requires_grad]
    return params, torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)


def calibrate_steps(transformer, latents, prompt_ids, embeds, cfg: PretrainConfig, seconds: float, trials: int = 20) -> int:
    """Steps of `cfg.batch` that fit in `seconds`, timed on a throwaway copy of the model (>= 1).

    The first few steps warm up kernels and allocators and are not timed; the model, its optimiser
    and the run's random stream are left untouched.
    """
    model = copy.deepcopy(transformer).train()
    params, opt = _optimizer(model, cfg)
    gen = torch.Generator(latents.device).manual_seed(cfg.seed + 1)
    sync = torch.cuda.synchronize if latents.device.type == "cuda" else (lambda: None)
    for _ in range(3):
        _transformer_step(model, opt, params, _draw_batch(latents, prompt_ids, embeds, cfg, gen), cfg)
    sync()
    t0 = time.perf_counter()
    for _ in range(trials):
        _transformer_step(model, opt, params, _draw_batch(latents, prompt_ids, embeds, cfg, gen), cfg)
    sync()
    per_step = (time.perf_counter() - t0) / trials
    del model, opt
    return max(1, int(seconds / per_step))


def train_transformer(
    transformer,
    latents: torch.Tensor,
    prompt_ids: torch.Tensor,
    embeds: tuple[torch.Tensor, torch.Tensor],
    cfg: PretrainConfig,
    gen: torch.Generator,
    log: Log,
) -> dict[str, torch.Tensor]:
    """Rectified-flow training for `cfg.steps` steps on the device of `latents`; returns the EMA state dict.

    Args:
        latents: normalised latents x0 [N, C, h, w].
        prompt_ids: [N] rows of `embeds`; the last row is the empty prompt (caption dropout).
        embeds: (prompt_embeds [P+1, L, D], pooled [P+1, Dp]).
        gen: random stream on the device of `latents`.
    """
    embeds = tuple(e.detach() for e in embeds)
    params, opt = _optimizer(transformer, cfg)
    state = transformer.state_dict()
    names = [k for k, v in state.items() if v.dtype.is_floating_point]
    ema = {k: v.detach().clone() for k, v in state.items()}
    live, shadow = [state[k] for k in names], [ema[k] for k in names]
    transformer.train()
    every = 1 if latents.device.type == "cpu" else 50  # .item() syncs a GPU: only where the log keeps it
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_at(step, cfg.steps, cfg.warmup, cfg.min_lr_ratio)
        loss, gnorm = _transformer_step(transformer, opt, params, _draw_batch(latents, prompt_ids, embeds, cfg, gen), cfg)
        with torch.no_grad():
            torch._foreach_lerp_(shadow, live, 1 - cfg.ema)
        if step % every == 0 or step == cfg.steps - 1:
            log("transformer", step, cfg.steps, {"loss": loss.item(), "grad_norm": gnorm.item()})
    transformer.eval()
    return ema


def load_init(path: Path) -> tuple[object, ToyModelConfig, dict]:
    """(pipeline, model config, card) of a toy model folder to continue from.

    Raises:
        FlowrlError: `path` is not a model folder written by `flowrl toy pretrain`.
    """
    from flowrl.policy import load_pipeline

    if not (path / "model_index.json").is_file():
        raise FlowrlError(
            f"--init {path}: no model folder there (no model_index.json); pass a folder written by "
            "`flowrl toy pretrain`, such as assets/toy-sd3"
        )
    card = read_card(path)
    if not card.get("config"):
        raise FlowrlError(
            f"--init {path}: no {TOY_CARD} there, so it is not a toy model folder written by `flowrl toy pretrain`; "
            "pass such a folder (the embedded one is assets/toy-sd3)"
        )
    names = {f.name for f in fields(ToyModelConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in card["config"].items() if k in names}
    return load_pipeline(str(path)), ToyModelConfig(**values), card


def pretrain(
    out: Path,
    model_cfg: ToyModelConfig = ToyModelConfig(),
    cfg: PretrainConfig = PretrainConfig(),
    log: Log | None = None,
    *,
    init: Path | None = None,
    device: str = "cpu",
    workers: int = 1,
    minutes: float | None = None,
) -> Path:
    """Build (or load from `init`), train and save the toy model to `out` (a diffusers pipeline folder).

    Args:
        init: continue from this model folder: its VAE, text encoders and latent normalisation are
            kept and the VAE phase is skipped; `model_cfg` is read from its card.
        device: where the transformer trains ("cpu", "cuda", ...); with `init`, the VAE encodes the
            scenes there too (a from-scratch VAE trains on the CPU).
        workers: processes that render the scenes (the data do not depend on it).
        minutes: if set, `cfg.steps` is replaced by the number of steps that fit in this many
            minutes, timed on this machine (the card records the number, to repeat the run).

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

    target = torch.device(device)
    if target.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    history: list[dict] = []
    if init is not None:
        pipe, model_cfg, old_card = load_init(Path(init))
        history = [*old_card.get("history", []), {k: old_card[k] for k in ("pretrain", "seconds", "init") if k in old_card}]
    data = make_dataset(cfg.n_scenes, cfg.seed, model_cfg.resolution, workers, cfg.tag_weights)
    t_data = time.perf_counter() - started

    if init is None:
        components = build_components(model_cfg, seed=cfg.seed)
        vae = components["vae"]
        train_vae(vae, data, cfg, gen, record)
        raw = encode_latents(vae, data.images)
        shift, scale = raw.mean().item(), 1.0 / raw.std().item()
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        pipe = make_pipeline(components)
    else:
        raw = encode_latents(pipe.vae, data.images, chunk=256 if target.type == "cpu" else 4096, device=target)
        shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    latents = (raw - shift) * scale
    del raw
    t_vae = time.perf_counter() - started - t_data

    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(
            data.prompts + [""], None, None, do_classifier_free_guidance=False,
            max_sequence_length=model_cfg.t5_max_length,
        )
    transformer = pipe.transformer.to(target)
    for p in transformer.parameters():
        p.requires_grad_(True)
    latents, ids, embeds = latents.to(target), data.prompt_ids.to(target), (pe.to(target), pooled.to(target))
    if minutes is not None:
        cfg = replace_steps(cfg, calibrate_steps(transformer, latents, ids, embeds, cfg, 60 * minutes))
    t_gen = gen if target.type == "cpu" else torch.Generator(target).manual_seed(cfg.seed)
    ema = train_transformer(transformer, latents, ids, embeds, cfg, t_gen, record)
    transformer.load_state_dict(ema)
    pipe.transformer = transformer.to("cpu")
    t_total = time.perf_counter() - started

    card = {
        "kind": "flowrl-toy-sd3",
        "pretrain": asdict(cfg),
        "max_sequence_length": model_cfg.t5_max_length,
        "resolution": model_cfg.resolution,
        "seconds": {"data": round(t_data, 1), "vae": round(t_vae, 1), "total": round(t_total, 1)},
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(target) if target.type == "cuda" else target.type,
    }
    if init is not None:
        card |= {"init": str(init), "history": history}
    save_model(pipe, out, model_cfg, card)
    with open(out / "pretrain_log.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return out


def replace_steps(cfg: PretrainConfig, steps: int) -> PretrainConfig:
    """`cfg` with `steps` transformer steps and a warm-up of at most a tenth of them."""
    return replace(cfg, steps=steps, warmup=min(cfg.warmup, max(1, steps // 10)))
