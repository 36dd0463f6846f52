"""`flowrl eval` end to end on the embedded toy model, through click's CliRunner."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

import flowrl.training.rollout
from flowrl.cli import main

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TOY = str(REPO / "assets" / "toy-sd3")
GENEVAL_META = REPO.parent / "shared" / "data" / "geneval" / "evaluation_metadata.jsonl"

#: A few prompts and 2 sampler steps: seconds per evaluation.
FAST = ["--limit", "2", "--steps", "2"]
#: Shrinks toy-geneval.yaml to a one-epoch run of seconds (see test_train.py).
TINY = [
    "train.batch_size=8", "prompts.group_size=4", "train.micro_batch=4", "sampler.steps=3",
    "eval.sampler.steps=3", "eval.limit=1", "eval.images_per_prompt=1", "eval.every=0",
    "checkpoint.every=1", "estimator.timestep_fraction=0.5", "logging.sample_grid=false",
]


def flowrl_eval(*args: str):
    res = CliRunner().invoke(main, ["eval", *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def pixels(out: Path, i: int) -> np.ndarray:
    return np.asarray(Image.open(out / "images" / f"{i:05d}.png")).astype(int)


def table_value(output: str, row: str, column: int = 0) -> str:
    """The `column`-th number of the table row whose first cell is `row`."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("│┃").split("│")]
        if cells and cells[0] == row:
            return cells[1 + column]
    raise AssertionError(f"no table row {row!r} in:\n{output}")


@pytest.fixture
def count_sampled(monkeypatch):
    """Seeds of every image the harness samples (it samples through flowrl.training.rollout.roll_out)."""
    seen: list[int] = []
    real = flowrl.training.rollout.roll_out

    def spy(policy, sampler, batch, cond, seeds, which, chunk):
        seen.extend(seeds)
        return real(policy, sampler, batch, cond, seeds, which, chunk)

    monkeypatch.setattr(flowrl.training.rollout, "roll_out", spy)
    return seen


# ------------------------------------------------------------------------------ the base model


@pytest.mark.slow
def test_base_model_reproduces_readme_score(tmp_path: Path):
    """The README's base score of the embedded model: 79 test prompts x 4 images, 20-step Euler, no
    CFG, seeds 0..315, shapes detector, GenEval strict. About 35 s on 2 shared cores."""
    out = tmp_path / "base"
    start = time.perf_counter()
    res = flowrl_eval("--reward", "geneval", TOY, "--out", str(out))
    elapsed = time.perf_counter() - start
    s = summary(out)
    assert s["n_images"] == 316 and s["n_prompts"] == 79
    assert s["settings"]["seeds"]["first"] == 0 and s["settings"]["seeds"]["last"] == 315
    assert (s["settings"]["sampler"], s["settings"]["steps"], s["settings"]["guidance"]) == ("euler", 20, 1.0)
    readme = {"single_object": 1.0, "two_object": 0.5625, "counting": 0.375, "colors": 0.95, "position": 0.375, "color_attr": 0.34375}
    assert s["per_tag"] == pytest.approx(readme, abs=1e-12)
    assert f"{s['overall']:.3f}" == "0.601"
    assert f"{s['prompt_share']:.3f}" == "0.873"
    assert f"{s['rewards']['geneval']['details']['dense']:.3f}" == "0.657"
    assert table_value(res.output, "overall") == "0.601"
    print(f"full toy base evaluation took {elapsed:.1f} s")


def test_outputs_parse_and_agree_with_the_table(tmp_path: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    out = tmp_path / "o"
    res = flowrl_eval("--reward", "geneval,user_stages:Brightness", TOY, "--limit", "3", "--steps", "2", "--batch", "5", "--out", str(out))
    rs, s = rows(out), summary(out)
    assert [r["index"] for r in rs] == list(range(12)) and [r["seed"] for r in rs] == list(range(12))
    meta = [json.loads(line) for line in (REPO / "assets" / "prompts" / "toy-test.jsonl").read_text().splitlines()][:3]
    for r in rs:
        record = meta[r["prompt_index"]]
        assert r["prompt_index"] == r["index"] // 4 and r["prompt"] == record["prompt"] and r["tag"] == record["tag"]
        assert json.loads(r["metadata"]) == record  # GenEval's layout: the record as a JSON string
        assert r["correct"] == bool(r["details"]["geneval"]["strict"])
        assert r["filename"] == f"images/{r['index']:05d}.png" and (out / r["filename"]).is_file()
        brightness = pixels(out, r["index"]).mean() / 255
        assert r["scores"]["user_stages:Brightness"] == pytest.approx(brightness, abs=2e-3)  # scored before 8-bit rounding
    # results.jsonl -> summary.json -> printed table.
    for label, decimals in (("geneval", 4), ("user_stages:Brightness", 4)):
        scores = [r["scores"][label] for r in rs]
        entry = s["rewards"][label]
        assert entry["mean"] == pytest.approx(np.mean(scores), abs=1e-12)
        assert entry["std"] == pytest.approx(np.std(scores, ddof=1), abs=1e-12)
        assert entry["quantiles"]["p50"] == pytest.approx(np.median(scores), abs=1e-12)
        assert table_value(res.output, label, 0) == f"{entry['mean']:.{decimals}f}"
        assert table_value(res.output, label, 4) == f"{entry['quantiles']['p50']:.{decimals}f}"
    tags = {}
    for r in rs:
        tags.setdefault(r["tag"], []).append(r["correct"])
    per_tag = {t: float(np.mean(v)) for t, v in tags.items()}
    assert s["per_tag"] == pytest.approx(per_tag) and s["overall"] == pytest.approx(np.mean(list(per_tag.values())))
    assert s["rewards"]["geneval"]["eval_summary"][""] == pytest.approx(s["overall"])
    assert table_value(res.output, "overall") == f"{s['overall']:.3f}"
    for tag, value in per_tag.items():
        assert table_value(res.output, tag) == f"{value:.3f}"
    assert s["settings"]["rewards"] == ["geneval", "user_stages:Brightness"] and s["settings"]["weights"] == "base"
    grid = Image.open(out / "grid.png")
    assert grid.size == (8 * (32 * 4 + 4), 2 * (32 * 4 + 4))  # 12 images, 8 per row (2 prompts), 4x upscaled
    assert "eval 12 images: 12/12" in res.output  # plain progress lines when not on a terminal


def test_default_output_folder_of_a_base_model(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flowrl_eval("--reward", "geneval", TOY, "--limit", "1", "--steps", "1", "-n", "1")
    found = list((tmp_path / "outputs" / "eval" / "toy-sd3").iterdir())
    assert [p.name for p in found] == ["base_euler1-cfg1_toy-test-k1_seed0_geneval"]
    assert not (REPO / "assets" / "toy-sd3" / "eval").exists(), "a shipped model folder stays clean"


# ------------------------------------------------------------------------------------- resume


def test_resume_skips_scored_images(tmp_path: Path, count_sampled: list[int], monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    out, straight = tmp_path / "resumed", tmp_path / "straight"
    args = ["--reward", "geneval,user_stages:Brightness", TOY, "--steps", "2", "--batch", "3"]
    flowrl_eval(*args, "--limit", "2", "--out", str(out))
    assert sorted(count_sampled) == list(range(8))
    count_sampled.clear()
    first = summary(out)
    res = flowrl_eval(*args, "--limit", "2", "--out", str(out))
    assert count_sampled == [] and "8 of 8 images already scored" in res.output
    assert summary(out)["rewards"] == first["rewards"]
    # A larger limit extends the evaluation: only the new prompt's 4 images are drawn.
    flowrl_eval(*args, "--limit", "3", "--out", str(out))
    assert sorted(count_sampled) == [8, 9, 10, 11]
    # A run killed mid-batch: 5 complete lines and a torn one; the missing images are drawn again.
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:40])
    (out / "summary.json").unlink()
    count_sampled.clear()
    flowrl_eval(*args, "--limit", "3", "--out", str(out))
    assert sorted(count_sampled) == list(range(5, 12))
    # The same as an uninterrupted evaluation (up to batched arithmetic: one 8-bit level).
    flowrl_eval(*args, "--limit", "3", "--batch", "12", "--out", str(straight))
    a, b = rows(out), rows(straight)
    assert [r["index"] for r in a] == list(range(12))
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in ("scores", "details")} == {k: v for k, v in rb.items() if k not in ("scores", "details")}
        assert ra["scores"] == pytest.approx(rb["scores"], abs=1e-3)
        assert np.abs(pixels(out, ra["index"]) - pixels(straight, ra["index"])).max() <= 1


def test_resume_refuses_other_settings(tmp_path: Path, count_sampled: list[int]):
    out = tmp_path / "o"
    args = ["--reward", "geneval", TOY, "--limit", "2", "-n", "1", "--out", str(out)]
    flowrl_eval(*args, "--steps", "2")
    res = CliRunner().invoke(main, ["eval", *args, "--steps", "3"])
    assert res.exit_code == 2, res.output
    assert "other settings" in res.output and "sampler.steps: 2 there, 3 now" in res.output
    assert "--out" in res.output and "--force" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["eval", *args, "--steps", "2", "--limit", "1"])
    assert res.exit_code == 2 and "more than the 1 asked for" in res.output
    count_sampled.clear()
    flowrl_eval(*args, "--steps", "3", "--force")
    assert sorted(count_sampled) == [0, 1] and summary(out)["settings"]["steps"] == 3
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("keep")
    res = CliRunner().invoke(main, ["eval", *args[:-1], str(tmp_path / "foreign"), "--steps", "2"])
    assert res.exit_code == 2 and "settings.json is missing" in res.output


# ------------------------------------------------------------------------- runs and checkpoints


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A one-epoch toy run whose checkpoint is then edited so that its adapters are known: policy
    with lora_B = 0 (exactly the base model) and EMA with a nonzero lora_B (visibly different)."""
    run = tmp_path_factory.mktemp("run") / "r"
    res = CliRunner().invoke(main, ["train", str(REPO / "pipelines" / "toy-geneval.yaml"), *TINY, "train.epochs=1", "--out", str(run)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    ckpt = run / "checkpoints" / "epoch-0"
    gen = torch.Generator().manual_seed(0)
    for name in ("policy", "ema"):
        path = ckpt / f"{name}.safetensors"
        state = load_file(path)
        for k, v in state.items():
            if "lora_B" in k:
                state[k] = torch.zeros_like(v) if name == "policy" else 0.2 * torch.randn(v.shape, generator=gen)
        save_file(state, path, metadata={"epoch": "0"})
    return run


def test_run_folder_and_its_checkpoint_folder(run: Path, tmp_path: Path):
    args = ["--reward", "geneval", *FAST, "-n", "2", "--sampler", "euler", "--guidance", "1"]
    flowrl_eval(*args, str(run))
    tag = "epoch0-ema_euler2-cfg1_toy-test-k2_seed0_geneval"
    by_run = run / "eval" / tag
    assert by_run.is_dir(), sorted((run / "eval").iterdir())
    ckpt = run / "checkpoints" / "epoch-0"
    flowrl_eval(*args, str(ckpt))
    by_ckpt = ckpt / "eval" / tag
    s = summary(by_ckpt)["settings"]
    assert (s["epoch"], s["weights"], summary(by_run)["settings"]["epoch"]) == (0, "ema", 0)
    for i in range(4):  # the run folder means its newest checkpoint: the same images
        assert np.array_equal(pixels(by_run, i), pixels(by_ckpt, i))

    policy, base = tmp_path / "policy", tmp_path / "base"
    flowrl_eval(*args, str(ckpt), "--weights", "policy", "--out", str(policy))
    flowrl_eval(*args, TOY, "--out", str(base))
    for i in range(4):
        # policy has lora_B = 0: exactly the base model; EMA's adapter changes every image.
        assert np.array_equal(pixels(policy, i), pixels(base, i))
        assert np.abs(pixels(by_ckpt, i) - pixels(base, i)).max() > 10
    assert summary(policy)["settings"]["weights"] == "policy"


def test_run_reward_settings_and_labels_are_used(run: Path, tmp_path: Path):
    """--reward names a kind or a label of the run's rewards; the run's reward fields are kept."""
    out = tmp_path / "o"
    flowrl_eval("--reward", "geneval", str(run), "--limit", "1", "--steps", "1", "-n", "1", "--out", str(out))
    used = summary(out)["settings"]["identity"]["rewards"][0]
    assert used["kind"] == "geneval" and used["backend"] == "shapes" and used["signal"] == "strict"  # toy-geneval.yaml trains on the strict verdict


# ----------------------------------------------------------------------------------- mistakes


def _nothing_but_model_index(tmp_path: Path) -> str:
    folder = tmp_path / "other-model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    return str(folder)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--reward", "genevel", TOY], "did you mean 'geneval'"),
        (["--reward", "geneval", "/nonexistent/run"], "does not exist"),
        (["--reward", "geneval", "no-such-org/no-such-model"], "not in the local Hugging Face cache"),
        (["--reward", "geneval", TOY, "--prompts", "no-such-set"], "built-in sets"),
        (["--reward", "geneval", TOY, "--prompts", "TXT"], "needs GenEval metadata"),
        (["--reward", "geneval", TOY, "--prompts", str(GENEVAL_META)], "cannot detect"),
        (["--reward", "geneval", TOY, "--weights", "ema"], "base model without adapters"),
        (["--reward", "geneval", TOY, "--sampler", "eulr"], "did you mean 'euler'"),
        (["--reward", "geneval", TOY, "-o", "geneval.bakend=shapes"], "bakend"),
        (["--reward", "geneval", TOY, "-o", "geneval.weight=2"], "raw score"),
        (["--reward", "geneval", "OTHER"], "no default prompt set"),
        (["--reward", "geneval", "EMPTYRUN"], "no complete checkpoint"),
        (["--reward", "geneval", "PLAIN"], "neither a run folder"),
    ],
)
def test_mistakes_exit_2_with_a_message(tmp_path: Path, args: list[str], message: str, count_sampled: list[int]):
    if str(GENEVAL_META) in args and not GENEVAL_META.is_file():
        pytest.skip(f"{GENEVAL_META} is not here")
    txt = tmp_path / "p.txt"
    txt.write_text("a photo of a red circle\n")
    (tmp_path / "empty-run").mkdir()
    (tmp_path / "empty-run" / "pipeline.yaml").write_text("name: x\n")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("x")
    swap = {"TXT": str(txt), "OTHER": _nothing_but_model_index(tmp_path), "EMPTYRUN": str(tmp_path / "empty-run"), "PLAIN": str(tmp_path / "plain")}
    args = [swap.get(a, a) for a in args]
    res = CliRunner().invoke(main, ["eval", *args, "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert count_sampled == [], "mistakes are refused before any image is drawn"


def test_trainer_eval_of_the_base_model_equals_flowrl_eval(tmp_path: Path):
    """The trainer's epoch -1 evaluation and `flowrl eval` of the base model draw the same images
    (image i, seed i), so they report the same score."""
    run = tmp_path / "r"
    overrides = [o for o in TINY if not o.startswith(("eval.", "logging."))]
    res = CliRunner().invoke(main, [
        "train", str(REPO / "pipelines" / "toy-geneval.yaml"), *overrides, "eval.every=1", "eval.limit=6",
        "eval.images_per_prompt=2", "eval.sampler.steps=4", "train.epochs=1", "--out", str(run),
    ], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["epoch"] == -1
    out = tmp_path / "e"
    flowrl_eval("--reward", "geneval", TOY, "--limit", "6", "--images-per-prompt", "2", "--steps", "4", "--out", str(out))
    dense = np.mean([r["scores"]["geneval"] for r in rows(out)])
    assert first["eval/geneval/dense"] == pytest.approx(dense, abs=1e-6)
    assert first["eval/geneval"] == pytest.approx(summary(out)["overall"], abs=1e-6)
