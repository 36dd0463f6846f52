"""A full fine-tune (model.finetune: full) in one process: its checkpoints resume exactly, `flowrl eval`
loads them, `flowrl export-lora` refuses them, and a run cannot switch between LoRA and full.
The 2-process FSDP runs are in test_distributed.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

import flowrl.training.rollout
from flowrl.cli import main
from test_train import TINY, metrics, train

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BASE_WEIGHTS = REPO / "assets" / "toy-sd3" / "transformer" / "diffusion_pytorch_model.safetensors"
FULL = [str(REPO / "pipelines" / "toy-geneval.yaml"), *TINY, "rewards=[{kind: 'user_stages:Brightness'}]", "eval.every=0",
        "logging.sample_grid=false", "optimizer.schedule=constant", "model.finetune=full"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """(straight, split): 2 epochs in one go, and 1 epoch resumed for the second."""
    root = tmp_path_factory.mktemp("full")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(HERE))
        train(*FULL, "train.epochs=2", "--out", str(root / "straight"))
        train(*FULL, "train.epochs=1", "--out", str(root / "split"))
        train(*FULL, "train.epochs=2", "--out", str(root / "split"), "--resume")
    return root / "straight", root / "split"


def test_full_checkpoints_resume_to_identical_weights(runs):
    straight, split = runs
    a, b = straight / "checkpoints" / "epoch-1", split / "checkpoints" / "epoch-1"
    base = load_file(BASE_WEIGHTS)
    for name in ("policy", "old", "ema"):
        wa, wb = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
        assert wa.keys() == wb.keys() == base.keys(), name  # whole transformer state dicts
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
        with safe_open(str(a / f"{name}.safetensors"), "pt") as f:
            assert f.metadata()["finetune"] == "full"
    policy = load_file(a / "policy.safetensors")
    assert all(not torch.equal(policy[k], base[k]) for k in base if k != "pos_embed.pos_embed"), "every weight trains"
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("time/", "eval/"))} for r in rows]  # noqa: E731
    assert strip(metrics(straight)) == strip(metrics(split))
    assert json.loads((a / "trainer_state.json").read_text())["finetune"] == "full"
    optimizer = torch.load(a / "optimizer.pt")
    assert set(optimizer["state"]) == set(base) - {"pos_embed.pos_embed"}, "keyed by parameter name, not by position"


def test_flowrl_eval_loads_the_full_checkpoint(runs, tmp_path: Path, monkeypatch):
    from diffusers import SD3Transformer2DModel

    straight, _ = runs
    monkeypatch.syspath_prepend(str(HERE))
    used = []
    real = flowrl.training.rollout.roll_out

    def spy(policy, sampler, batch, cond, seeds, which, chunk):
        used.append((policy, which))
        return real(policy, sampler, batch, cond, seeds, which, chunk)

    monkeypatch.setattr(flowrl.training.rollout, "roll_out", spy)
    res = CliRunner().invoke(main, ["eval", str(straight), "--reward", "user_stages:Brightness", "--limit", "1", "-n", "1",
                                    "--steps", "2", "--out", str(tmp_path / "eval")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    (policy, which), *_ = used
    assert which == "ema" and policy.finetune == "full" and list(policy.full.modules) == ["ema"], "one copy for evaluation"
    ema = load_file(straight / "checkpoints" / "epoch-1" / "ema.safetensors")
    loaded = policy.adapter_state("ema")
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)
    # What the export refusal tells users: the file is a diffusers transformer state dict as it is.
    transformer = SD3Transformer2DModel.from_pretrained(REPO / "assets" / "toy-sd3" / "transformer")
    transformer.load_state_dict(ema, strict=True)


def test_export_lora_refuses_a_full_checkpoint(runs, tmp_path: Path):
    straight, _ = runs
    res = CliRunner().invoke(main, ["export-lora", str(straight), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()
    for needle in ("full fine-tune (model.finetune: full), not a LoRA", "SD3Transformer2DModel.load_state_dict", "flowrl eval"):
        assert needle in " ".join(res.output.split()), res.output


def test_a_run_cannot_switch_between_lora_and_full(runs, tmp_path: Path):
    straight, _ = runs
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    for extra in ([], ["--allow-changes"]):
        res = CliRunner().invoke(main, ["train", *FULL, "model.finetune=lora", "train.epochs=3", "--out", str(run), "--resume", *extra])
        out = " ".join(res.output.split())
        assert res.exit_code == 2 and 'model.finetune: "full" -> "lora"' in out and "not even with --allow-changes" in out, res.output
    # Without the run's pipeline.yaml (--allow-changes accepts that), the checkpoint's own record refuses it.
    (run / "pipeline.yaml").unlink()
    res = CliRunner().invoke(main, ["train", *FULL, "model.finetune=lora", "train.epochs=3", "--out", str(run), "--resume", "--allow-changes"])
    assert res.exit_code == 2 and "written by a model.finetune: full run" in " ".join(res.output.split()), res.output
