"""`flowrl rewards list` (the zoo at a glance) and `flowrl score` (score images already on disk; the
library behind it is flowrl/score.py).

Matching images to prompts (also in ``flowrl score --help`` and docs/rewards.md):

* flat layout: the PNG/JPG files directly inside IMAGES_DIR, in natural name order (``img2`` before
  ``img10``). With P prompts and N images, N must be a multiple of P; prompt ``p`` gets images
  ``p*k .. p*k+k-1`` with ``k = N / P`` (GenEval generates k = 4 per prompt).
* GenEval's own output layout: ``IMAGES_DIR/<00000>/metadata.jsonl`` (one GenEval record) and
  ``IMAGES_DIR/<00000>/samples/*.png``, folders in natural order. The prompts come from the folders;
  ``--prompts`` is optional and, when given, must agree with them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from flowrl.errors import FlowrlError
from flowrl.score import (
    PER_IMAGE_ROWS, build_configs, collect_images, needs_metadata, print_report, report_json, score_images,
)


@click.group()
def rewards() -> None:
    """The reward zoo: list the available rewards and what they measure."""


@rewards.command("list")
def list_rewards() -> None:
    """Every registered reward: what it measures, its model, licence and the pip extra it needs.

    Loads no model (instant).
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from flowrl import registry

    table = Table(title="flowrl rewards", title_justify="left", show_lines=True)
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("measures", overflow="fold")
    table.add_column("model", overflow="fold")
    table.add_column("licence")
    table.add_column("extra", no_wrap=True)
    for name in registry.names("reward"):
        info = getattr(registry.lookup("reward", name), "info", None)
        if info is None:
            table.add_row(name, "(no description: the class has no `info`)", "", "", "-")
            continue
        extra = f"flowrl[{info.extra}]" if info.extra else "-"
        table.add_row(name, *(Text(x) for x in (info.measures, info.model, info.licence, extra)))
    Console().print(table)
    Console().print(
        "Use one in a pipeline under `rewards:` ({kind: NAME, weight, scale, clip, ...}) or score images with "
        "`flowrl score --reward NAME --prompts FILE IMAGES_DIR`. Details: docs/rewards.md",
        highlight=False,
    )


SCORE_HELP = f"""Score the images in IMAGES_DIR with one or more rewards.

\b
Matching images to prompts:
  * Flat folder: the PNG/JPG files directly in IMAGES_DIR, sorted by name in
    natural order (img2 before img10). With P prompts and N images, N must be
    a multiple of P, and prompt p gets the N/P consecutive images p*N/P ..
    (p+1)*N/P-1 (GenEval generates 4 per prompt).
  * GenEval's output layout: IMAGES_DIR/<00000>/metadata.jsonl (one prompt
    record) and IMAGES_DIR/<00000>/samples/*.png, folders in natural order.
    The folders carry their prompts; --prompts is optional and must agree.

\b
--prompts takes a GenEval-metadata .jsonl (the geneval reward needs one),
a .txt file with one prompt per line, or a built-in set name (toy-test).

\b
-o NAME.KEY=VALUE sets a field of a reward's config, the value read as YAML:
  -o clipscore.model=/models/clip-vit-large-patch14   (local weights)
  -o geneval.backend=hf-mask2former -o geneval.device=cpu
`flowrl rewards list` lists the rewards. Scores are each reward's raw score
(a mix's weight/scale/clip do not apply). Up to {PER_IMAGE_ROWS} images are also
listed one per row (always with --per-image).
"""


@click.command(help=SCORE_HELP)
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--reward", "-r", "reward_names", required=True, help="Reward name(s), comma-separated: geneval,ocr.")
@click.option("--prompts", "-p", default=None, help="Prompt file (.jsonl GenEval metadata or .txt) or built-in set name.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (per image and per reward) instead of tables.")
@click.option("--per-image", is_flag=True, help="Always list every image's scores.")
@click.option("-o", "--override", "overrides", multiple=True, metavar="NAME.KEY=VALUE", help="Set a reward config field; repeatable.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1), help="Images per reward call.")
def score(images_dir: Path, reward_names: str, prompts: str | None, as_json: bool, per_image: bool, overrides: tuple[str, ...], batch_size: int) -> None:
    from rich.console import Console

    from flowrl import registry

    # Model rewards load through transformers; its loading bars would interleave with our output.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from flowrl.rewards.mix import split_reward_names

    names = list(split_reward_names(reward_names))
    configs = build_configs(names, overrides)  # unknown names and bad -o are refused before any image is read
    images = collect_images(images_dir, prompts)
    if not images.records:
        needy = [n for n in names if needs_metadata(registry.lookup("reward", n))]
        if needy:
            raise FlowrlError(
                f"the {needy[0]} reward needs GenEval metadata (tag, objects, counts, colours, positions) for every "
                f"prompt, but the prompts are plain text; pass --prompts with a GenEval-format .jsonl (such as "
                f"toy-test or GenEval's evaluation_metadata.jsonl), or score images in GenEval's own output layout"
            )
    from flowrl.progress import count_progress

    n = len(images.paths)
    if n > batch_size:
        with count_progress("scoring images", n) as advance:
            report = score_images(images, configs, batch_size, advance)
    else:
        report = score_images(images, configs, batch_size)
    if as_json:
        click.echo(json.dumps(report_json(report), indent=2))
    else:
        print_report(report, per_image, Console())
