"""Prompts of the shapes world in GenEval's schema and phrasing, and the built-in train/test split.

Every prompt the world can express is enumerated (`all_records`); `split_records` deals each tag's
prompts into a train and a test set with a fixed seed so that no prompt is in both. The shipped sets
live in ``assets/prompts/toy-{train,test}.jsonl`` and a test checks that this module regenerates them.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from flowrl.rewards.geneval import Clause, PromptRecord, write_metadata
from flowrl.toy.world import COLORS, COUNTS, NUMBER_WORDS, PLURALS, SHAPES

RELATION_WORDS: tuple[str, ...] = ("left of", "right of", "above", "below")

#: Share of each tag's prompts held out for the test set.
TEST_FRACTION = 1 / 3

#: Seed of the shipped split.
SPLIT_SEED = 20260204


def article(word: str) -> str:
    """'a' or 'an', as GenEval writes it ("an orange", "a bench")."""
    return "an" if word[0] in "aeiou" else "a"


def single_object() -> list[PromptRecord]:
    return [
        PromptRecord("single_object", f"a photo of {article(s)} {s}", (Clause(s, 1),))
        for s in SHAPES
    ]


def two_object() -> list[PromptRecord]:
    return [
        PromptRecord(
            "two_object",
            f"a photo of {article(a)} {a} and {article(b)} {b}",
            (Clause(a, 1), Clause(b, 1)),
        )
        for a, b in itertools.permutations(SHAPES, 2)
    ]


def counting() -> list[PromptRecord]:
    return [
        PromptRecord(
            "counting",
            f"a photo of {NUMBER_WORDS[n]} {PLURALS[s]}",
            (Clause(s, n),),
            (Clause(s, n + 1),),
        )
        for s in SHAPES
        for n in COUNTS
    ]


def colors() -> list[PromptRecord]:
    return [
        PromptRecord("colors", f"a photo of {article(c)} {c} {s}", (Clause(s, 1, color=c),))
        for s in SHAPES
        for c in COLORS
    ]


def position() -> list[PromptRecord]:
    # GenEval: "a photo of a dog right of a teddy bear" -> include [teddy bear, dog @ right of 0].
    return [
        PromptRecord(
            "position",
            f"a photo of {article(a)} {a} {rel} {article(b)} {b}",
            (Clause(b, 1), Clause(a, 1, position=(rel, 0))),
        )
        for a, b in itertools.permutations(SHAPES, 2)
        for rel in RELATION_WORDS
    ]


def color_attr() -> list[PromptRecord]:
    return [
        PromptRecord(
            "color_attr",
            f"a photo of {article(ca)} {ca} {a} and {article(cb)} {cb} {b}",
            (Clause(a, 1, color=ca), Clause(b, 1, color=cb)),
        )
        for a, b in itertools.permutations(SHAPES, 2)
        for ca, cb in itertools.permutations(COLORS, 2)
    ]


def all_records() -> list[PromptRecord]:
    """Every prompt of the shapes world, grouped by tag in GenEval's tag order."""
    return single_object() + two_object() + counting() + colors() + position() + color_attr()


def split_records(
    records: list[PromptRecord], test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED
) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """Deal each tag's records into (train, test); at least two of each tag go to each side."""
    rng = np.random.default_rng(seed)
    train: list[PromptRecord] = []
    test: list[PromptRecord] = []
    tags = list(dict.fromkeys(r.tag for r in records))
    for tag in tags:
        group = [r for r in records if r.tag == tag]
        order = rng.permutation(len(group))
        n_test = min(max(2, round(len(group) * test_fraction)), len(group) - 2)
        test += [group[i] for i in sorted(order[:n_test])]
        train += [group[i] for i in sorted(order[n_test:])]
    return train, test


def write_prompt_sets(out_dir: Path) -> tuple[Path, Path]:
    """Write toy-train.jsonl and toy-test.jsonl (GenEval metadata format) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test = split_records(all_records())
    paths = out_dir / "toy-train.jsonl", out_dir / "toy-test.jsonl"
    write_metadata(train, paths[0])
    write_metadata(test, paths[1])
    return paths
