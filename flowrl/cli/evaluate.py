"""`flowrl eval`: sample a run, a checkpoint or a base model on a prompt set and score the images."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

EVAL_HELP = """Evaluate TARGET with one or more rewards (comma-separated: geneval,clipscore).

\b
TARGET is one of:
  * a run folder: its newest complete checkpoint, with the run's pipeline.yaml
  * a checkpoint folder RUN/checkpoints/epoch-N (pipeline.yaml two levels up)
  * a base model: a diffusers folder (assets/toy-sd3) or a hub id, no adapters

\b
Defaults come from the run's pipeline (a base model: flowrl's defaults): the
eval section's sampler, steps, guidance and weights (EMA), and prompts.test
as the prompt set (for a base model: toy-test for the embedded toy model,
else --prompts is required). GenEval draws 4 images per prompt. Image i uses
the seed --seed + i, whatever the batch size: with the defaults,
`flowrl eval --reward geneval assets/toy-sd3` reproduces the toy model's
README base score (0.601).

\b
Writes OUT (default TARGET/eval/<settings>, or outputs/eval/<model>/<settings>
for a base model): results.jsonl (one line per image, GenEval's field names),
summary.json, grid.png, images/ and settings.json. Rerunning with the same
settings resumes: images already scored are skipped; a larger --limit extends.
"""


@click.command("eval", help=EVAL_HELP)
@click.argument("target")
@click.option("--reward", "-r", "reward_names", required=True, help="Reward name(s), comma-separated: geneval,clipscore.")
@click.option("--prompts", "-p", default=None, help="GenEval metadata .jsonl, a .txt file or a built-in set name (default: the pipeline's prompts.test).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N prompts.")
@click.option("--images-per-prompt", "-n", type=click.IntRange(1), default=None, help="Images per prompt (default: 4 for GenEval, else the pipeline's eval.images_per_prompt).")
@click.option("--batch", type=click.IntRange(1), default=32, show_default=True, help="Images sampled and scored together.")
@click.option("--weights", type=click.Choice(["ema", "policy"]), default=None, help="Adapter of the checkpoint (default: the pipeline's eval.weights, ema).")
@click.option("--sampler", default=None, help="Sampler kind (default: the pipeline's eval sampler, euler).")
@click.option("--steps", type=click.IntRange(1), default=None, help="Sampler steps (default: the pipeline's eval sampler's).")
@click.option("--guidance", type=float, default=None, help="CFG scale, 1 = off (default: the pipeline's eval sampler's).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Image i uses seed + i.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output folder.")
@click.option("--force", is_flag=True, help="Start over in an output folder that holds another evaluation.")
@click.option("-o", "--override", "overrides", multiple=True, metavar="NAME.KEY=VALUE", help="Set a reward config field (YAML value), e.g. -o geneval.backend=hf-mask2former; repeatable.")
def eval_(target: str, reward_names: str, prompts, limit, images_per_prompt, batch: int, weights, sampler, steps, guidance, seed: int, out, force: bool, overrides) -> None:
    import os

    from rich.console import Console

    from flowrl.evaluate import EvalRequest, plan_eval, run_eval

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    req = EvalRequest(
        target=target,
        rewards=(reward_names,),
        prompts=prompts,
        limit=limit,
        images_per_prompt=images_per_prompt,
        batch=batch,
        weights=weights,
        sampler=sampler,
        steps=steps,
        guidance=guidance,
        seed=seed,
        out=out,
        force=force,
        overrides=tuple(overrides),
    )
    plan = plan_eval(req)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    err.print(describe(plan.settings()))
    result = run_eval(plan, log=lambda s: err.print(s))
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    print_summary(result.summary, console)
    console.print(
        f"wrote [bold]{result.out}[/]: results.jsonl, summary.json, grid.png, images/ "
        f"({result.sampled} image(s) sampled now, {result.skipped} resumed)"
    )


def describe(settings: Mapping[str, Any]) -> str:
    """One line saying what is evaluated and how."""
    who = settings["target"] + ("" if settings["epoch"] is None else f" (epoch {settings['epoch']}, {settings['weights']} weights)")
    seeds = settings["seeds"]
    return (
        f"evaluating {who}: {settings['sampler']} {settings['steps']} steps, guidance {settings['guidance']:g}; "
        f"{settings['prompts']}: {settings['n_prompts']} prompts x {settings['images_per_prompt']} images, "
        f"seeds {seeds['first']}..{seeds['last']}"
    )


def summary_label(key: str) -> str:
    """eval_summary keys as table rows: '' -> overall, 'tag/colors' -> colors."""
    if key == "":
        return "overall"
    return key.split("/", 1)[1] if key.startswith("tag/") else f"{key} (mean)"


def print_summary(summary: Mapping[str, Any], console) -> None:
    """Rich tables from summary.json's content: each reward's own evaluation summary (GenEval: per
    tag and overall, 3 decimals), then every reward's score distribution (4 decimals)."""
    from rich.table import Table

    for label, entry in summary["rewards"].items():
        ev = entry.get("eval_summary")
        if not ev:
            continue
        strict = summary.get("strict_reward") == label
        t = Table(title=f"{label}: " + ("GenEval, strict correctness" if strict else "evaluation summary"), title_justify="left")
        t.add_column("tag" if strict else "metric", no_wrap=True)
        t.add_column("score", justify="right")
        order = [k for k in ev if k.startswith("tag/")] + [k for k in ev if not k.startswith("tag/")]
        for key in order:
            name, value = summary_label(key), f"{ev[key]:.3f}"
            if key == "":
                name, value = f"[bold]{name}[/]", f"[bold]{value}[/]"
            t.add_row(name, value)
            if key == "" and strict:
                t.add_row("prompts with >= 1 correct", f"{summary['prompt_share']:.3f}")
        console.print(t)
    t = Table(title=f"scores of {summary['n_images']} images ({summary['n_prompts']} prompts)", title_justify="left")
    t.add_column("reward", no_wrap=True)
    for col in ("mean", "std", "min", "p25", "median", "p75", "max", "n"):
        t.add_column(col, justify="right")
    for label, e in summary["rewards"].items():
        q = e["quantiles"]
        nums = [e["mean"], e["std"], e["min"], q["p25"], q["p50"], q["p75"], e["max"]]
        t.add_row(label, *(f"{x:.4f}" for x in nums), str(e["n"]))
    console.print(t)
    failed = {k: v for k, v in summary.get("failures", {}).items() if v}
    if failed:
        console.print(f"[yellow]failures[/] (images a reward could not score): {failed}")
