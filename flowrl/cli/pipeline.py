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
@click.option(
    "--launcher", type=click.Choice(["python", "accelerate", "torchrun"]), default="python", show_default=True,
    help="python: train in this process (also what each process of `accelerate launch -m flowrl train` / "
    "`torchrun -m flowrl train` does). accelerate / torchrun: start --num-processes processes on this machine "
    "through that launcher, each running this command. train.batch_size is the global batch of all processes.",
)
@click.option("--num-processes", type=click.IntRange(min=1), default=None, help="Processes (GPUs) for --launcher accelerate/torchrun (default: one per visible GPU, else 1).")
def train(
    pipeline: Path, overrides: tuple[str, ...], out: Path | None, resume: bool, allow_changes: bool, launcher: str, num_processes: int | None
) -> None:
    """Train PIPELINE.yaml; OVERRIDES are key.sub=value (e.g. train.epochs=5).

    The first SIGTERM or Ctrl-C finishes the current epoch, writes a checkpoint and exits with code 0;
    a second one aborts at once (the last complete checkpoint stays intact). Continue with --resume.
    Several GPUs: --launcher accelerate --num-processes 8 (docs/distributed.md).
    """
    import os

    from rich.console import Console

    from flowrl.config import load_pipeline
    from flowrl.errors import FlowrlError
    from flowrl.train import Trainer

    inside = "LOCAL_RANK" in os.environ  # already one process of a launched group
    if launcher == "python" and num_processes not in (None, 1) and not inside:
        raise FlowrlError(
            f"--num-processes {num_processes} needs a launcher that starts the processes; add --launcher accelerate "
            "(or torchrun), or start them yourself with `accelerate launch --num_processes N -m flowrl train ...`"
        )
    p = load_pipeline(pipeline, overrides)  # a bad pipeline fails here, before any process is started
    if launcher != "python" and not inside:
        import subprocess

        from flowrl.distributed import shard_problems

        processes = num_processes or default_processes()
        t = p.config.train
        problems = shard_problems(t.batch_size, t.steps_per_epoch, t.micro_batch, processes, p.config.prompts.group_size)
        if problems:
            raise FlowrlError(f"train.batch_size: {problems[0]}")
        forwarded = [str(pipeline), *overrides] + (["--out", str(out)] if out is not None else [])
        forwarded += ["--resume"] * resume + ["--allow-changes"] * allow_changes
        cmd = launch_command(launcher, processes, forwarded)
        raise SystemExit(subprocess.call(cmd))
    console = Console(stderr=True)
    main = os.environ.get("RANK", "0") == "0"
    trainer = Trainer(p, out, resume=resume, allow_changes=allow_changes, log=lambda s: console.print(s, highlight=False, soft_wrap=True))
    run = trainer.run()
    if not main:
        return
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


def default_processes() -> int:
    """One process per visible GPU, or 1 without GPUs."""
    import torch

    return max(1, torch.cuda.device_count())


def free_port() -> int:
    """A TCP port free on this machine now (for the launcher's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(launcher: str, processes: int, train_args: list[str], port: int | None = None) -> list[str]:
    """The command that starts `processes` copies of `flowrl train TRAIN_ARGS` on this machine.

    Args:
        launcher: "accelerate" or "torchrun".
        processes: world size (the YAML never sets it).
        train_args: the arguments after `flowrl train` (pipeline, overrides, options).
        port: rendezvous port (default: a free one, so that two runs on one machine do not clash).
    """
    import sys

    port = port or free_port()
    if launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(processes),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]
    elif launcher == "accelerate":
        # --multi_gpu is accelerate's "several processes through torch's elastic launcher" mode; on a
        # machine without GPUs each process then joins with the gloo backend (flowrl.distributed).
        head = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--num_machines", "1",
                "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no"]
        head += ["--multi_gpu"] if processes > 1 else []
    else:
        raise ValueError(f"unknown launcher {launcher!r}; use accelerate or torchrun")
    return [*head, "-m", "flowrl", "train", *train_args]


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
