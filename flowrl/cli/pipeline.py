"""`flowrl validate` and `flowrl train`."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("pipeline", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1)
def validate(pipeline: Path, overrides: tuple[str, ...]) -> None:
    """Check PIPELINE.yaml (and key.sub=value OVERRIDES) without loading any weights.

    Prints the resolved configuration's stages on success; every problem at once otherwise.
    """
    from rich.console import Console

    from flowrl.config import load_pipeline

    p = load_pipeline(pipeline, overrides)
    c = p.config
    Console().print(
        f"[green]ok[/] {pipeline}: sampler={p.sampler.kind} estimator={p.estimator.kind} "
        f"objective={p.objective.kind} advantage={p.advantage.kind} "
        f"rewards={','.join(r.label for r in p.rewards)} batch={c.train.batch_size} "
        f"group={c.prompts.group_size} epochs={c.train.epochs}",
        highlight=False,
    )


@click.command()
@click.argument("pipeline", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run folder (default: the pipeline's `output`).")
@click.option("--resume", is_flag=True, help="Continue the run in the output folder from its latest checkpoint.")
def train(pipeline: Path, overrides: tuple[str, ...], out: Path | None, resume: bool) -> None:
    """Train PIPELINE.yaml; OVERRIDES are key.sub=value (e.g. train.epochs=5)."""
    from rich.console import Console

    from flowrl.config import load_pipeline
    from flowrl.train import Trainer

    p = load_pipeline(pipeline, overrides)
    console = Console(stderr=True)
    run = Trainer(p, out, resume=resume, log=lambda s: console.print(s, highlight=False)).run()
    for line in eval_progress(run / "metrics.jsonl"):
        console.print(line, highlight=False)
    console.print(f"run folder: [bold]{run}[/] (curves.png, samples/, metrics.jsonl, checkpoints/)")


def eval_progress(metrics: Path) -> list[str]:
    """'eval/<reward>: first -> last (epochs a -> b)' for each evaluated reward of a run."""
    import json

    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
    keys = sorted({k for r in rows for k in r if k.startswith("eval/") and k.count("/") == 1})
    lines = []
    for key in keys:
        seen = [(r["epoch"], r[key]) for r in rows if key in r]
        (e0, v0), (e1, v1) = seen[0], seen[-1]
        lines.append(f"{key}: {v0:.3f} (epoch {e0}) -> {v1:.3f} (epoch {e1})")
    return lines
