"""Shared fixtures: where the team's shared data lives (never copied into the repo)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared folder beside the checkout (CI lays it there too)."""
    if not SHARED.is_dir():
        pytest.fail(f"expected the shared data folder at {SHARED}; clone flowrl beside ../shared")
    return SHARED


@pytest.fixture(scope="session")
def geneval_metadata_path(shared_dir: Path) -> Path:
    return shared_dir / "data" / "geneval" / "evaluation_metadata.jsonl"
