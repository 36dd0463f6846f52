"""User-facing errors: what went wrong, why, and how to fix it. The CLI prints them without a
traceback and exits with code 2."""

from __future__ import annotations


class FlowrlError(Exception):
    """A mistake in the user's input or environment that the message explains how to fix."""


class ModelNotFoundError(FlowrlError, FileNotFoundError):
    """A model folder or hub id that cannot be loaded offline."""


class ResumeError(FlowrlError):
    """`--resume` cannot continue the run as asked (no checkpoint, or a changed pipeline)."""


class NumericalError(FlowrlError):
    """Training stopped because too many optimizer steps in a row had non-finite loss or gradients."""


class RewardError(FlowrlError):
    """A reward raised or returned non-finite scores and `train.on_reward_error` says to stop."""
