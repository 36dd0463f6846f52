"""Scoring with failures found and the failure policy applied (`train.on_reward_error`): a reward
that raises, or returns non-finite scores, fails the run ("fail") or loses the groups it could not
score ("drop-group"), never a silent zero. Issue 19 makes `flowrl eval` share this policy; today it
stops at the first failure (RewardMix's checks).
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from flowrl.errors import FlowrlError, RewardError
from flowrl.rewards.mix import check_part
from flowrl.types import RewardOutput


def describe_error(err: BaseException) -> str:
    """'ValueError: boom (at rewards.py:12 in __call__)': the exception and where it was raised."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(err).__name__}: {err}{where}"


def _check_shapes(label: str, out: Any, batch: int) -> None:
    """The reward contract's shape checks (non-finite scores are a failure handled by policy)."""
    if isinstance(out, RewardOutput):
        out = replace(out, scores=torch.nan_to_num(out.scores.float(), nan=0.0, posinf=0.0, neginf=0.0))
    check_part(label, out, batch)


def _score_each_image(reward, label: str, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[object]) -> tuple[RewardOutput, list[str]]:
    """Score one image at a time, so that the images a reward cannot score are found.

    Returns:
        The output [B] (NaN score and details for images that raised) and a description of each
        error.
    """
    scores, details, errors, failures = [], [], [], 0
    for i in range(images.shape[0]):
        try:
            out = reward(images[i : i + 1], prompts[i : i + 1], metadata[i : i + 1] if metadata else ())
            _check_shapes(label, out, 1)
        except FlowrlError:
            raise
        except Exception as err:
            scores.append(float("nan"))
            details.append({})
            errors.append(describe_error(err))
            continue
        scores.append(float(out.scores[0]))
        details.append({k: float(v[0]) for k, v in out.details.items()})
        failures += out.failures
    names = list(dict.fromkeys(k for d in details for k in d))
    merged = {k: torch.tensor([d.get(k, float("nan")) for d in details]) for k in names}
    return RewardOutput(torch.tensor(scores, dtype=torch.float32), merged, failures), errors


def score_reward(reward, label: str, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[object], on_error: str) -> tuple[RewardOutput, torch.Tensor, list[str]]:
    """One reward on a batch, with its failures found and the failure policy applied.

    A reward that raises on the batch is, under drop-group, run again one image at a time to find
    the images it cannot score. A FlowrlError (a setup problem, e.g. missing weights) always stops.

    Args:
        reward: the reward stage.
        label: its label in metrics.
        images: float32 [B, 3, H, W] in [0, 1].
        prompts: B prompts.
        metadata: B records, or empty.
        on_error: "fail" or "drop-group" (train.on_reward_error).

    Returns:
        (output with scores [B] (NaN where failed), failed bool [B], error descriptions).

    Raises:
        RewardError: under "fail", naming the reward, the error (or the NaN count) and the fix.
    """
    n = images.shape[0]
    fix = "fix the reward, or set train.on_reward_error: drop-group to train on the other groups"
    try:
        out = reward(images, prompts, metadata)
        errors: list[str] = []
    except FlowrlError:
        raise
    except Exception as err:
        if on_error == "fail":
            raise RewardError(f"reward {label!r} raised {describe_error(err)} while scoring {n} images; {fix}") from err
        out, errors = _score_each_image(reward, label, images, prompts, metadata)
    else:
        _check_shapes(label, out, n)
    failed = ~torch.isfinite(out.scores.float())
    if on_error == "fail" and bool(failed.any()):
        first = int(torch.nonzero(failed)[0])
        raise RewardError(
            f"reward {label!r} returned {int(failed.sum())} non-finite score(s) (NaN or inf) out of {n} "
            f"(first: image {first}, prompt {prompts[first]!r}); {fix}"
        )
    return out, failed, errors


def whole_groups(failed: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """bool [B]: True for every image whose group holds at least one failed image.

    Args:
        failed: bool [B].
        group_ids: int [B].
    """
    bad_groups = torch.unique(group_ids[failed])
    return torch.isin(group_ids, bad_groups)


def failed_of(out: RewardOutput) -> torch.Tensor:
    """bool [B]: the images whose score is not finite (what `score_reward` marks failed)."""
    return ~torch.isfinite(out.scores.float().cpu())


def subset_output(out: RewardOutput, idx: torch.Tensor) -> RewardOutput:
    """A reward output restricted to the images at `idx` (int64 [b])."""
    return RewardOutput(out.scores[idx], {k: v[idx] for k, v in out.details.items()}, out.failures)
