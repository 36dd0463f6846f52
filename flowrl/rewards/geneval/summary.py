"""Aggregate per-image GenEval verdicts into the numbers the paper reports."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flowrl.rewards.geneval.metadata import TAGS, PromptRecord
from flowrl.rewards.geneval.scoring import Judgement

__all__ = ["GenEvalSummary", "summarize"]


@dataclass(frozen=True)
class GenEvalSummary:
    """GenEval scores of a set of images.

    Attributes:
        overall: Mean of the per-tag means (GenEval's headline number), over the tags present.
        per_tag: Share of correct images per tag, in :data:`TAGS` order, only tags present.
        prompt_share: Share of distinct prompts (by tag and prompt text) with at least one correct image.
        n_images: Number of images summarised.
        n_prompts: Number of distinct prompts among them.
        dense_mean: Mean dense reward (:attr:`Judgement.score`) over all images, or None when any
            result was given as a bare bool.
    """

    overall: float
    per_tag: dict[str, float]
    prompt_share: float
    n_images: int
    n_prompts: int
    dense_mean: float | None = None


def summarize(results: Iterable[tuple[PromptRecord, Judgement | bool]]) -> GenEvalSummary:
    """Summarise per-image verdicts the way GenEval reports them.

    The overall score averages tags, not images, so a tag's weight does not depend on how many
    prompts it has (e.g. 80 counting vs 100 position prompts).

    Args:
        results: One ``(record, verdict)`` pair per image; several images of the same prompt repeat
            the record. ``verdict`` is a :class:`Judgement` or just the strict ``correct`` bool.

    Returns:
        The summary.

    Raises:
        ValueError: ``results`` is empty, or a verdict is neither a Judgement nor a bool.
    """
    per_tag_hits: dict[str, list[bool]] = {}
    prompt_hit: dict[tuple[str, str], bool] = {}
    dense: list[float] = []
    all_dense = True
    n_images = 0
    for record, verdict in results:
        if isinstance(verdict, Judgement):
            correct = verdict.correct
            dense.append(verdict.score)
        elif isinstance(verdict, bool):
            correct = verdict
            all_dense = False
        else:
            raise ValueError(
                f"summarize expects (PromptRecord, Judgement or bool) pairs, got a {type(verdict).__name__} "
                f"verdict for prompt {record.prompt!r}; pass judge(...) or judge(...).correct"
            )
        n_images += 1
        per_tag_hits.setdefault(record.tag, []).append(correct)
        key = (record.tag, record.prompt)
        prompt_hit[key] = prompt_hit.get(key, False) or correct
    if not n_images:
        raise ValueError("summarize got no results; judge at least one image first")
    # TAGS order first so reports line up with the paper's table; unknown tags cannot occur
    # (PromptRecord validates its tag).
    per_tag = {tag: sum(per_tag_hits[tag]) / len(per_tag_hits[tag]) for tag in TAGS if tag in per_tag_hits}
    return GenEvalSummary(
        overall=sum(per_tag.values()) / len(per_tag),
        per_tag=per_tag,
        prompt_share=sum(prompt_hit.values()) / len(prompt_hit),
        n_images=n_images,
        n_prompts=len(prompt_hit),
        dense_mean=sum(dense) / len(dense) if all_dense else None,
    )
