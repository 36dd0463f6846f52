"""What a bfloat16 model loses when its timesteps are rounded to bfloat16 (issue 17, item 4).

flowrl used to pass ``(t * 1000).to(model dtype)`` to the transformer; diffusers'
StableDiffusion3Pipeline passes its scheduler's float32 timesteps, and the transformer casts the
sinusoidal embedding, not the time, to its dtype. This script measures the difference on the
embedded toy model loaded in bfloat16 (as the SD3.5 recipes load SD3.5, `model.dtype: bfloat16`):

1. per grid time of SD3's 10-, 20- and 40-step grids: the timestep error of bf16 rounding and the
   relative L2 change of the time embedding the transformer sees (its `time_proj` output);
2. the toy's test set (79 prompts x 4 images, 20-step Euler, no CFG, image i from seed i), sampled
   three ways from the same noise: float32 model, bf16 model with float32 timesteps (diffusers and
   flowrl now), bf16 model with bf16 timesteps (flowrl before): toy GenEval per tag, verdicts that
   flip, and each bf16 variant's pixel distance to the float32 images.

Usage::

    .venv/bin/python benchmarks/timestep_precision.py             # writes docs/timestep-precision.md
    .venv/bin/python benchmarks/timestep_precision.py --limit 8   # a quick look (8 prompts)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flowrl.paths import TOY_MODEL  # noqa: E402
from flowrl.progress import count_progress  # noqa: E402


def bf16_timesteps(transformer) -> torch.utils.hooks.RemovableHandle:
    """Make `transformer` see its timesteps rounded to bfloat16, as flowrl's old policy passed them."""

    def hook(module, args, kwargs):
        kwargs["timestep"] = kwargs["timestep"].to(torch.bfloat16)
        return args, kwargs

    return transformer.register_forward_pre_hook(hook, with_kwargs=True)


def embedding_table(transformer, steps_list=(10, 20, 40)) -> list[str]:
    """Markdown rows: per grid, the largest timestep error and relative embedding change."""
    from flowrl.samplers import sd3_sigmas

    proj = transformer.time_text_embed.time_proj
    rows = ["| grid | largest timestep error (units of t x 1000) | largest relative L2 change of the time embedding | at t x 1000 |", "|---|---|---|---|"]
    for steps in steps_list:
        t = sd3_sigmas(steps)[:-1] * 1000
        rounded = t.to(torch.bfloat16).float()
        exact, coarse = proj(t), proj(rounded)
        rel = (exact - coarse).norm(dim=1) / exact.norm(dim=1)
        k = int(rel.argmax())
        rows.append(f"| {steps} steps | {float((t - rounded).abs().max()):.2f} | {float(rel.max()):.1%} | {float(t[k]):.2f} -> {float(rounded[k]):.0f} |")
    return rows


def sample_all(pipe, prompts, steps: int, max_len: int, label: str, batch: int = 64) -> torch.Tensor:
    out = []
    with count_progress(label, len(prompts)) as advance:
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            gens = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
            images = pipe(chunk, num_inference_steps=steps, guidance_scale=1.0, generator=gens,
                          max_sequence_length=max_len, output_type="pt").images
            out.append(images.float().clamp(0, 1))
            advance(len(chunk))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="only the first N test prompts")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "timestep-precision.md")
    args = ap.parse_args()

    from flowrl.policy import load_pipeline
    from flowrl.prompts import load_prompt_set
    from flowrl.rewards.geneval import summarize
    from flowrl.toy.evaluate import score
    from flowrl.toy.model import read_card

    test = load_prompt_set("toy-test")
    records = list(test.metadata[: args.limit] if args.limit else test.metadata)
    expanded = [r for r in records for _ in range(4)]
    prompts = [r.prompt for r in expanded]
    max_len = read_card(TOY_MODEL).get("max_sequence_length", 256)

    t0 = time.perf_counter()
    fp32 = load_pipeline(str(TOY_MODEL), torch.float32)
    bf16 = load_pipeline(str(TOY_MODEL), torch.bfloat16)
    table = embedding_table(bf16.transformer)
    images = {"float32 model": sample_all(fp32, prompts, args.steps, max_len, "float32")}
    images["bf16 model, float32 timesteps (diffusers; flowrl now)"] = sample_all(bf16, prompts, args.steps, max_len, "bf16, fp32 t")
    handle = bf16_timesteps(bf16.transformer)
    try:
        images["bf16 model, bf16 timesteps (flowrl before)"] = sample_all(bf16, prompts, args.steps, max_len, "bf16, bf16 t")
    finally:
        handle.remove()
    verdicts = {k: score(v, expanded) for k, v in images.items()}
    summaries = {k: summarize(zip(expanded, j)) for k, j in verdicts.items()}
    elapsed = time.perf_counter() - t0

    names = list(images)
    tags = list(next(iter(summaries.values())).per_tag)
    ref = images[names[0]]
    lines = [
        "# Timesteps of a bfloat16 model: float32 as diffusers passes them, or rounded to bfloat16",
        "",
        f"Generated by `python benchmarks/timestep_precision.py{' --limit ' + str(args.limit) if args.limit else ''}` on "
        f"{dt.date.today()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()}); {elapsed / 60:.1f} min.",
        "",
        "flowrl passed `(t * 1000).to(model dtype)` to the transformer until issue 17; diffusers' "
        "StableDiffusion3Pipeline passes float32 timesteps and the transformer casts the embedding, not the "
        "time. Near t = 1 bfloat16 keeps multiples of 4, so the model saw another time:",
        "",
        *table,
        "",
        f"Toy GenEval of `assets/toy-sd3` on {len(records)} test prompts x 4 images ({len(prompts)}), "
        f"{args.steps}-step Euler, no CFG, image i from seed i, the same noise for all three:",
        "",
        "| model / timesteps | " + " | ".join(tags) + " | overall | verdicts unlike float32 | mean abs pixel diff to float32 |",
        "|---|" + "---|" * (len(tags) + 3),
    ]
    base = verdicts[names[0]]
    for k in names:
        s = summaries[k]
        flips = sum(a.correct != b.correct for a, b in zip(base, verdicts[k], strict=True))
        diff = float((images[k] - ref).abs().mean())
        lines.append(f"| {k} | " + " | ".join(f"{s.per_tag[t]:.3f}" for t in tags) + f" | **{s.overall:.3f}** | {flips} of {len(prompts)} | {diff:.4f} |")
    a, b = images[names[1]], images[names[2]]
    lines += [
        "",
        f"Between the two bf16 variants: {sum(x.correct != y.correct for x, y in zip(verdicts[names[1]], verdicts[names[2]], strict=True))} "
        f"verdicts differ, mean abs pixel difference {float((a - b).abs().mean()):.4f}.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
