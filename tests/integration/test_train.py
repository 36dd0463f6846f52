"""The trainer end to end on the embedded toy model: every toy pipeline runs, resume is exact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from flowrl.cli import main

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

#: Shrinks any toy pipeline to seconds: 8 images per epoch, 3 sampler steps, 2 test prompts.
TINY = [
    "train.batch_size=8", "prompts.group_size=4", "train.micro_batch=4", "sampler.steps=3",
    "eval.sampler.steps=3", "eval.limit=2", "eval.images_per_prompt=1", "eval.every=2",
    "checkpoint.every=1", "estimator.timestep_fraction=0.5",
]


def train(*args: str):
    res = CliRunner().invoke(main, ["train", *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["toy-geneval", "toy-flowgrpo", "toy-nft", "toy-awm"])
def test_each_toy_pipeline_trains(tmp_path: Path, name: str):
    run = tmp_path / name
    extra = ["train.steps_per_epoch=1"] if name == "toy-flowgrpo" else []
    res = train(str(REPO / "pipelines" / f"{name}.yaml"), *TINY, *extra, "train.epochs=2", "--out", str(run))
    rows = metrics(run)
    assert f"eval/geneval: {rows[0]['eval/geneval']:.3f} (epoch -1) -> {rows[-1]['eval/geneval']:.3f} (epoch 1)" in res.output
    assert [r["epoch"] for r in rows] == [-1, 0, 1]
    for r in rows[1:]:
        for key in ("reward/mean", "reward/geneval", "loss", "time/epoch_s", "train/grad_norm"):
            assert key in r and r[key] == r[key], key  # present and not NaN
    assert "eval/geneval" in rows[0] and "eval/geneval" in rows[-1]
    assert 0.0 <= rows[-1]["eval/geneval"] <= 1.0
    assert (run / "samples" / "epoch-1.png").is_file() and (run / "curves.png").is_file()
    assert (run / "checkpoints" / "epoch-1" / "policy.safetensors").is_file()
    resolved = (run / "pipeline.yaml").read_text()
    assert "batch_size: 8" in resolved and "timestep_fraction: 0.5" in resolved


@pytest.mark.slow
def test_resume_gives_identical_weights(tmp_path: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    base = [str(REPO / "pipelines" / "toy-geneval.yaml"), *TINY, "rewards=[{kind: 'user_stages:Brightness'}]", "eval.every=0",
            # The split run lengthens its schedule on resume (2 -> 4 epochs); a cosine lr depends on
            # the length, so only a constant lr makes the two runs comparable.
            "optimizer.schedule=constant"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(*base, "train.epochs=4", "--out", str(straight))
    train(*base, "train.epochs=2", "--out", str(split))
    train(*base, "train.epochs=4", "--out", str(split), "--resume")
    a, b = straight / "checkpoints" / "epoch-3", split / "checkpoints" / "epoch-3"
    for adapter in ("policy", "old", "ema"):
        wa, wb = load_file(a / f"{adapter}.safetensors"), load_file(b / f"{adapter}.safetensors")
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), adapter
    moved = load_file(a / "policy.safetensors")
    assert any(v.abs().sum() > 0 for k, v in moved.items() if "lora_B" in k), "training must move the adapter"
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("time/", "eval/"))} for r in rows]  # noqa: E731
    assert strip(metrics(straight)) == strip(metrics(split))
    assert [r["epoch"] for r in metrics(split)] == [0, 1, 2, 3]


def test_bf16_rollouts_keep_the_ratio_exact_and_lr_follows_the_schedule(tmp_path: Path):
    run = tmp_path / "bf16"
    train(
        str(REPO / "pipelines" / "toy-geneval.yaml"), *TINY, "train.rollout_precision=bfloat16", "eval.every=0",
        "estimator.noise=per-group", "optimizer.schedule=cosine", "optimizer.lr=0.01", "optimizer.min_lr_ratio=0.5",
        "train.epochs=3", "--out", str(run),
    )
    rows = metrics(run)
    assert rows[0]["train/ratio_mean"] == 1.0 and rows[0]["train/ratio_min"] == 1.0  # old == policy at epoch 0
    assert [round(r["train/lr"], 6) for r in rows if "train/lr" in r] == [0.01, 0.0075, 0.005]


def test_old_policy_decay_counts_optimizer_steps(tmp_path: Path):
    """Two optimizer steps per epoch make the decay grow twice as fast as one (the paper's
    return_decay(global_step)); `start` holds it at 0 for its first steps."""
    run = tmp_path / "decay"
    train(
        str(REPO / "pipelines" / "toy-geneval.yaml"), *TINY, "eval.every=0", "train.steps_per_epoch=2",
        "train.old.start=3", "train.epochs=3", "--out", str(run),
    )
    rows = metrics(run)
    assert [r["train/global_step"] for r in rows] == [2, 4, 6]
    assert [round(r["train/old_decay"], 12) for r in rows] == [0.0, 0.001, 0.003]


@pytest.mark.parametrize("choice", ["float32", "bfloat16"])
def test_auto_rollout_precision_is_resolved_logged_and_recorded(tmp_path: Path, monkeypatch, choice):
    """`auto` becomes the machine's choice (faked here both ways) in the log and in pipeline.yaml, and a
    resume on a machine that chooses otherwise is allowed (a speed setting, like train.threads)."""
    import yaml

    from flowrl import precision

    monkeypatch.setattr(precision, "decide", lambda facts: precision.Decision(choice, "faked for the test"))
    run = tmp_path / "auto"
    args = [str(REPO / "pipelines" / "toy-geneval.yaml"), *TINY, "train.rollout_precision=auto", "eval.every=0", "--out", str(run)]
    res = train(*args, "train.epochs=1")
    assert f"rollout precision: {choice} (faked for the test)" in res.output
    assert yaml.safe_load((run / "pipeline.yaml").read_text())["train"]["rollout_precision"] == choice
    assert "torch.compile: off (" in res.output  # the pipeline's auto: 1 epoch, or no AVX2 CPU, runs eager
    assert yaml.safe_load((run / "pipeline.yaml").read_text())["train"]["compile"] is False
    other = "float32" if choice == "bfloat16" else "bfloat16"
    monkeypatch.setattr(precision, "decide", lambda facts: precision.Decision(other, "another machine"))
    train(*args, "train.epochs=2", "--resume")
    assert [r["epoch"] for r in metrics(run)] == [0, 1]


@pytest.mark.slow
def test_a_compiled_run_trains_and_records_it(tmp_path: Path, monkeypatch):
    """train.compile=true: the trainer compiles the policy once, before training, and the run
    records it. dynamo's eager backend traces and guards as inductor does, in seconds."""
    import yaml

    from flowrl.policy import FlowPolicy

    calls, compile_ = [], FlowPolicy.compile
    monkeypatch.setattr(FlowPolicy, "compile", lambda self, backend="inductor": calls.append(backend) or compile_(self, "eager"))
    run = tmp_path / "compiled"
    train(str(REPO / "pipelines" / "toy-geneval.yaml"), *TINY, "train.compile=true", "train.epochs=1", "eval.every=0", "--out", str(run))
    assert calls == ["inductor"]
    assert yaml.safe_load((run / "pipeline.yaml").read_text())["train"]["compile"] is True
    assert [r["epoch"] for r in metrics(run)] == [0] and all(math.isfinite(r["loss"]) for r in metrics(run))


def test_refuses_to_overwrite_a_run(tmp_path: Path):
    run = tmp_path / "r"
    args = [str(REPO / "pipelines" / "toy-geneval.yaml"), *TINY, "train.epochs=1", "eval.every=0", "--out", str(run)]
    train(*args)
    res = CliRunner().invoke(main, ["train", *args])
    assert res.exit_code == 2 and "--resume" in res.output
    res = CliRunner().invoke(main, ["train", *args[:-2], "--out", str(tmp_path / "fresh"), "--resume"])
    assert res.exit_code == 2 and "no complete checkpoint" in res.output
