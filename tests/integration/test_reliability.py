"""Reliability of `flowrl train`: kills and signals, checkpoints, resume checks, numeric guards,
reward failures and bad input. What each test guarantees is listed in docs/reliability.md.

The user rewards below are loaded by dotted path ("test_reliability:Flaky"), as a user's would be.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from flowrl.cli import main
from flowrl.rewards.base import RewardConfig, as_float_images
from flowrl.types import LossOutput, PromptBatch, RewardOutput

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TOY = str(REPO / "pipelines" / "toy-geneval.yaml")

#: Seconds `flowrl train` pauses in the middle of each checkpoint write in the kill tests (a test
#: hook), so that random kills land inside a write often and targeted ones can.
PAUSE = 0.3

#: The tiny run of test_train.py (seconds per run), with a fast user reward, a constant learning
#: rate (so that a schedule change cannot hide in a comparison) and one torch thread.
FAST = [
    "train.batch_size=8", "prompts.group_size=4", "train.micro_batch=4", "sampler.steps=3",
    "eval.sampler.steps=3", "eval.limit=2", "eval.images_per_prompt=1", "eval.every=0",
    "checkpoint.every=1", "estimator.timestep_fraction=0.5", "logging.sample_grid=false",
    "optimizer.schedule=constant", "train.threads=1", "rewards=[{kind: 'user_stages:Brightness'}]",
]
EPOCHS = 6


# ------------------------------------------------------------------------------ user rewards


class Flaky:
    """Mean brightness, but raises for any batch holding an overexposed image (mean > 0.9) and
    scores a black one (mean < 0.1) NaN: a reward that fails on some images only."""

    class Config(RewardConfig):
        kind: Literal["test_reliability:Flaky"] = "test_reliability:Flaky"

    def __init__(self, config: Config):
        self.config = config

    def __call__(self, images, prompts, metadata) -> RewardOutput:
        mean = as_float_images(images).mean(dim=(1, 2, 3))
        if bool((mean > 0.9).any()):
            raise ValueError("overexposed image")
        return RewardOutput(scores=torch.where(mean < 0.1, torch.nan, mean))


class WordFlaky:
    """Brightness, but fails on the images of prompts holding `word` (raises, or scores NaN)."""

    class Config(RewardConfig):
        kind: Literal["test_reliability:WordFlaky"] = "test_reliability:WordFlaky"
        word: str = "yellow"
        mode: Literal["raise", "nan"] = "raise"

    def __init__(self, config: Config):
        self.config = config

    def __call__(self, images, prompts, metadata) -> RewardOutput:
        bad = torch.tensor([self.config.word in p for p in prompts])
        if self.config.mode == "raise" and bool(bad.any()):
            raise RuntimeError(f"cannot score a {self.config.word} thing")
        scores = as_float_images(images).mean(dim=(1, 2, 3))
        return RewardOutput(scores=torch.where(bad, torch.nan, scores))


# ---------------------------------------------------------------------------------- helpers


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def train_ok(*args: str):
    res = CliRunner().invoke(main, ["train", *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def untimed(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows(run)]


def assert_same_adapters(a: Path, b: Path) -> None:
    for adapter in ("policy", "old", "ema"):
        wa, wb = load_file(a / f"{adapter}.safetensors"), load_file(b / f"{adapter}.safetensors")
        assert wa.keys() == wb.keys(), adapter
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{adapter} adapter differs between {a} and {b}"


def flowrl(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """`flowrl train ...` in a child process, its output into `log`."""
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1", **env}
    code = "import sys; from flowrl.cli import main; sys.exit(main())"
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-c", code, *args], stdout=f, stderr=subprocess.STDOUT, env=environ, cwd=log.parent)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    """Poll until `predicate()` holds (True) or the process ends (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return bool(predicate())
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s")


def started(log: Path, since: int) -> Callable:
    """True once the child logged the start of its training loop (after `since` bytes of log)."""
    return lambda: b"training epochs" in log.read_bytes()[since:]



@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, float]:
    """An uninterrupted 6-epoch run (in this process) and an estimate of the wall time of one of
    its epochs in a child process with the checkpoint pause."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(HERE))
        run = tmp_path_factory.mktemp("straight") / "run"
        train_ok(TOY, *FAST, f"train.epochs={EPOCHS}", "--out", str(run))
    per_epoch = sum(r["time/epoch_s"] for r in rows(run)) / EPOCHS + PAUSE + 0.1
    return run, per_epoch


@pytest.fixture(autouse=True)
def user_modules(monkeypatch):
    """The user stages of these tests (and user_stages.py) importable by dotted path."""
    monkeypatch.syspath_prepend(str(HERE))


# ------------------------------------------------------------------------- kills and signals


@pytest.mark.slow
def test_three_random_kills_resume_to_the_uninterrupted_run(straight, tmp_path: Path):
    from flowrl.train import latest_checkpoint

    reference, per_epoch = straight
    run, log = tmp_path / "run", tmp_path / "train.log"
    rng = random.Random(24)
    # Kill moments, measured from the start of each attempt's training loop: random ones of at most
    # two epochs (so three attempts cannot finish the six epochs), and one aimed inside a checkpoint write.
    moments = [rng.uniform(0, 2) * per_epoch, "in-checkpoint-write", rng.uniform(0, 2) * per_epoch]
    args = [TOY, *FAST, f"train.epochs={EPOCHS}", "--out", str(run)]
    env = {"FLOWRL_TEST_CHECKPOINT_PAUSE": str(PAUSE)}
    history = []  # (kill moment, latest checkpoint after it, checkpoints/ entries): for failure messages
    for moment in moments:
        resume = ["--resume"] if (run / "pipeline.yaml").exists() else []  # else killed before it was written
        since = log.stat().st_size if log.exists() else 0
        launched = time.time()
        proc = flowrl(["train", *args, *resume], log, **env)
        try:
            assert wait_for(started(log, since), proc), log.read_text()
            if moment == "in-checkpoint-write":  # a write of this attempt, not scratch of an earlier kill
                fresh = lambda: any(p.stat().st_mtime > launched for p in (run / "checkpoints").glob(".tmp-epoch-*"))  # noqa: E731
                assert wait_for(fresh, proc), log.read_text()
            else:
                time.sleep(moment)
            assert proc.poll() is None, f"the run ended before its kill at {moment}:\n{log.read_text()}"
            proc.kill()
        finally:
            proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
        found = latest_checkpoint(run)
        history.append((moment, None if found is None else found[0], sorted(p.name for p in (run / "checkpoints").glob("*"))))
        if moment == "in-checkpoint-write":  # the half-written checkpoint is invisible to a resume
            assert any((run / "checkpoints").glob(".tmp-epoch-*"))
    proc = flowrl(["train", *args, "--resume"], log, **env)
    assert proc.wait(120) == 0, log.read_text()
    print("kills:", history)
    assert untimed(run) == untimed(reference), history
    assert_same_adapters(run / "checkpoints" / f"epoch-{EPOCHS - 1}", reference / "checkpoints" / f"epoch-{EPOCHS - 1}")
    assert (run / "checkpoints" / "latest").read_text().strip() == f"epoch-{EPOCHS - 1}"
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert left == ["epoch-4", "epoch-5", "latest"], left  # the toy pipeline's keep_last 2, no scratch left


def test_sigterm_finishes_the_epoch_checkpoints_and_says_how_to_resume(straight, tmp_path: Path):
    from flowrl.train import Trainer

    reference, _ = straight
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    train_epoch = Trainer.train_epoch

    def signalled(self, epoch):
        if epoch == 2:  # SIGTERM to this very process, as `kill PID` would send it, mid-run
            assert signal.getsignal(signal.SIGTERM) not in (before, signal.SIG_DFL), "no handler: it would end pytest"
            os.kill(os.getpid(), signal.SIGTERM)
        return train_epoch(self, epoch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_epoch", signalled)
        res = invoke("train", TOY, *FAST, f"train.epochs={EPOCHS}", "--out", str(run))
    assert res.exit_code == 0, res.output
    assert "SIGTERM received: finishing the current epoch" in res.output
    assert f"stopped by SIGTERM after epoch 2 (checkpointed). Continue with:" in res.output
    assert f"--out {run} --resume" in res.output
    assert signal.getsignal(signal.SIGTERM) == before  # the trainer's handler is gone again
    assert [r["epoch"] for r in rows(run)] == [0, 1, 2]
    assert (run / "checkpoints" / "latest").read_text().strip() == "epoch-2"
    train_ok(TOY, *FAST, f"train.epochs={EPOCHS}", "--out", str(run), "--resume")
    assert untimed(run) == untimed(reference)
    assert_same_adapters(run / "checkpoints" / f"epoch-{EPOCHS - 1}", reference / "checkpoints" / f"epoch-{EPOCHS - 1}")


@pytest.mark.slow
def test_a_second_signal_aborts_at_once_leaving_the_last_checkpoint_intact(tmp_path: Path):
    run, log = tmp_path / "run", tmp_path / "train.log"
    proc = flowrl(["train", TOY, *FAST, "train.epochs=3", "--out", str(run)], log, FLOWRL_TEST_CHECKPOINT_PAUSE="30")
    try:
        assert wait_for(lambda: any((run / "checkpoints").glob(".tmp-epoch-0")), proc), log.read_text()
        proc.send_signal(signal.SIGINT)
        assert wait_for(lambda: b"SIGINT received" in log.read_bytes(), proc), log.read_text()
        proc.send_signal(signal.SIGINT)
        proc.wait(20)  # far less than the 30 s pause: the abort does not wait for the write
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGINT, log.read_text()
    assert "SIGINT again: aborting now" in log.read_text()
    assert not (run / "checkpoints" / "epoch-0").exists() and not (run / "checkpoints" / "latest").exists()
    res = invoke("train", TOY, *FAST, "train.epochs=1", "--out", str(run), "--resume")  # starts over
    assert res.exit_code == 0 and "starting the run again from epoch 0" in res.output, res.output
    assert [r["epoch"] for r in rows(run)] == [0]


# ------------------------------------------------------------------------------ checkpoints


def test_latest_pointer_is_preferred_and_scanning_is_the_fallback(tmp_path: Path):
    from flowrl.train import latest_checkpoint

    root = tmp_path / "checkpoints"
    for epoch in (1, 2, 4):
        (root / f"epoch-{epoch}").mkdir(parents=True)
        (root / f"epoch-{epoch}" / "trainer_state.json").write_text("{}")
    (root / "epoch-7").mkdir()  # no trainer state: incomplete, never chosen
    (root / ".tmp-epoch-9").mkdir()
    assert latest_checkpoint(tmp_path) == (4, root / "epoch-4")  # no pointer: newest complete folder
    (root / "latest").write_text("epoch-2\n")
    assert latest_checkpoint(tmp_path) == (2, root / "epoch-2")  # the pointer wins
    for bad in ("epoch-7", "epoch-3", "../epoch-2", "garbage"):  # incomplete, deleted, outside, nonsense
        (root / "latest").write_text(bad)
        assert latest_checkpoint(tmp_path) == (4, root / "epoch-4"), bad


def test_truncate_metrics_drops_later_epochs_and_a_torn_line(tmp_path: Path):
    from flowrl.train import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": -1}\n{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2, "lo')
    truncate_metrics(path, 0)
    assert path.read_text() == '{"epoch": -1}\n{"epoch": 0}\n'


# --------------------------------------------------------------------------- resume checks


@pytest.mark.parametrize(
    "change, needles",
    [
        (["sampler.steps=4"], ["sampler.steps: 3 -> 4", "--allow-changes", "--out NEW_FOLDER"]),
        (["rewards=[{kind: 'user_stages:Brightness', weight: 2}]"], ["rewards.0.weight: 1.0 -> 2.0"]),
        (["objective.kind=epg"], ["objective.kind: \"pepg\" -> \"epg\""]),
        (["model.lora.rank=4"], ["model.lora.rank: 32 -> 4", "not even with --allow-changes"]),
    ],
)
def test_resume_refuses_a_changed_pipeline_with_a_diff(straight, change, needles):
    reference, _ = straight
    before = (reference / "metrics.jsonl").read_text()
    res = invoke("train", TOY, *FAST, f"train.epochs={EPOCHS}", *change, "--out", str(reference), "--resume")
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    for needle in needles:
        assert needle in res.output, res.output
    assert (reference / "metrics.jsonl").read_text() == before  # refused before touching the run


def test_resume_allows_a_longer_schedule_and_other_eval_settings(straight, tmp_path: Path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight[0], run)
    res = train_ok(TOY, *FAST, f"train.epochs={EPOCHS + 1}", "eval.limit=1", "checkpoint.keep_last=1", "--out", str(run), "--resume")
    assert "train.epochs: 6 -> 7" in res.output and "eval.limit: 2 -> 1" in res.output
    assert [r["epoch"] for r in rows(run)] == list(range(EPOCHS + 1))
    assert (run / f"pipeline.before-epoch-{EPOCHS}.yaml").is_file() and "epochs: 7" in (run / "pipeline.yaml").read_text()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"epoch-{EPOCHS}", "latest"]
    res = train_ok(TOY, *FAST, f"train.epochs={EPOCHS + 1}", "eval.limit=1", "--out", str(run), "--resume")
    assert "nothing to do" in res.output
    res = train_ok(TOY, *FAST, f"train.epochs={EPOCHS + 2}", "eval.limit=1", "sampler.steps=4", "--out", str(run), "--resume", "--allow-changes")
    assert "sampler.steps: 3 -> 4" in res.output and rows(run)[-1]["epoch"] == EPOCHS + 1


# -------------------------------------------------------------------------- numeric guards


def nan_objective(monkeypatch, bad_epochs: set[int] | None, kind: Literal["loss", "grad"] = "loss") -> None:
    """Make the pepg objective non-finite in `bad_epochs` (None: always): a NaN loss, or a finite
    loss whose gradient is NaN (d sqrt(x)/dx at 0 is inf, times 0)."""
    from flowrl import registry
    from flowrl.train import Trainer

    cls = registry.lookup("objective", "pepg")
    call, epoch_of = cls.__call__, Trainer.train_epoch
    now = {"epoch": 0}

    def train_epoch(self, epoch):
        now["epoch"] = epoch
        return epoch_of(self, epoch)

    def objective(self, terms, advantages):
        out = call(self, terms, advantages)
        if bad_epochs is not None and now["epoch"] not in bad_epochs:
            return out
        if kind == "loss":
            return LossOutput(out.loss * torch.nan, out.metrics)
        return LossOutput(out.loss + 0 * torch.sqrt(terms.l_theta * 0).sum(), out.metrics)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    monkeypatch.setattr(cls, "__call__", objective)


def test_a_non_finite_loss_skips_the_update_and_is_counted(tmp_path: Path, monkeypatch):
    nan_objective(monkeypatch, {1})
    run = tmp_path / "run"
    res = train_ok(TOY, *FAST, "train.epochs=3", "checkpoint.keep_last=3", "--out", str(run))
    assert "epoch 1 step 0: skipped the update: non-finite loss (nan) in micro-batch 0 (images 0..3 of the step), term 0" in res.output
    got = [(r["train/skipped_steps"], r["train/skipped_total"]) for r in rows(run)]
    assert got == [(0, 0), (1, 1), (0, 1)]
    ckpt = run / "checkpoints"
    for adapter in ("policy", "ema"):  # the skipped step moved neither
        a, b = load_file(ckpt / "epoch-0" / f"{adapter}.safetensors"), load_file(ckpt / "epoch-1" / f"{adapter}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), adapter
    a, b = load_file(ckpt / "epoch-1" / "policy.safetensors"), load_file(ckpt / "epoch-2" / "policy.safetensors")
    assert not all(torch.equal(a[k], b[k]) for k in a), "training goes on after a skipped step"


@pytest.mark.parametrize("kind, needle", [("loss", "non-finite loss"), ("grad", "non-finite gradient from the backward pass of micro-batch 0")])
def test_max_bad_steps_in_a_row_stop_the_run_with_a_clear_error(tmp_path: Path, monkeypatch, kind, needle):
    nan_objective(monkeypatch, None, kind)
    res = invoke("train", TOY, *FAST, "train.steps_per_epoch=2", "train.max_bad_steps=2", "train.epochs=2", "--out", str(tmp_path / "r"))
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    for text in ("training stopped at epoch 0 step 1", "2 optimizer steps in a row", "train.max_bad_steps: 2", needle, "optimizer.lr"):
        assert text in res.output, res.output


# ------------------------------------------------------------------------- reward failures


def scorer(tmp_path: Path, policy: str):
    """A Trainer with just what `score` needs: the Flaky reward and `exact` advantages."""
    from flowrl import registry
    from flowrl.config import load_pipeline
    from flowrl.rewards.mix import RewardMix
    from flowrl.train import Trainer

    p = load_pipeline(TOY, ["rewards=[{kind: 'test_reliability:Flaky', name: flaky}]", f"train.on_reward_error={policy}"])
    logged: list[str] = []
    trainer = Trainer(p, tmp_path, log=logged.append)
    trainer.stages = SimpleNamespace(rewards=RewardMix(p.rewards), advantage=registry.lookup("advantage", p.advantage.kind)(p.advantage))
    return trainer, logged


def rollout_of(brightness: list[float]) -> SimpleNamespace:
    """Images [B, 3, 4, 4] of the given means, two per prompt group."""
    images = torch.tensor(brightness).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()
    groups = torch.arange(len(brightness)) // 2
    return SimpleNamespace(images=images, batch=PromptBatch([f"p{g}" for g in groups.tolist()], groups, ()))


def test_drop_group_zeroes_the_groups_of_failed_images_and_counts_them(tmp_path: Path, monkeypatch):
    trainer, logged = scorer(tmp_path, "drop-group")
    # image 2 makes the batch call raise (and raises alone); image 5 scores NaN: groups 1 and 2 go.
    adv, metrics, parts = trainer.score(rollout_of([0.5, 0.6, 0.95, 0.4, 0.3, 0.05, 0.7, 0.2]), epoch=3)
    k = 1e-4 / 1e-3  # the toy pipeline's exact advantage: (beta / alpha) (r - group mean)
    expected = torch.tensor([-0.05, 0.05, 0, 0, 0, 0, 0.25, -0.25]) * k
    assert torch.allclose(adv, expected, atol=1e-6), adv
    assert metrics["reward/flaky/failures"] == 2 and metrics["reward/dropped_groups"] == 2
    assert metrics["reward/flaky"] == pytest.approx(0.5) and metrics["reward/mean"] == pytest.approx(0.5)  # kept images only
    assert parts["flaky"].scores.shape == (4,)
    assert any("reward 'flaky' failed on 2 of 8 images (ValueError: overexposed image (at test_reliability.py" in m for m in logged), logged
    assert any("dropped 2 of 4 prompt groups" in m for m in logged), logged


@pytest.mark.parametrize(
    "policy, brightness, needle",
    [
        ("fail", [0.5, 0.6, 0.95, 0.4], "reward 'flaky' raised ValueError: overexposed image"),
        ("fail", [0.5, 0.6, 0.05, 0.4], "reward 'flaky' returned 1 non-finite score(s) (NaN or inf) out of 4 (first: image 2"),
        ("drop-group", [0.95, 0.6, 0.05, 0.4], "failed on images of every one of the 2 prompt groups"),
    ],
)
def test_reward_failures_that_stop_name_the_reward_and_the_fix(tmp_path: Path, monkeypatch, policy, brightness, needle):
    from flowrl.errors import RewardError

    trainer, _ = scorer(tmp_path, policy)
    with pytest.raises(RewardError) as info:
        trainer.score(rollout_of(brightness))
    assert needle in str(info.value)
    assert "drop-group" in str(info.value) or "fix the reward" in str(info.value)


@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_reward_failures_in_a_run(tmp_path: Path, monkeypatch, mode):
    # The prompts of epochs 0-2 (seed 0, 4 prompts of 2 images): 2, 2 and 0 of them say "yellow".
    args = [TOY, *FAST, "prompts.group_size=2", f"rewards=[{{kind: 'test_reliability:WordFlaky', name: flaky, mode: {mode}}}]", "train.epochs=3"]
    res = invoke("train", *args, "--out", str(tmp_path / "fail"))
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "reward 'flaky'" in res.output and "train.on_reward_error: drop-group" in res.output
    assert ("RuntimeError: cannot score a yellow thing" if mode == "raise" else "non-finite score") in res.output
    run = tmp_path / "drop"
    res = train_ok(*args, "train.on_reward_error=drop-group", "--out", str(run))
    got = [(r["reward/flaky/failures"], r["reward/dropped_groups"]) for r in rows(run)]
    assert got == [(4, 2), (4, 2), (0, 0)], got
    assert all(r["reward/mean"] == r["reward/mean"] for r in rows(run))  # finite: failed images left out


# ------------------------------------------------------------------------------ bad input


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


GOOD_RECORD = '{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}\n'

#: (name, files to write {name: content}, CLI arguments (FILE:name -> path, RUN -> the straight run),
#: needles the message must hold).
BAD_INPUT = [
    ("malformed YAML", {"p.yaml": "name: x\nmodel:\n  path: [unclosed\nrewards: []\n"}, ["train", "FILE:p.yaml"], ["p.yaml:", "malformed YAML"]),
    ("misspelled section", {}, ["train", TOY, "optimiser.lr=0.1"], ["optimiser", "did you mean 'optimizer'"]),
    ("misspelled stage key", {}, ["train", TOY, "sampler.stepz=3"], ["sampler.stepz", "did you mean 'steps'"]),
    ("unknown stage", {}, ["train", TOY, "sampler.kind=dpm"], ["sampler.kind", "did you mean 'dpm2'"]),
    ("wrong type", {}, ["train", TOY, "train.batch_size=sixteen"], ["train.batch_size", "sixteen"]),
    ("out of range", {}, ["train", TOY, "optimizer.lr=-1"], ["optimizer.lr", "greater than 0"]),
    ("bad new field", {}, ["train", TOY, "train.on_reward_error=skip"], ["train.on_reward_error", "'fail' or 'drop-group'"]),
    ("malformed override", {}, ["train", TOY, "train.epochs"], ["key.sub=value"]),
    ("missing pipeline", {}, ["train", "FILE:nope.yaml"], ["nope.yaml does not exist"]),
    ("missing prompt file", {}, ["train", TOY, "prompts.train=missing.txt"], ["prompts.train", "missing.txt does not exist"]),
    ("prompt file bad line", {"bad.txt": b"a cat\na dog\n\xff bad\n"}, ["train", TOY, "prompts.train=FILE:bad.txt"], ["prompts.train", "bad.txt:3", "UTF-8"]),
    ("prompt file bad JSON", {"bad.jsonl": GOOD_RECORD + "{not json\n"}, ["train", TOY, "prompts.train=FILE:bad.jsonl"], ["bad.jsonl:2", "not valid JSON"]),
    ("GenEval bad clause", {"bad.jsonl": GOOD_RECORD + GOOD_RECORD.replace('"count": 1', '"count": 1, "color": "reed"')},
     ["train", TOY, "prompts.test=FILE:bad.jsonl"], ["prompts.test", "bad.jsonl:2", "unknown color 'reed'", "did you mean 'red'"]),
    ("by-tag needs tags", {"p.txt": "a cat\na dog\n"}, ["train", TOY, *FAST, "prompts.train=FILE:p.txt", "prompts.sampling=by-tag"],
     ["prompts.sampling: by-tag", "p.txt has none", "sampling: uniform"]),
    ("tag weights without by-tag", {}, ["train", TOY, "prompts.tag_weights={position: 2}"],
     ["prompts.tag_weights", "set prompts.sampling: by-tag"]),
    ("negative tag weight", {}, ["train", TOY, "prompts.sampling=by-tag", "prompts.tag_weights={position: -1}"],
     ["prompts.tag_weights", "must be >= 0"]),
    ("tag weight names no tag", {}, ["train", TOY, *FAST, "prompts.sampling=by-tag", "prompts.tag_weights={positon: 2}"],
     ["prompts.tag_weights", "['positon']", "'position'"]),
    ("group does not divide batch", {}, ["train", TOY, "prompts.group_size=3"], ["prompts.group_size", "does not divide", "train.batch_size 256"]),
    ("micro-batch does not divide", {}, ["train", TOY, "train.micro_batch=48"], ["train.micro_batch", "does not divide"]),
    ("weights missing offline", {}, ["train", TOY, *FAST, "model.path=nobody-has/this-model"], ["nobody-has/this-model", "hf download"]),
    ("not a model folder", {"empty/readme.txt": "x"}, ["train", TOY, *FAST, "model.path=FILE:empty"], ["model_index.json"]),
    ("folder holds a run", {}, ["train", TOY, *FAST, "--out", "RUN"], ["already holds a run", "--resume"]),
    ("resume without a run", {}, ["train", TOY, *FAST, "--out", "FILE:nothing", "--resume"], ["no complete checkpoint"]),
    ("allow-changes alone", {}, ["train", TOY, *FAST, "--out", "FILE:new", "--allow-changes"], ["--allow-changes only applies to --resume"]),
    ("user stage missing", {}, ["train", TOY, "rewards=[{kind: 'no_such_module:Reward'}]"], ["rewards.0.kind", "cannot import user reward"]),
]


@pytest.mark.parametrize("name, files, args, needles", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_exits_2_with_what_where_and_how(straight, tmp_path: Path, name, files, args, needles):
    for file, content in files.items():
        _write(tmp_path / file, content)
    sub = lambda a: a.replace("FILE:", str(tmp_path) + "/") if "FILE:" in a else str(straight[0]) if a == "RUN" else a  # noqa: E731
    args = [sub(a) for a in args]
    if "--out" not in args:  # never the pipeline's default output folder
        args += ["--out", str(tmp_path / "out")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, f"{name}: exit {res.exit_code}\n{res.output}"
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output, res.output
    for needle in needles:
        assert needle in res.output, f"{name}: {needle!r} not in\n{res.output}"
