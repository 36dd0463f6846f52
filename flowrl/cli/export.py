"""`flowrl export-lora`: a trained run's LoRA as a diffusers / ComfyUI file, or merged weights."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("export-lora")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output folder (must be new or empty, or use --force).")
@click.option(
    "--format", "fmt", type=click.Choice(["diffusers", "comfyui", "kohya"]), default="diffusers", show_default=True,
    help="diffusers: pytorch_lora_weights.safetensors for load_lora_weights. comfyui/kohya: lora.safetensors "
    "in the original SD3 layout (lora_unet_* keys). With --merge it picks the layout of transformer.safetensors.",
)
@click.option("--weights", type=click.Choice(["ema", "policy"]), default="ema", show_default=True, help="Which adapter of the checkpoint.")
@click.option("--scale", type=float, default=1.0, show_default=True, help="Multiply the LoRA update by S.")
@click.option("--mix", default=None, help="Weights of several checkpoints, e.g. 0.7,0.3 (default: equal, summing to 1).")
@click.option("--merge", is_flag=True, help="Write the base transformer with the LoRA added (transformer/ folder and transformer.safetensors).")
@click.option("--base", default=None, help="Base model to check against and merge into (default: the run's model.path).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None, help="dtype of merged weights (default: the base's).")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
def export_lora(checkpoints, out, fmt, weights, scale, mix, merge, base, dtype, force) -> None:
    """Export the LoRA of CHECKPOINTS (run folders, using their latest checkpoint, or epoch-N folders).

    Several checkpoints are mixed into one LoRA: the weighted sum of their updates, exactly.
    """
    from rich.console import Console

    from flowrl.export import export_lora as run_export

    console = Console(stderr=True)
    result = run_export(
        list(checkpoints), out, fmt=fmt, merge=merge, weights=weights, scale=scale, mix=mix, base=base,
        dtype=dtype, force=force, log=lambda s: console.print(s, highlight=False),
    )
    for s, w in zip(result.sources, result.weights):
        share = f" x {w:g}" if len(result.sources) > 1 else ""
        console.print(f"from {s.checkpoint} ({s.weights}, epoch {s.epoch}, rank {s.rank}, alpha {s.alpha:g}){share}", highlight=False)
    for f in result.files:
        console.print(f"wrote [bold]{result.out / f}[/]", highlight=False)
