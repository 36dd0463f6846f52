"""Data-parallel invariance on CPU (gloo): 2 processes sharing a global batch of 2B images train the
same adapters as 1 process with 2B images, and a run resumes on another number of processes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from flowrl.cli import main

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

#: 16 images per epoch (4 prompts x 4), micro-batches of 4: each of 2 processes takes 8.
#: optimizer.eps=1e-3: Adam divides by sqrt(v) + eps, which turns the last-bit differences of a
#: different summation order (ranks sum their halves, then the halves are added) into large relative
#: differences for gradient entries near zero; a larger eps keeps the comparison about the gradient.
ARGS = [
    str(REPO / "pipelines" / "toy-geneval.yaml"), "model.path=" + str(REPO / "assets" / "toy-sd3"),
    "rewards=[{kind: 'user_stages:Brightness'}]", "train.batch_size=16", "prompts.group_size=4", "train.micro_batch=4",
    "sampler.steps=3", "estimator.timestep_fraction=0.5", "eval.every=0", "eval.sampler.steps=2", "eval.limit=1",
    "eval.images_per_prompt=1", "logging.sample_grid=false", "optimizer.schedule=constant", "optimizer.eps=1e-3",
    "checkpoint.every=1",
]


def train(*args: str) -> str:
    res = CliRunner().invoke(main, ["train", *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def adapters(run: Path, epoch: int) -> dict[str, dict[str, torch.Tensor]]:
    return {a: load_file(run / "checkpoints" / f"epoch-{epoch}" / f"{a}.safetensors") for a in ("policy", "old", "ema")}


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], only: str = "") -> float:
    keys = [k for k in a if only in k]
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys) ** 0.5
    den = sum(float(a[k].double().pow(2).sum()) for k in keys) ** 0.5
    return num / den


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_what_one_process_trains(tmp_path: Path, monkeypatch, capfd):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.syspath_prepend(str(HERE))
    one, two, mixed = tmp_path / "one", tmp_path / "two", tmp_path / "mixed"
    train(*ARGS, "train.epochs=2", "--out", str(one))
    capfd.readouterr()
    train(*ARGS, "train.epochs=2", "--out", str(two), "--launcher", "torchrun", "--num-processes", "2")
    printed = "".join(capfd.readouterr())  # the launched processes write to the terminal, not to CliRunner
    assert printed.count("run folder:") == 1 and printed.count("epoch 1 ") == 1, "only rank 0 reports"

    a, b = adapters(one, 1), adapters(two, 1)
    for name in ("policy", "old", "ema"):
        assert relative_difference(a[name], b[name]) < 1e-5, name
        # lora_B starts at zero: it is the learned update itself, compared on its own scale
        assert relative_difference(a[name], b[name], only="lora_B") < 1e-4, name
    assert float(sum(v.abs().sum() for k, v in a["policy"].items() if "lora_B" in k)) > 0, "training must move the adapter"
    r1, r2 = rows(one), rows(two)
    assert [r["epoch"] for r in r2] == [0, 1]  # rank 0 alone writes metrics
    for x, y in zip(r1, r2, strict=True):
        for key in ("reward/mean", "loss", "train/grad_norm", "advantage/abs_mean"):
            assert abs(x[key] - y[key]) <= 1e-4 * abs(x[key]) + 1e-9, (key, x[key], y[key])

    # A run started on 2 processes continues on 1 (the checkpoint holds nothing per rank).
    train(*ARGS, "train.epochs=1", "--out", str(mixed), "--launcher", "accelerate", "--num-processes", "2")
    train(*ARGS, "train.epochs=2", "--out", str(mixed), "--resume")
    c = adapters(mixed, 1)
    for name in ("policy", "old", "ema"):
        assert relative_difference(a[name], c[name]) < 1e-5, name
    assert [r["epoch"] for r in rows(mixed)] == [0, 1]
