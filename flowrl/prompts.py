"""Prompt sets: built-in names, GenEval metadata (.jsonl) or plain text (one prompt per line)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flowrl.errors import FlowrlError


@dataclass(frozen=True)
class PromptSet:
    """Prompts with optional per-prompt metadata (GenEval records for .jsonl sets).

    Attributes:
        prompts: the prompt texts.
        metadata: one entry per prompt (a PromptRecord) or empty for plain-text sets.
        source: where the set was read from.
    """

    prompts: tuple[str, ...]
    metadata: tuple[object, ...]
    source: str

    def __len__(self) -> int:
        return len(self.prompts)


def resolve_prompt_path(spec: str) -> Path:
    """A file path, or the name of a built-in set (assets/prompts/NAME.jsonl)."""
    from flowrl.paths import builtin_prompts

    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if "/" not in spec and "." not in spec:
        try:
            return builtin_prompts(spec)
        except FileNotFoundError as err:
            raise FlowrlError(str(err)) from None
    raise FlowrlError(f"prompt file {spec} does not exist; give a .jsonl (GenEval metadata) or .txt file, or a built-in set name")


def load_prompt_set(spec: str) -> PromptSet:
    """Read a prompt set; GenEval metadata is validated (errors carry line numbers).

    Raises:
        FlowrlError: missing file, a bad line, or an empty set.
    """
    from flowrl.rewards.geneval import load_metadata

    path = resolve_prompt_path(spec)
    if path.suffix == ".jsonl":
        try:
            records = load_metadata(path)
        except (ValueError, FileNotFoundError) as err:
            raise FlowrlError(str(err)) from None
        return PromptSet(tuple(r.prompt for r in records), tuple(records), str(path))
    prompts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if text and not text.startswith("#"):
            prompts.append(text)
    if not prompts:
        raise FlowrlError(f"{path} holds no prompts (one per line; blank lines and # comments are skipped)")
    return PromptSet(tuple(prompts), (), str(path))


def prompt_tags(prompts: PromptSet) -> tuple[str, ...] | None:
    """Each prompt's task tag, or None when the set has no tagged metadata (a .txt set)."""
    tags = tuple(getattr(m, "tag", None) for m in prompts.metadata)
    if not tags or any(t is None for t in tags):
        return None
    return tags


def pick_prompts(n_prompts: int, n_total: int, rng, tags: tuple[str, ...] | None = None, sampling: str = "uniform"):
    """Indices of the prompts of one epoch, int64 [n_prompts].

    uniform: a random subset (with replacement only when n_prompts > n_total).
    by-tag: the slots are shared out evenly among the tags (n_prompts // T each, the remainder to
    tags drawn at random); within a tag, prompts are drawn without replacement, cycling through a
    fresh permutation when the tag has fewer prompts than slots. Tags are visited in sorted order,
    so the result depends only on `rng`'s state.

    Args:
        n_prompts: prompts to pick.
        n_total: size of the set.
        rng: a numpy Generator.
        tags: each prompt's tag [n_total] (needed for by-tag).
        sampling: "uniform" or "by-tag".

    Raises:
        ValueError: by-tag without tags, or an unknown sampling.
    """
    import numpy as np

    if sampling == "uniform":
        return rng.choice(n_total, size=n_prompts, replace=n_prompts > n_total).astype(np.int64)
    if sampling != "by-tag":
        raise ValueError(f"unknown prompt sampling {sampling!r}; use uniform or by-tag")
    if tags is None or len(tags) != n_total:
        raise ValueError("by-tag prompt sampling needs a tag for every prompt")
    tag_of = np.asarray(tags)
    names = sorted(set(tags))
    slots = np.full(len(names), n_prompts // len(names))
    extra = rng.choice(len(names), size=n_prompts % len(names), replace=False)
    slots[extra] += 1
    chosen = []
    for name, k in zip(names, slots, strict=True):
        members = np.flatnonzero(tag_of == name)
        rounds = -(-int(k) // len(members))
        order = np.concatenate([rng.permutation(members) for _ in range(rounds)]) if k else members[:0]
        chosen.append(order[:k])
    out = np.concatenate(chosen).astype(np.int64)
    return out[rng.permutation(len(out))]
