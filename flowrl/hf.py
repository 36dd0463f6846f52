"""Quiet, offline-friendly use of the Hugging Face libraries."""

from __future__ import annotations


def quiet() -> None:
    """Hide diffusers/transformers loading bars and info chatter: flowrl shows its own progress.

    Warnings that matter (e.g. a missing weight) still come through at error level as exceptions.
    """
    import os

    # Read by transformers when it first configures logging: its import-time notices (e.g. that
    # torchvision is absent and a PIL image processor is used instead) are not the user's concern.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
