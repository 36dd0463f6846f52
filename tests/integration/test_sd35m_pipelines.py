"""The SD3.5-Medium recipes: each validates as shipped and trains one epoch end to end with the model
swapped for a tiny random SD3.5-M-architecture folder and the rewards for cheap stand-ins; nothing
else of the recipe changes (checked against the resolved pipeline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowrl.arch import tiny_sd35m_folder
from flowrl.cli import main
from flowrl.config import diff_configs, load_pipeline

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RECIPES = ["sd35m-geneval", "sd35m-ocr", "sd35m-pickscore", "sd35m-multi-reward", "sd35m-flowgrpo-geneval"]

#: Shrinks the batch and the step counts; the estimator, objective, advantage, optimizer and LoRA stay.
TINY = [
    "prompts.train=toy-train", "prompts.test=toy-test", "prompts.group_size=4", "train.batch_size=8",
    "train.micro_batch=4", "sampler.steps=3", "eval.sampler.steps=2", "eval.limit=2", "eval.images_per_prompt=1",
    "train.epochs=1", "model.dtype=float32", "model.max_sequence_length=16",
]
SHAPES = "{kind: geneval, backend: shapes, signal: dense}"
#: Stand-ins for rewards whose published models are not on this machine (same labels and weights).
REWARDS = {
    "sd35m-geneval": [f"rewards=[{SHAPES}]"],
    "sd35m-flowgrpo-geneval": [f"rewards=[{SHAPES}]"],
    "sd35m-ocr": ["rewards=[{kind: 'user_stages:Brightness', name: ocr}]"],
    "sd35m-pickscore": ["rewards=[{kind: 'user_stages:Brightness', name: pickscore}]"],
    "sd35m-multi-reward": [
        "rewards=[{kind: geneval, backend: shapes, signal: dense, weight: 1.0},"
        " {kind: 'user_stages:Brightness', name: pickscore, weight: 0.5},"
        " {kind: 'user_stages:Brightness', name: clipscore, weight: 0.5}]"
    ],
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_sd35m_folder(tmp_path_factory.mktemp("tiny-sd35m") / "model")


def _overridden_keys(overrides: list[str]) -> tuple[str, ...]:
    return tuple(o.partition("=")[0] for o in overrides)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates_as_shipped(name: str):
    res = CliRunner().invoke(main, ["validate", str(REPO / "pipelines" / f"{name}.yaml")])
    assert res.exit_code == 0, res.output
    p = load_pipeline(REPO / "pipelines" / f"{name}.yaml")
    c = p.config
    assert c.model.path == "stabilityai/stable-diffusion-3.5-medium"
    assert (c.model.lora.rank, c.model.lora.alpha, c.model.lora.init) == (32, 64.0, "gaussian")
    assert len(c.model.lora.targets) == 8
    assert (c.train.batch_size, c.prompts.group_size, c.train.epochs) == (1152, 24, 360)
    assert (c.optimizer.lr, c.train.ema_decay) == (3e-4, 0.9)
    assert (p.eval_sampler.kind, p.eval_sampler.steps, c.eval.weights) == ("euler", 40, "ema")
    text = (REPO / "pipelines" / f"{name}.yaml").read_text()
    assert "--num-processes" in text.split("\nname:")[0], "the header must give the launch command"
    if name == "sd35m-flowgrpo-geneval":
        assert (p.sampler.kind, p.sampler.guidance, p.sampler.noise_level) == ("flow-sde", 4.5, 0.7)
        assert (p.estimator.kind, p.objective.kind, p.objective.clip_range, p.objective.kl.beta) == ("trajectory", "grpo", 1e-4, 0.04)
        assert c.train.steps_per_epoch == 2
        # FlowGRPO's own: its step KL form, global-std advantages, max_grad_norm 1.0
        assert (p.objective.kl.kind, p.advantage.std, c.optimizer.grad_clip) == ("flowgrpo-step", "global", 1.0)
    else:
        assert c.optimizer.grad_clip == 5.0  # the paper's MAX_GRAD_NORM
        assert (p.sampler.kind, p.sampler.steps, p.sampler.guidance) == ("dpm2", 10, 1.0)
        assert (p.estimator.kind, p.estimator.weighting, p.estimator.timestep_fraction) == ("elbo", "adaptive", 0.99)
        assert (p.objective.kind, p.objective.kl.kind, p.objective.kl.beta) == ("pepg", "girsanov", 1e-4)
        assert (p.advantage.kind, p.advantage.beta, p.advantage.alpha) == ("exact", 1e-4, 1e-3)
        assert c.train.steps_per_epoch == 1


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_one_epoch_on_a_tiny_sd35m(tmp_path: Path, tiny_model: Path, name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    path = REPO / "pipelines" / f"{name}.yaml"
    overrides = [f"model.path={tiny_model}", *TINY, *REWARDS[name]]
    base, small = load_pipeline(path), load_pipeline(path, overrides)
    changed = {c.key for c in diff_configs(base.to_dict(), small.to_dict())}
    keys = _overridden_keys(overrides)
    stray = sorted(k for k in changed if not any(k == o or k.startswith(o + ".") for o in keys))
    assert not stray, f"settings changed beyond the overrides: {stray}"

    run = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", str(path), *overrides, "--out", str(run)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [-1, 0]
    trained = rows[-1]
    for key in ("reward/mean", "loss", "train/grad_norm", "time/epoch_s"):
        assert trained[key] == trained[key], key  # present, not NaN
    for reward in small.rewards:
        assert f"reward/{reward.label}" in trained and f"eval/{reward.label}" in trained
    assert (run / "checkpoints" / "epoch-0" / "policy.safetensors").is_file()


def test_bf16_with_gradient_checkpointing_trains_float32_adapters(tmp_path: Path, tiny_model: Path, monkeypatch):
    """The recipe's own precision (bfloat16 base, float32 LoRA) with gradient checkpointing."""
    from safetensors.torch import load_file

    monkeypatch.syspath_prepend(str(HERE))
    run = tmp_path / "bf16"
    overrides = [f"model.path={tiny_model}", *TINY, *REWARDS["sd35m-ocr"], "model.dtype=bfloat16",
                 "model.gradient_checkpointing=true", "train.epochs=2", "eval.every=0"]
    res = CliRunner().invoke(main, ["train", str(REPO / "pipelines" / "sd35m-geneval.yaml"), *overrides, "--out", str(run)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    policy = load_file(run / "checkpoints" / "epoch-1" / "policy.safetensors")
    assert {v.dtype for v in policy.values()} == {__import__("torch").float32}
    assert any(float(v.abs().sum()) > 0 for k, v in policy.items() if "lora_B" in k), "bf16 training must move the adapter"
