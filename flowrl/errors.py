"""User-facing errors: what went wrong, why, and how to fix it. The CLI prints them without a
traceback and exits with code 2."""

from __future__ import annotations


class FlowrlError(Exception):
    """A mistake in the user's input or environment that the message explains how to fix."""


class ModelNotFoundError(FlowrlError, FileNotFoundError):
    """A model folder or hub id that cannot be loaded offline."""
