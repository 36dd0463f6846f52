"""Schedules of the trainer: the learning rate per epoch and the old policy's decay per step."""

from __future__ import annotations

import math


def learning_rate(epoch: int, epochs: int, lr: float, schedule: str, warmup: int, min_ratio: float) -> float:
    """The learning rate of `epoch` (0-based) of `epochs`: linear warm-up over `warmup` epochs, then
    constant or cosine decay to `min_ratio * lr` at the last epoch. A pure function of the epoch, so
    resuming needs no scheduler state."""
    if warmup and epoch < warmup:
        return lr * (epoch + 1) / warmup
    if schedule == "constant":
        return lr
    span = max(1, epochs - 1 - warmup)
    progress = min(1.0, (epoch - warmup) / span)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def old_policy_decay(step: int, rate: float, cap: float, start: int = 0) -> float:
    """d of the old policy's soft update old <- d old + (1 - d) theta after `step` optimizer steps
    in all: 0 before `start`, then min(rate * (step - start), cap). The paper's and DiffusionNFT's
    return_decay(global_step), called after each epoch's steps with the count that includes them:
    one step per epoch gives 0.001 after the first epoch, two steps per epoch 0.002."""
    if step < start:
        return 0.0
    return min(rate * (step - start), cap)
