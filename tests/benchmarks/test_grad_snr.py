"""benchmarks/grad_snr.py: the energy split on constructed gradients with known shares, and its
override parsing. (The measurement itself needs real rollouts; docs/toy-rl.md has its results.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def snr():
    spec = importlib.util.spec_from_file_location("grad_snr", REPO / "benchmarks" / "grad_snr.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["grad_snr"] = module
    spec.loader.exec_module(module)
    return module


def test_split_recovers_known_shares_of_orthogonal_parts(snr):
    # g[r][d] = s + n_r + e_rd with mutually orthogonal parts of energies 1, 2 and 7 (shares .1/.2/.7).
    dim, rollouts, draws = 64, 3, 2
    basis = torch.eye(dim)
    s = basis[0] * 1.0
    n = [basis[1 + r] * 2**0.5 for r in range(rollouts)]
    e = [[basis[10 + 4 * r + d] * 7**0.5 for d in range(draws)] for r in range(rollouts)]
    grads = [[s + n[r] + e[r][d] for d in range(draws)] for r in range(rollouts)]
    signal, rollout, estimator = snr.split_energy(grads)
    assert signal == pytest.approx(0.1)
    assert rollout == pytest.approx(0.2)
    assert estimator == pytest.approx(0.7)


def test_snr_per_image_and_per_second(snr):
    split = snr.Split(signal=0.2, rollout=0.3, estimator=0.5, n_images=100, seconds=3.0, rollout_seconds=1.0)
    assert split.snr_per_image == pytest.approx(0.25 / 100)
    assert split.snr_per_second == pytest.approx(0.0025 / 0.04)


def test_overrides_split_on_top_level_commas_only(snr):
    assert snr.split_overrides("a.b=1,c.d=[0.5,1],e={x: 1, y: 2}") == ["a.b=1", "c.d=[0.5,1]", "e={x: 1, y: 2}"]
    assert snr.split_overrides("") == []
