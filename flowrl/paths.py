"""Where flowrl finds its shipped assets (the embedded toy model and the built-in prompt sets)."""

from __future__ import annotations

from pathlib import Path

#: The repository's assets folder (flowrl is installed from a checkout, editable).
ASSETS = Path(__file__).resolve().parents[1] / "assets"

TOY_MODEL = ASSETS / "toy-sd3"
PROMPTS = ASSETS / "prompts"


def builtin_prompts(name: str) -> Path:
    """Path of a built-in prompt set, e.g. ``toy-test`` -> assets/prompts/toy-test.jsonl.

    Raises:
        FileNotFoundError: with the names that do exist.
    """
    path = PROMPTS / f"{name}.jsonl"
    if not path.is_file():
        known = sorted(p.stem for p in PROMPTS.glob("*.jsonl"))
        raise FileNotFoundError(
            f"no built-in prompt set {name!r} in {PROMPTS}; built-in sets: {', '.join(known) or 'none'}"
        )
    return path
