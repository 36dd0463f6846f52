"""`flowrl toy ...`: the embedded shapes world and its tiny SD3."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import click

from flowrl.errors import FlowrlError
from flowrl.paths import TOY_MODEL


@click.group()
def toy() -> None:
    """The embedded toy world: pretrain and sample the tiny SD3 on coloured shapes."""


@toy.command()
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Folder to write the model to.")
@click.option("--seed", default=0, show_default=True, help="Seed of weights, data and noise.")
@click.option("--steps", type=int, default=None, help="Transformer steps (default: the shipped recipe).")
@click.option("--vae-steps", type=int, default=None, help="VAE steps (default: the shipped recipe).")
@click.option("--scenes", type=int, default=None, help="Rendered training scenes (default: the shipped recipe).")
@click.option("--batch", type=int, default=None, help="Batch size of both phases.")
@click.option("--lr", type=float, default=None, help="Peak learning rate of the transformer (default: the shipped recipe).")
@click.option("--init", "init", type=click.Path(path_type=Path), default=None,
              help="Continue from this model folder (e.g. assets/toy-sd3): keep its VAE and text encoders, train its transformer on.")
@click.option("--device", default="cpu", show_default=True, help="Where the transformer trains: cpu, cuda, cuda:1, ...")
@click.option("--workers", type=int, default=1, show_default=True, help="Processes rendering the scenes (same data for any number).")
@click.option("--minutes", type=float, default=None, help="Train as many steps as fit in this many minutes (timed here; replaces --steps).")
@click.option("--tag-weights", default=None, help="Odds of each task tag among the scenes, e.g. position=2,color_attr=2 (others 1).")
@click.option("--force", is_flag=True, help="Replace OUT if it already holds a model.")
def pretrain(out: Path, seed: int, steps, vae_steps, scenes, batch, lr, init, device: str, workers: int, minutes, tag_weights, force: bool) -> None:
    """Build and train the tiny SD3 from scratch on rendered scenes (about 38 min on 2 cores),
    or continue training a model folder's transformer with --init.

    Writes a diffusers folder that StableDiffusion3Pipeline.from_pretrained(OUT) loads offline.
    """
    import dataclasses

    from flowrl.toy.pretrain import PretrainConfig, pretrain as run

    if out.exists() and any(out.iterdir()) and not force:
        raise FlowrlError(f"{out} is not empty; pass --force to replace it or choose another --out")
    cfg = PretrainConfig(seed=seed)
    overrides = {"steps": steps, "vae_steps": vae_steps, "n_scenes": scenes, "lr": lr}
    if batch is not None:
        overrides |= {"batch": batch, "vae_batch": batch}
    for name, value in {**overrides, "workers": workers, "minutes": minutes}.items():
        if value is not None and value <= 0:
            raise FlowrlError(f"--{name.replace('_', '-')} must be positive, got {value}")
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if tag_weights:
        cfg = dataclasses.replace(cfg, tag_weights=_parse_tag_weights(tag_weights))
    if init is not None and init.resolve() == out.resolve():
        raise FlowrlError(f"--init and --out are the same folder ({out}); write the continued model to another --out")
    _check_device(device)

    from flowrl.progress import PhaseProgress

    # Train into a temporary sibling and rename at the end: a killed run never leaves a half model.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        with PhaseProgress() as progress:
            run(tmp, cfg=cfg, log=progress.update, init=init, device=device, workers=workers, minutes=minutes)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    click.echo(f"model written to {out}")


def _parse_tag_weights(text: str) -> tuple[tuple[str, float], ...]:
    """'position=2,color_attr=1.5' -> (('position', 2.0), ('color_attr', 1.5)).

    Raises:
        FlowrlError: an item that is not TAG=NUMBER.
    """
    pairs = []
    for item in text.split(","):
        tag, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            pairs.append((tag.strip(), float(value)))
        except ValueError:
            raise FlowrlError(f"--tag-weights: {item!r} is not TAG=NUMBER; write e.g. position=2,color_attr=2") from None
    return tuple(pairs)


def _check_device(device: str) -> None:
    """Refuse a device torch cannot use, with what is available."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise FlowrlError(f"--device {device!r} is not a torch device ({err}); use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FlowrlError(f"--device {device}: no CUDA GPU is visible to torch here; use --device cpu")


def _read_prompts(prompts: str):
    from flowrl.prompts import load_prompt_set

    records = load_prompt_set(prompts).metadata
    if not records:
        raise FlowrlError(f"{prompts}: toy sampling is scored with GenEval, so it needs a GenEval-format .jsonl prompt set")
    return list(records)


@toy.command()
@click.option("--model", type=click.Path(path_type=Path), default=TOY_MODEL, show_default="assets/toy-sd3", help="Model folder.")
@click.option("--prompts", default="toy-test", show_default=True, help="GenEval metadata file or built-in set name.")
@click.option("--images-per-prompt", "-n", default=4, show_default=True, type=click.IntRange(1))
@click.option("--steps", default=20, show_default=True, type=click.IntRange(1), help="Euler steps.")
@click.option("--cfg", "cfgs", multiple=True, type=float, default=(1.0,), show_default=True, help="Guidance scale; repeat to compare several.")
@click.option("--seed", default=0, show_default=True)
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N prompts.")
@click.option("--batch", default=64, show_default=True, type=click.IntRange(1))
@click.option("--out", type=click.Path(path_type=Path), default=Path("outputs/toy-sample"), show_default=True)
def sample(model: Path, prompts: str, images_per_prompt: int, steps: int, cfgs, seed: int, limit, batch: int, out: Path) -> None:
    """Sample the toy model, score the images with toy GenEval and write a PNG grid.

    Prints strict accuracy per tag and overall (GenEval's rule) and the dense training reward.
    """
    from rich.console import Console
    from rich.table import Table

    from flowrl.progress import count_progress
    from flowrl.toy.evaluate import SampleSettings, evaluate, load_pipeline
    from flowrl.viz import save_grid

    records = _read_prompts(prompts)[:limit]
    pipe_and_card = load_pipeline(model)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for cfg in cfgs:
        settings = SampleSettings(steps=steps, cfg=cfg, images_per_prompt=images_per_prompt, seed=seed, batch=batch)
        total = len(records) * images_per_prompt
        with count_progress(f"cfg {cfg:g}", total) as advance:
            ev = evaluate(model, records, settings, advance, pipe_and_card)
        tag = f"cfg{cfg:g}"
        grid = save_grid(ev.images[:64], out / f"grid-{tag}.png", marks=[j.correct for j in ev.judgements[:64]])
        with open(out / f"results-{tag}.jsonl", "w") as f:
            for i, (r, j) in enumerate(zip(ev.records, ev.judgements)):
                f.write(json.dumps({"index": i, "tag": r.tag, "prompt": r.prompt, "correct": j.correct, "score": j.score, "reason": "; ".join(j.reasons)}) + "\n")
        results[cfg] = (ev.summary, grid)

    table = Table(title=f"toy GenEval ({len(records)} prompts x {images_per_prompt} images, {steps}-step Euler)")
    table.add_column("tag")
    for cfg in cfgs:
        table.add_column(f"cfg {cfg:g}", justify="right")
    tags = list(results[cfgs[0]][0].per_tag)
    for t in tags:
        table.add_row(t, *(f"{results[c][0].per_tag[t]:.3f}" for c in cfgs))
    table.add_row("[bold]overall[/]", *(f"[bold]{results[c][0].overall:.3f}[/]" for c in cfgs))
    table.add_row("prompts with >= 1 correct", *(f"{results[c][0].prompt_share:.3f}" for c in cfgs))
    table.add_row("dense reward (mean)", *(f"{results[c][0].dense_mean:.3f}" for c in cfgs))
    console = Console()
    console.print(table)
    summary = {
        f"cfg{c:g}": {
            "overall": s.overall, "per_tag": s.per_tag, "prompt_share": s.prompt_share,
            "dense_mean": s.dense_mean, "n_images": s.n_images, "grid": str(g),
        }
        for c, (s, g) in results.items()
    }
    summary["settings"] = {"model": str(model), "prompts": prompts, "images_per_prompt": images_per_prompt, "steps": steps, "seed": seed, "limit": limit}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.print(f"grids, per-image results and summary.json written to [bold]{out}[/]")
