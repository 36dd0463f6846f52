"""Fixtures shared by the reward tests."""

from __future__ import annotations

import pytest

from flowrl.rewards.models import clear_shared


@pytest.fixture
def fresh_models(monkeypatch):
    """No model outlives a test; nothing may reach the network. Modules that load models use it
    for every test with ``pytestmark = pytest.mark.usefixtures("fresh_models")``."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clear_shared()
    yield
    clear_shared()
