"""Data-parallel invariance on CPU (gloo): 2 processes sharing a global batch of 2B images train the
same adapters as 1 process with 2B images, and a run resumes on another number of processes. The
same for a full fine-tune, sharded with FSDP2 on 2 processes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
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
#: train.old.start=2: the old policy equals the policy after each of the 2 epochs (rho = 1, as the
#: decay of epoch 0 used to be), so the logged PEPG loss -rho (A - log rho) l does not hold the tiny
#: l_theta - l_old, which the ranks' last-bit weight differences would move by ~1e-4 relative.
ARGS = [
    str(REPO / "pipelines" / "toy-geneval.yaml"), "model.path=" + str(REPO / "assets" / "toy-sd3"),
    "rewards=[{kind: 'user_stages:Brightness'}]", "train.batch_size=16", "prompts.group_size=4", "train.micro_batch=4",
    "sampler.steps=3", "estimator.timestep_fraction=0.5", "eval.every=0", "eval.sampler.steps=2", "eval.limit=1",
    "eval.images_per_prompt=1", "logging.sample_grid=false", "optimizer.schedule=constant", "optimizer.eps=1e-3",
    "checkpoint.every=1", "train.old.start=2",
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


@pytest.mark.slow
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


# ------------------------------------------------------------------ full fine-tuning with FSDP

#: A full fine-tune (every transformer weight; sharded with FSDP2 on 2 processes) of the same runs.
FULL = [*ARGS, "model.finetune=full"]
BASE_WEIGHTS = REPO / "assets" / "toy-sd3" / "transformer" / "diffusion_pytorch_model.safetensors"


def update_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    """|a - b| / |a - base|: the difference of two trained copies on the scale of what training changed
    (the weights themselves are 1e3-1e4 times larger than two epochs' change)."""
    return relative_difference({k: a[k] - base[k] for k in a}, {k: b[k] - base[k] for k in a})


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> tuple[Path, Path]:
    """(1 process, 2 processes with FSDP): 2 epochs of a full fine-tune of 16 images per epoch each."""
    root = tmp_path_factory.mktemp("fsdp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.syspath_prepend(str(HERE))
        train(*FULL, "train.epochs=2", "--out", str(root / "one"))
        train(*FULL, "train.epochs=2", "--out", str(root / "two"), "--launcher", "torchrun", "--num-processes", "2")
    return root / "one", root / "two"


@pytest.mark.slow
def test_fsdp_two_processes_train_what_one_process_trains(fsdp_runs):
    one, two = fsdp_runs
    base = load_file(BASE_WEIGHTS)
    a, b = adapters(one, 1), adapters(two, 1)
    for name in ("policy", "old", "ema"):
        assert a[name].keys() == b[name].keys() == base.keys(), name  # whole transformers, gathered in full
        assert relative_difference(a[name], b[name]) < 1e-5, name  # measured: about 5e-10
        assert update_difference(a[name], b[name], base) < 2e-3, name  # measured: 5e-5 (policy) to 2e-4 (ema)
    moved = [k for k in base if not torch.equal(a["policy"][k], base[k])]
    assert len(moved) == len(base) - 1, "every weight trains (all but the pos_embed buffer)"
    for x, y in zip(rows(one), rows(two), strict=True):
        for key in ("reward/mean", "loss", "train/grad_norm", "advantage/abs_mean"):
            assert abs(x[key] - y[key]) <= 1e-4 * abs(x[key]) + 1e-9, (key, x[key], y[key])
    state = json.loads((two / "checkpoints" / "epoch-1" / "trainer_state.json").read_text())
    assert state["finetune"] == "full"


def test_fsdp_checkpoint_resumes_on_one_process(fsdp_runs, tmp_path: Path, monkeypatch):
    """The 2-process run stopped after epoch 0 and continued on 1 process computes what it computed
    on 2 (and what 1 process computed all along): checkpoints hold full state dicts."""
    import shutil

    one, two = fsdp_runs
    monkeypatch.syspath_prepend(str(HERE))
    mixed = tmp_path / "mixed"
    shutil.copytree(two, mixed)
    shutil.rmtree(mixed / "checkpoints" / "epoch-1")
    (mixed / "checkpoints" / "latest").write_text("epoch-0\n")
    out = train(*FULL, "train.epochs=2", "--out", str(mixed), "--resume")
    assert "resumed from epoch 0" in out
    base = load_file(BASE_WEIGHTS)
    c = adapters(mixed, 1)
    for reference in (adapters(two, 1), adapters(one, 1)):
        for name in ("policy", "old", "ema"):
            assert relative_difference(reference[name], c[name]) < 1e-5, name
            assert update_difference(reference[name], c[name], base) < 2e-3, name
    assert [r["epoch"] for r in rows(mixed)] == [0, 1]


@pytest.mark.slow
def test_fsdp_ranks_skip_a_step_together_when_one_rank_is_not_finite(tmp_path: Path):
    """Rank 1 alone gets a NaN loss in step 0. Under FSDP a rank that left the step alone would leave
    the other waiting in the backward pass's collectives: both must skip step 0, then train step 1.
    The KL term (beta > 0) makes the runs compute with the sharded reference copy too."""
    import contextlib
    import subprocess

    import psutil  # accelerate's dependency

    from flowrl.cli.pipeline import launch_command

    run = tmp_path / "nan"
    args = [*FULL, "objective.kind=user_stages:NanOnRankOne", "objective.kl.beta=0.1", "train.steps_per_epoch=2",
            "train.epochs=1", "--out", str(run)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "output.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(launch_command("torchrun", 2, args), env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=150)
        except subprocess.TimeoutExpired:
            # torchrun starts each worker in a session of its own: kill the whole tree by pid.
            for child in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            proc.wait()
            raise AssertionError("the ranks did not agree on skipping the step: the run hung") from None
    output = log.read_text()
    assert proc.returncode == 0, output
    assert "epoch 0 step 0: skipped the update: a non-finite loss on another process in micro-batch 0" in output, output
    (row,) = rows(run)
    assert row["train/skipped_steps"] == 1 and row["train/grad_norm"] > 0
    trained, base = adapters(run, 0)["policy"], load_file(BASE_WEIGHTS)
    assert any(not torch.equal(trained[k], base[k]) for k in base), "step 1 must update the weights"
