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
@click.option(
    "--resume", is_flag=True,
    help="Continue the run in the output folder from its latest complete checkpoint. The pipeline must match the "
    "run's pipeline.yaml, except train.epochs and the eval, logging and checkpoint settings.",
)
@click.option(
    "--allow-changes", is_flag=True,
    help="With --resume: continue even though settings that change what the run learns differ (the old settings "
    "are kept as pipeline.before-epoch-N.yaml). LoRA settings can never change.",
)
def train(pipeline: Path, overrides: tuple[str, ...], out: Path | None, resume: bool, allow_changes: bool) -> None:
    """Train PIPELINE.yaml; OVERRIDES are key.sub=value (e.g. train.epochs=5).

    The first SIGTERM or Ctrl-C finishes the current epoch, writes a checkpoint and exits with code 0;
    a second one aborts at once (the last complete checkpoint stays intact). Continue with --resume.
    """
    from rich.console import Console

    from flowrl.config import load_pipeline
    from flowrl.train import Trainer

    p = load_pipeline(pipeline, overrides)
    console = Console(stderr=True)
    trainer = Trainer(p, out, resume=resume, allow_changes=allow_changes, log=lambda s: console.print(s, highlight=False, soft_wrap=True))
    run = trainer.run()
    if trainer.stopped_by is not None:
        console.print(
            f"stopped by {trainer.stopped_by}"
            + (f" after epoch {trainer.stopped_at} (checkpointed)" if trainer.stopped_at is not None else " before training started")
            + f". Continue with:\n  {resume_command(pipeline, overrides, run)}",
            highlight=False, soft_wrap=True,
        )
        return
    for line in eval_progress(run / "metrics.jsonl"):
        console.print(line, highlight=False)
    console.print(f"run folder: [bold]{run}[/] (curves.png, samples/, metrics.jsonl, checkpoints/)")


def resume_command(pipeline: Path, overrides: tuple[str, ...], run: Path) -> str:
    """The shell command that continues a stopped run (quoted for a POSIX shell)."""
    import shlex

    return shlex.join(["flowrl", "train", str(pipeline), *overrides, "--out", str(run), "--resume"])


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
