"""The `flowrl` command. Heavy libraries are imported inside command bodies so --help is instant."""

from __future__ import annotations

import sys

import click

from flowrl import __version__
from flowrl.errors import FlowrlError


class FlowrlGroup(click.Group):
    """A click group that turns user mistakes (FlowrlError) into a message and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FlowrlError as err:
            from rich.console import Console

            Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            sys.exit(2)


@click.group(cls=FlowrlGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="flowrl")
def main() -> None:
    """flowrl: reinforcement-learning fine-tuning of flow-matching text-to-image models."""


from flowrl.cli.pipeline import train, validate  # noqa: E402  (registers after `main` exists)
from flowrl.cli.rewards import rewards, score  # noqa: E402
from flowrl.cli.toy import toy  # noqa: E402
from flowrl.cli.evaluate import eval_  # noqa: E402
from flowrl.cli.export import export_lora  # noqa: E402

main.add_command(train)
main.add_command(validate)
main.add_command(toy)
main.add_command(rewards)
main.add_command(score)
main.add_command(export_lora)
main.add_command(eval_)
