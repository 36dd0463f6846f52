"""`flowrl` CLI on the embedded toy world, through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from flowrl import __version__
from flowrl.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_version_and_help_list_only_working_commands():
    res = run("--version")
    assert res.exit_code == 0 and __version__ in res.output
    res = run("--help")
    assert res.exit_code == 0
    listed = {line.split()[0] for line in res.output.split("Commands:")[1].splitlines() if line.strip()}
    assert {"rewards", "score", "toy", "train", "validate"} <= listed
    assert listed <= {"rewards", "score", "toy", "train", "validate", "eval", "export-lora"}  # nothing unbuilt
    res = run("toy", "--help")
    assert "pretrain" in res.output and "sample" in res.output


@pytest.mark.slow
def test_pretrain_miniature_is_reproducible_and_loadable(tmp_path: Path):
    from diffusers import StableDiffusion3Pipeline

    args = ["toy", "pretrain", "--steps", "3", "--vae-steps", "20", "--scenes", "32", "--batch", "4"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(*args, "--out", str(a)).exit_code == 0
    assert run(*args, "--out", str(b)).exit_code == 0
    pa = StableDiffusion3Pipeline.from_pretrained(a, local_files_only=True)
    pb = StableDiffusion3Pipeline.from_pretrained(b, local_files_only=True)
    sa, sb = pa.transformer.state_dict(), pb.transformer.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "same seed must give the same model"
    assert pa.vae.config.scaling_factor == pb.vae.config.scaling_factor
    log = [json.loads(line) for line in (a / "pretrain_log.jsonl").read_text().splitlines()]
    vae = [r for r in log if r["phase"] == "vae"]
    assert vae[-1]["mse"] < vae[0]["mse"] * 0.5, "the VAE should learn within 20 steps"
    # No temporary folders are left behind beside the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_pretrain_refuses_to_overwrite(tmp_path: Path):
    (tmp_path / "keep.txt").write_text("precious")
    res = CliRunner().invoke(main, ["toy", "pretrain", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "not empty" in res.output and "--force" in res.output
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_sample_writes_grid_results_and_summary(tmp_path: Path):
    out = tmp_path / "s"
    res = run("toy", "sample", "--limit", "3", "-n", "2", "--steps", "2", "--cfg", "1", "--cfg", "4.5", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "overall" in res.output
    summary = json.loads((out / "summary.json").read_text())
    for key in ("cfg1", "cfg4.5"):
        assert 0.0 <= summary[key]["overall"] <= 1.0 and summary[key]["n_images"] == 6
        lines = (out / f"results-{key}.jsonl").read_text().splitlines()
        assert len(lines) == 6
        assert sum(json.loads(x)["correct"] for x in lines) / 6 == pytest.approx(
            sum(summary[key]["per_tag"].values()) / len(summary[key]["per_tag"])
        ) or len(summary[key]["per_tag"]) > 1
    from PIL import Image

    assert Image.open(out / "grid-cfg1.png").size[0] > 32


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompts", "no-such-set"], "built-in sets"),
        (["--prompts", "missing/file.jsonl"], "missing/file.jsonl"),
        (["--model", "/nonexistent/model"], "flowrl toy pretrain"),
    ],
)
def test_sample_bad_input_exits_2_with_a_message(tmp_path: Path, args, message):
    res = CliRunner().invoke(main, ["toy", "sample", "--out", str(tmp_path), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_sample_bad_metadata_line_is_reported(tmp_path: Path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}\n{"tag": "colours"}\n')
    res = CliRunner().invoke(main, ["toy", "sample", "--prompts", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and ":2" in res.output


def test_pretrain_init_continues_the_transformer_and_keeps_the_vae(tmp_path: Path):
    from flowrl.paths import TOY_MODEL

    out = tmp_path / "cont"
    res = run("toy", "pretrain", "--init", str(TOY_MODEL), "--steps", "2", "--scenes", "16", "--batch", "4", "--out", str(out))
    assert res.exit_code == 0, res.output
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert (out / vae).read_bytes() == (Path(TOY_MODEL) / vae).read_bytes()
    tr = "transformer/diffusion_pytorch_model.safetensors"
    assert (out / tr).read_bytes() != (Path(TOY_MODEL) / tr).read_bytes()
    card = json.loads((out / "flowrl_toy.json").read_text())
    init_card = json.loads((Path(TOY_MODEL) / "flowrl_toy.json").read_text())
    assert card["pretrain"]["steps"] == 2
    assert card["history"][:-1] == init_card["history"]  # the init folder's own history, then its run
    assert card["history"][-1]["pretrain"] == init_card["pretrain"] and card["history"][-1]["init"] == init_card["init"]


@pytest.mark.parametrize(
    "args, message",
    [(["--init", "/nonexistent/model"], "no model folder"), (["--device", "gpu"], "not a torch device"), (["--device", "cuda:0"], "no CUDA GPU")],
)
def test_pretrain_bad_init_or_device_exits_2(tmp_path: Path, monkeypatch, args, message):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    res = CliRunner().invoke(main, ["toy", "pretrain", "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
