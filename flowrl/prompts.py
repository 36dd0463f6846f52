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


def pick_prompts(
    n_prompts: int,
    n_total: int,
    rng,
    tags: tuple[str, ...] | None = None,
    sampling: str = "uniform",
    tag_weights: dict[str, float] | None = None,
):
    """Indices of the prompts of one epoch, int64 [n_prompts].

    uniform: a random subset (with replacement only when n_prompts > n_total).
    by-tag: the slots are shared out among the tags in proportion to `tag_weights`, evenly without
    them (`tag_slots`); within a tag, prompts are drawn without replacement, cycling through a
    fresh permutation when the tag has fewer prompts than slots. Tags are visited in sorted order,
    so the result depends only on `rng`'s state.

    Args:
        n_prompts: prompts to pick.
        n_total: size of the set.
        rng: a numpy Generator.
        tags: each prompt's tag [n_total] (needed for by-tag).
        sampling: "uniform" or "by-tag".
        tag_weights: by-tag only: relative share of each tag (a tag not named weighs 1, 0 leaves
            it out).

    Raises:
        ValueError: by-tag without tags, an unknown sampling, tag weights with uniform sampling,
            or weights that name no tag of the set or leave none.
    """
    import numpy as np

    if sampling == "uniform":
        if tag_weights:
            raise ValueError("tag weights need by-tag prompt sampling")
        return rng.choice(n_total, size=n_prompts, replace=n_prompts > n_total).astype(np.int64)
    if sampling != "by-tag":
        raise ValueError(f"unknown prompt sampling {sampling!r}; use uniform or by-tag")
    if tags is None or len(tags) != n_total:
        raise ValueError("by-tag prompt sampling needs a tag for every prompt")
    tag_of = np.asarray(tags)
    names = sorted(set(tags))
    slots = tag_slots(n_prompts, names, tag_weights or {}, rng)
    chosen = []
    for name, k in zip(names, slots, strict=True):
        members = np.flatnonzero(tag_of == name)
        rounds = -(-int(k) // len(members))
        order = np.concatenate([rng.permutation(members) for _ in range(rounds)]) if k else members[:0]
        chosen.append(order[:k])
    out = np.concatenate(chosen).astype(np.int64)
    return out[rng.permutation(len(out))]


def check_tag_weights(weights: dict[str, float], names: list[str] | None) -> None:
    """Refuse weights that are negative, name a tag the set lacks, or leave no tag with a share
    (`names` None, before the set is read: the sign alone).

    Raises:
        ValueError: naming the offending weights or unknown tags, and the set's tags.
    """
    negative = {k: w for k, w in weights.items() if not w >= 0}
    if negative:
        raise ValueError(f"tag weights must be >= 0 (0 leaves a tag out), got {negative}")
    if names is None:
        return
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"tag weights name {unknown}, which no prompt of the set has; its tags are {names}")
    if all(weights.get(n, 1.0) <= 0 for n in names):
        raise ValueError(f"tag weights give every tag of the set ({names}) a weight of 0; give at least one a positive weight")


def tag_slots(n_prompts: int, names: list[str], weights: dict[str, float], rng):
    """How many of an epoch's `n_prompts` prompts each tag of `names` gets: int64 [len(names)].

    Shares are proportional to `weights` (1 for a tag not named). Each tag gets the whole part of
    its share; the slots left over go to tags drawn without replacement with odds proportional to
    the fractional parts (evenly when those are equal, as with no weights).
    """
    import numpy as np

    check_tag_weights(weights, names)
    w = np.array([float(weights.get(n, 1.0)) for n in names])
    share = n_prompts * w / w.sum()
    slots = np.floor(share + 1e-9).astype(np.int64)
    left = n_prompts - int(slots.sum())
    if left:
        frac = np.clip(share - slots, 0.0, None)
        equal = np.allclose(frac, frac[0])
        extra = rng.choice(len(names), size=left, replace=False, p=None if equal else frac / frac.sum())
        slots[extra] += 1
    return slots
