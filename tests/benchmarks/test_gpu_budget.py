"""benchmarks/gpu_budget.py: the --dry-run exercises every phase on a tiny SD3.5-M on the CPU, and
the epoch arithmetic is checked by hand."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_budget():
    spec = importlib.util.spec_from_file_location("gpu_budget", REPO / "benchmarks" / "gpu_budget.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_budget"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_epoch_estimate_scales_per_image_costs_to_1152_images(gpu_budget):
    phases = gpu_budget.Phases(images=4, encode_s=0.0, rollout_s=0.4, decode_s=0.04, reward_s=0.02, train_s=2.0, peak_gb=10.0)
    est = gpu_budget.epoch_estimate(phases, encode_48_s=3.0)
    assert est["rollout"] == pytest.approx(0.1 * 1152) and est["train"] == pytest.approx(0.5 * 1152)
    assert est["total"] == pytest.approx(3.0 + (0.1 + 0.01 + 0.005 + 0.5) * 1152)
    assert est["transformer"] == pytest.approx(0.6 * 1152)
    v = gpu_budget.verdict(est)
    assert v["vs_transformer_floor"] == pytest.approx(0.6 * 1152 / 585)


def test_write_results_replaces_only_the_marked_section(gpu_budget, tmp_path: Path):
    doc = tmp_path / "gpu-budget.md"
    doc.write_text(f"# GPU budget\nintro\n{gpu_budget.RESULTS_BEGIN}\nold\n{gpu_budget.RESULTS_END}\noutro\n")
    gpu_budget.write_results(doc, f"{gpu_budget.RESULTS_BEGIN}\nnew\n{gpu_budget.RESULTS_END}")
    text = doc.read_text()
    assert "new" in text and "old" not in text and text.startswith("# GPU budget\nintro") and text.endswith("outro\n")


def test_dry_run_exercises_every_phase(gpu_budget, tmp_path: Path):
    out, raw = tmp_path / "budget.md", tmp_path / "budget.json"
    result = gpu_budget.main(["--dry-run", "--out", str(out), "--json", str(raw)])
    assert [r["profile"]["name"] for r in result["results"]] == ["24 GB", "48 GB", "80 GB"]
    for r in result["results"]:
        for phase in ("encode_s", "rollout_s", "decode_s", "reward_s", "train_s"):
            assert r["phases"][phase] > 0, phase
        assert r["epoch"]["total"] > r["epoch"]["transformer"] > 0
    assert result["results"][0]["profile"]["gradient_checkpointing"] is True
    assert result["meta"]["dry_run"] and "not a measurement" in result["meta"]["device"]
    text = out.read_text()
    assert gpu_budget.RESULTS_BEGIN in text and "| 80 GB |" in text
    assert json.loads(raw.read_text())["meta"]["steps"] == 2
