"""Where the GPU time of one epoch of the paper's SD3.5-M recipe goes, measured on one GPU.

Builds SD3.5 Medium's architecture from its published config with random weights (flowrl.arch;
nothing is downloaded): the 2.24 B-parameter transformer, the 16-channel VAE, CLIP-L, CLIP-G and
T5-XXL, plus a PickScore-sized CLIP ViT-H/14 as the reward model. Then it runs flowrl's own code for
each phase of an epoch (pipelines/sd35m-geneval.yaml: 10-step dpm2 rollouts without CFG, ELBO
"adaptive" with 9 terms per image, PEPG, Girsanov KL, LoRA r32 on the 8 targets, one AdamW step)
on a few micro-batches per memory profile, and scales the per-image costs to the 1152 images of an
epoch:

    epoch GPU-s = text encoding of 48 prompts + 1152 x (rollout + VAE decode + reward + training)

compared with METHOD.md's floor: 585 GPU-s for the transformer work of an epoch, 616 GPU-s for
the whole epoch, on one H100 (target: within 1.3x).

    python benchmarks/gpu_budget.py                 # on a CUDA GPU; rewrites the results in docs/gpu-budget.md
    python benchmarks/gpu_budget.py --dry-run       # tiny sizes on the CPU, every code path in seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: METHOD.md's compute floor on one H100 (GPU-seconds per 1152-image epoch of the paper's recipe).
FLOOR_TRANSFORMER_S = 585.0
FLOOR_EPOCH_S = 616.0
TARGET_RATIO = 1.3
EPOCH_IMAGES, EPOCH_PROMPTS = 1152, 48
RESULTS_BEGIN, RESULTS_END = "<!-- gpu_budget results begin -->", "<!-- gpu_budget results end -->"


@dataclass(frozen=True)
class Profile:
    """A per-GPU memory budget and the settings meant to fit it.

    Attributes:
        name: e.g. "80 GB".
        memory_gb: the card's memory the settings are meant to fit.
        micro_batch: images per forward/backward (train.micro_batch).
        gradient_checkpointing: model.gradient_checkpointing.
        offload_text_encoders: keep CLIP/T5 on the CPU except while encoding.
    """

    name: str
    memory_gb: float
    micro_batch: int
    gradient_checkpointing: bool
    offload_text_encoders: bool


#: Starting points from METHOD.md's measurements (batch 18: 43 GiB, 9: 24 GiB, 9 + checkpointing:
#: 6.5 GiB for the transformer alone); the measured peak says whether each really fits.
PROFILES = (
    Profile("24 GB", 24, 6, True, True),
    Profile("48 GB", 48, 9, False, True),
    Profile("80 GB", 80, 18, False, False),
)


@dataclass(frozen=True)
class Phases:
    """Measured seconds of one profile's run and its per-image costs."""

    images: int
    encode_s: float  # text encoding of the prompts of `images` (unique prompts only)
    rollout_s: float
    decode_s: float
    reward_s: float
    train_s: float
    peak_gb: float | None

    def per_image(self, phase: str) -> float:
        return getattr(self, f"{phase}_s") / self.images


def epoch_estimate(p: Phases, encode_48_s: float) -> dict[str, float]:
    """GPU-seconds of a 1152-image epoch on one GPU, by phase, from the measured per-image costs."""
    out = {"text_encoding": encode_48_s}
    for phase in ("rollout", "decode", "reward", "train"):
        out[phase] = p.per_image(phase) * EPOCH_IMAGES
    out["total"] = sum(out.values())
    out["transformer"] = out["rollout"] + out["train"]
    return out


def verdict(estimate: dict[str, float]) -> dict[str, float]:
    """Ratios to METHOD.md's floors (transformer work, whole epoch)."""
    return {"vs_transformer_floor": estimate["transformer"] / FLOOR_TRANSFORMER_S, "vs_epoch_floor": estimate["total"] / FLOOR_EPOCH_S}


# ----------------------------------------------------------------------------------- building


def build_policy(arch, device: torch.device, dtype: torch.dtype, max_len: int):
    """A FlowPolicy over random-weight modules of `arch`, built directly on `device` in `dtype`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from flowrl.arch import build_clip, build_t5, build_transformer, build_vae
    from flowrl.config import LoraConfig
    from flowrl.policy import FlowPolicy
    from flowrl.toy.model import build_t5_tokenizer, build_tokenizer

    tok, tok3 = build_tokenizer(arch.clip_max_length), build_t5_tokenizer()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            pipe = StableDiffusion3Pipeline(
                transformer=build_transformer(arch),
                vae=build_vae(arch),
                text_encoder=build_clip(arch.clip_l, arch.clip_l_projection, arch),
                tokenizer=tok,
                text_encoder_2=build_clip(arch.clip_g, arch.clip_g_projection, arch),
                tokenizer_2=build_tokenizer(arch.clip_max_length),
                text_encoder_3=build_t5(arch),
                tokenizer_3=tok3,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=arch.shift),
            )
    finally:
        torch.set_default_dtype(previous)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return FlowPolicy(pipe, LoraConfig(), max_len)


def build_reward_model(device: torch.device, dtype: torch.dtype, tiny: bool):
    """A CLIP ViT-H/14 of PickScore's size (random weights), or a tiny one for --dry-run."""
    from transformers import CLIPConfig, CLIPModel

    if tiny:
        text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
        projection = 32
    else:
        text = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16}
        vision = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16, "image_size": 224, "patch_size": 14}
        projection = 1024
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)).eval()
    finally:
        torch.set_default_dtype(previous)
    return model.to(device, dtype)


@torch.no_grad()
def reward_scores(model, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """PickScore's computation: scaled cosine of image and text embeddings, float32 [B]."""
    size = model.config.vision_config.image_size
    pixels = torch.nn.functional.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)
    dtype = next(model.parameters()).dtype
    img = model.get_image_features(pixel_values=pixels.to(dtype))
    txt = model.get_text_features(input_ids=tokens)
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
    return model.logit_scale.exp().float() * cos


# ----------------------------------------------------------------------------------- measuring


class Clock:
    """Wall time of GPU work (synchronises around each measured block)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str):
        self.sync()
        t0 = time.perf_counter()
        yield
        self.sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def move_text_encoders(policy, device: torch.device) -> None:
    for enc in (policy.pipe.text_encoder, policy.pipe.text_encoder_2, policy.pipe.text_encoder_3):
        enc.to(device)


def measure_profile(policy, reward_model, profile: Profile, args, device: torch.device) -> Phases:
    """Run every phase of the recipe on `args.micro_batches` micro-batches with `profile`'s settings."""
    from flowrl import registry
    from flowrl.kl import KLConfig
    from flowrl.train import encode_batch, group_order
    from flowrl.types import PromptBatch, Rollout

    m = profile.micro_batch
    n = m * args.micro_batches
    group = min(args.group_size, n)
    prompts = [f"a photo of {i} red circles and a blue square" for i in range(math.ceil(n / group))]
    batch_prompts = [p for p in prompts for _ in range(group)][:n]
    batch = PromptBatch(batch_prompts, torch.arange(n) // group, ())
    sampler = registry.lookup("sampler", "dpm2")(registry.lookup("sampler", "dpm2").Config(steps=args.steps))
    est_cls = registry.lookup("estimator", "elbo")
    estimator = est_cls(est_cls.Config(weighting="adaptive", timestep_fraction=0.99))
    obj_cls = registry.lookup("objective", "pepg")
    objective = obj_cls(obj_cls.Config(kl={"kind": "girsanov", "beta": 1e-4}))
    kl_cfg: KLConfig = objective.config.kl
    if profile.gradient_checkpointing:
        policy.transformer.enable_gradient_checkpointing()
    else:
        policy.transformer.disable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=3e-4, weight_decay=1e-4)
    clock = Clock(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    # An earlier offloading profile may have left the encoders on the CPU: bring them back either way.
    move_text_encoders(policy, device)
    with clock.phase("encode"):
        cond = encode_batch(policy, batch_prompts, with_negative=False)
    if profile.offload_text_encoders:
        move_text_encoders(policy, torch.device("cpu"))
        if device.type == "cuda":
            torch.cuda.empty_cache()

    policy.transformer.eval()
    xs, sigmas = [], None
    with clock.phase("rollout"), torch.no_grad():
        for i in range(0, n, m):
            idx = torch.arange(i, min(i + m, n))
            from flowrl.training.rollout import Pinned

            x0, sigmas, _ = sampler(Pinned(policy, "old"), cond.index(idx), list(range(i, i + len(idx))), policy.latent_shape)
            xs.append(x0)
    x0 = torch.cat(xs)
    with clock.phase("decode"):
        images = torch.cat([policy.decode(x0[i : i + m]) for i in range(0, n, m)])
    tokens = torch.randint(0, reward_model.config.text_config.vocab_size, (n, 77 if not args.dry_run else 8), device=device)
    with clock.phase("reward"):
        scores = torch.cat([reward_scores(reward_model, images[i : i + m], tokens[i : i + m]) for i in range(0, n, m)])
    adv = 0.1 * (scores - scores.mean())
    rollout = Rollout(batch, cond, x0, images, sigmas, None)
    order = group_order(batch.group_ids, torch.Generator().manual_seed(0))
    policy.activate("policy")
    with clock.phase("train"):
        optimizer.zero_grad(set_to_none=True)
        for i in range(0, n, m):
            idx = order[i : i + m]
            gen = torch.Generator().manual_seed(i)
            for terms in estimator(rollout.subset(idx), policy, kl_cfg, gen):
                out = objective(terms, adv[idx.to(adv.device)])
                (out.loss * (len(idx) / n)).backward()
        torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), 5.0)
        optimizer.step()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    s = clock.seconds
    return Phases(n, s["encode"], s["rollout"], s["decode"], s["reward"], s["train"], peak)


def measure_encoding(policy, device: torch.device, prompts: int) -> float:
    """Seconds to encode `prompts` distinct prompts (an epoch's prompts, CLIP-L + CLIP-G + T5)."""
    from flowrl.training.rollout import encode_batch

    move_text_encoders(policy, device)
    clock = Clock(device)
    texts = [f"a photo of {i} green triangles below a yellow circle" for i in range(prompts)]
    encode_batch(policy, texts[:2], with_negative=False)  # warm-up
    with clock.phase("encode"):
        encode_batch(policy, texts, with_negative=False)
    return clock.seconds["encode"]


# ------------------------------------------------------------------------------------ reporting


def render(results: list[dict], meta: dict) -> str:
    """The results section of docs/gpu-budget.md (markdown)."""
    lines = [
        RESULTS_BEGIN,
        f"Measured {meta['date']} on {meta['device']} (torch {meta['torch']}, {meta['dtype']}, "
        f"{meta['micro_batches']} micro-batches per profile, {meta['steps']} sampler steps).",
        "",
        "| profile | micro-batch | grad ckpt | offload text enc. | peak GiB | text enc. s | rollout s | VAE s | reward s | train s | epoch GPU-s | transformer / 585 | epoch / 616 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p, e, v = r["profile"], r["epoch"], r["verdict"]
        peak = f"{r['phases']['peak_gb']:.1f}" if r["phases"]["peak_gb"] is not None else "n/a"
        lines.append(
            f"| {p['name']} | {p['micro_batch']} | {p['gradient_checkpointing']} | {p['offload_text_encoders']} | {peak} | "
            f"{e['text_encoding']:.1f} | {e['rollout']:.1f} | {e['decode']:.1f} | {e['reward']:.1f} | {e['train']:.1f} | "
            f"{e['total']:.1f} | {v['vs_transformer_floor']:.2f}x | {v['vs_epoch_floor']:.2f}x |"
        )
    lines += [
        "",
        f"Epoch GPU-s: 1152 images (48 prompts) on one GPU; divide by the number of GPUs for the wall time of a "
        f"data-parallel epoch. Target: within {TARGET_RATIO}x of the floors.",
        "",
        "```json",
        json.dumps({"meta": meta, "results": results}, indent=1),
        "```",
        RESULTS_END,
    ]
    return "\n".join(lines)


def write_results(doc: Path, section: str) -> None:
    """Replace the results section of `doc` (between the markers), or append it."""
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# GPU budget\n"
    pattern = re.compile(re.escape(RESULTS_BEGIN) + ".*?" + re.escape(RESULTS_END), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    doc.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny SD3.5-M-architecture model on the CPU, every code path in seconds")
    ap.add_argument("--micro-batches", type=int, default=2, help="micro-batches measured per profile (default 2)")
    ap.add_argument("--steps", type=int, default=10, help="sampler steps (the recipe: 10)")
    ap.add_argument("--group-size", type=int, default=24)
    ap.add_argument("--profiles", default="24 GB,48 GB,80 GB", help="comma-separated profile names to run")
    ap.add_argument("--out", type=Path, default=None, help="markdown file whose results section is rewritten (default: docs/gpu-budget.md on a GPU, none for --dry-run)")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON here")
    args = ap.parse_args(argv)

    from flowrl.arch import SD35M, tiny_sd35m
    from flowrl.errors import FlowrlError

    if args.dry_run:
        device, dtype, arch, max_len, prompts = torch.device("cpu"), torch.float32, tiny_sd35m(), 16, 4
        profiles = [replace(p, micro_batch=2) for p in PROFILES]
        args.steps = min(args.steps, 2)
    else:
        if not torch.cuda.is_available():
            raise FlowrlError("benchmarks/gpu_budget.py measures a CUDA GPU and none is visible; run it on a GPU machine, or use --dry-run to check the script on the CPU")
        device, dtype, arch, max_len, prompts = torch.device("cuda"), torch.bfloat16, replace(SD35M, sample_size=64), 256, EPOCH_PROMPTS
        profiles = list(PROFILES)
    wanted = {x.strip() for x in args.profiles.split(",")}
    profiles = [p for p in profiles if p.name in wanted]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    policy = build_policy(arch, device, dtype, max_len)
    reward_model = build_reward_model(device, dtype, tiny=args.dry_run)
    build_s = time.perf_counter() - t0
    encode_s = measure_encoding(policy, device, prompts)
    if args.dry_run:
        encode_s *= EPOCH_PROMPTS / prompts
    results = []
    for profile in profiles:
        # A warm-up pass of one micro-batch first: CUDA kernels, cuBLAS plans, allocator pools.
        measure_profile(policy, reward_model, profile, replace_args(args, micro_batches=1), device)
        phases = measure_profile(policy, reward_model, profile, args, device)
        estimate = epoch_estimate(phases, encode_s)
        fits = phases.peak_gb is None or phases.peak_gb <= profile.memory_gb * 0.93 * 1e9 / 2**30
        results.append({"profile": asdict(profile), "phases": asdict(phases), "epoch": estimate, "verdict": verdict(estimate), "fits": fits})
        print(f"{profile.name}: peak {phases.peak_gb} GiB, epoch {estimate['total']:.1f} GPU-s", flush=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run, tiny model: not a measurement)",
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "micro_batches": args.micro_batches,
        "steps": args.steps,
        "transformer_params": sum(p.numel() for name, p in policy.transformer.named_parameters() if "lora_" not in name),
        "build_s": build_s,
        "dry_run": args.dry_run,
    }
    section = render(results, meta)
    out = args.out if args.out is not None else (None if args.dry_run else REPO / "docs" / "gpu-budget.md")
    if out is not None:
        write_results(out, section)
    if args.json is not None:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(section)
    return {"meta": meta, "results": results}


def replace_args(args: argparse.Namespace, **changes) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


if __name__ == "__main__":
    main()
