"""Run-comparison plots (flowrl.plots.plot_runs) and benchmarks/plot_runs.py's argument parsing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from flowrl.plots import plot_runs

REPO = Path(__file__).resolve().parents[2]


def _write_metrics(path: Path, with_kl: bool) -> Path:
    rows = [{"epoch": -1, "eval/geneval": 0.6}]
    for e in range(6):
        row = {"epoch": e, "reward/mean": 0.6 + 0.01 * e}
        if with_kl:
            row["train/kl"] = 0.02 * e
        if e % 3 == 2:
            row["eval/geneval"] = 0.65 + 0.01 * e
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _script():
    spec = importlib.util.spec_from_file_location("plot_runs_script", REPO / "benchmarks" / "plot_runs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plot_runs_writes_a_png_for_runs_with_and_without_kl(tmp_path: Path):
    a = _write_metrics(tmp_path / "a" / "metrics.jsonl", with_kl=True)
    b = _write_metrics(tmp_path / "b" / "metrics.jsonl", with_kl=False)
    out = plot_runs([("with kl", a), ("no kl", b)], tmp_path / "figs" / "cmp.png", title="t")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_script_accepts_run_folders_and_refuses_bad_arguments(tmp_path: Path, capsys):
    mod = _script()
    _write_metrics(tmp_path / "run" / "metrics.jsonl", with_kl=True)
    assert mod.parse_run(f"beta=1e-2={tmp_path / 'run'}") == ("beta=1e-2", tmp_path / "run" / "metrics.jsonl")
    with pytest.raises(SystemExit, match="expected LABEL=RUN_FOLDER"):
        mod.parse_run(str(tmp_path / "run"))
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        mod.parse_run(f"x={tmp_path / 'missing'}")
    assert mod.main([f"a={tmp_path / 'run'}", "--out", str(tmp_path / "o.png")]) == 0
    assert (tmp_path / "o.png").is_file() and "wrote" in capsys.readouterr().out
