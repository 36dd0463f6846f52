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
