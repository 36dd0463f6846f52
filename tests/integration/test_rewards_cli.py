"""`flowrl rewards list` and `flowrl score` through click's CliRunner, on images rendered here:
ground-truth toy scenes (geneval, `shapes` backend) and text drawn with DejaVu Sans (ocr, rapidocr)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw, ImageFont

from flowrl.cli import main
from flowrl.prompts import load_prompt_set
from flowrl.rewards.geneval import write_metadata
from flowrl.toy.render import render
from flowrl.toy.scenes import sample_scene

HERE = Path(__file__).resolve().parent
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def save(image: np.ndarray, path: Path) -> None:
    """float [3, H, W] in [0, 1] -> PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """One toy-test prompt per GenEval tag, 2 images each (12), as a flat folder and in GenEval's
    layout. The two color_attr images are drawn from the single_object prompt instead, so they
    fail: per tag 1.0 except color_attr 0.0, strict mean 10/12, GenEval overall 5/6."""
    root = tmp_path_factory.mktemp("toy")
    records = {}
    for r in load_prompt_set("toy-test").metadata:
        records.setdefault(r.tag, r)
    chosen = [records[t] for t in TAGS]
    write_metadata(chosen, root / "prompts.jsonl")
    rng = np.random.default_rng(0)
    flat, layout = root / "flat", root / "geneval"
    for p, record in enumerate(chosen):
        drawn = chosen[0] if record.tag == "color_attr" else record
        (layout / f"{p:05d}").mkdir(parents=True)
        write_metadata([record], layout / f"{p:05d}" / "metadata.jsonl")
        for k in range(2):
            image = render(sample_scene(drawn, rng)).image
            save(image, flat / f"img{2 * p + k}.png")  # img10, img11 sort last only in natural order
            save(image, layout / f"{p:05d}" / "samples" / f"{k:04d}.png")
    return {"root": root, "flat": flat, "layout": layout, "prompts": root / "prompts.jsonl", "records": chosen}


def score_json(*args: str) -> dict:
    res = CliRunner().invoke(main, ["score", *args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def check_toy_numbers(out: dict, records) -> None:
    g = out["rewards"]["geneval"]
    assert out["n_images"] == 12 and out["n_prompts"] == 6 and g["n"] == 12 and g["failures"] == 0
    assert g["details"]["strict"] == pytest.approx(10 / 12)
    assert g["eval_summary"]["headline"] == pytest.approx(5 / 6)
    assert g["eval_summary"]["per_tag"] == pytest.approx({t: float(t != "color_attr") for t in TAGS})
    rows = out["images"]
    assert [r["prompt"] for r in rows] == [r.prompt for r in records for _ in range(2)]
    assert [r["details"]["geneval"]["strict"] for r in rows] == [1.0] * 10 + [0.0] * 2
    assert all(r["scores"]["geneval"] == 1.0 for r in rows[:10])
    assert 0.0 < rows[10]["scores"]["geneval"] < 1.0  # dense: the circle half of the prompt is there
    assert g["mean"] == pytest.approx(np.mean([r["scores"]["geneval"] for r in rows]))
    assert g["min"] == min(r["scores"]["geneval"] for r in rows) and g["max"] == 1.0


def test_rewards_list_shows_every_builtin_without_loading_models():
    res = CliRunner().invoke(main, ["rewards", "list"], env={"COLUMNS": "200"})  # model ids on one line
    assert res.exit_code == 0, res.output
    for name in ("geneval", "ocr", "pickscore", "aesthetic", "clipscore"):
        assert name in res.output
    assert "openai/clip-vit-large-patch14" in res.output and "rapidocr" in res.output
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom flowrl.cli import main\n"
        "assert CliRunner().invoke(main, ['rewards', 'list']).exit_code == 0\n"
        "print(sorted(m for m in ('transformers', 'rapidocr', 'onnxruntime', 'diffusers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_score_geneval_table(toy):
    res = run("score", "--reward", "geneval", "--prompts", str(toy["prompts"]), str(toy["flat"]))
    assert res.exit_code == 0, res.output
    assert "12 images, 6 prompts (2 per prompt)" in res.output
    assert "0.8333" in res.output  # headline and strict mean
    assert "tag/color_attr" in res.output and "img11.png" in res.output  # <= 16 images: per-image rows


def test_score_geneval_json_matches_prompts_in_natural_order(toy):
    out = score_json("--reward", "geneval", "--prompts", str(toy["prompts"]), str(toy["flat"]))
    assert out["layout"] == "flat"
    assert [r["path"] for r in out["images"]] == [f"img{i}.png" for i in range(12)]
    check_toy_numbers(out, toy["records"])


def test_score_geneval_output_layout_with_and_without_prompts(toy):
    out = score_json("--reward", "geneval", str(toy["layout"]))
    assert out["layout"] == "geneval" and out["images"][0]["path"] == os.path.join("00000", "samples", "0000.png")
    check_toy_numbers(out, toy["records"])
    again = score_json("--reward", "geneval", "--prompts", str(toy["prompts"]), str(toy["layout"]))
    assert again["rewards"] == out["rewards"]
    res = run("score", "--reward", "geneval", "--prompts", "toy-test", str(toy["layout"]))
    assert res.exit_code == 2 and "disagree with --prompts" in res.output


def test_score_override_and_several_rewards(toy, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))  # user_stages:Brightness, a user reward by dotted path
    out = score_json(
        "--reward", "geneval,user_stages:Brightness", "--prompts", str(toy["prompts"]), str(toy["flat"]),
        "-o", "geneval.signal=strict",
    )
    assert out["rewards"]["geneval"]["mean"] == pytest.approx(10 / 12)  # strict scores now
    first = np.asarray(Image.open(toy["flat"] / "img0.png"), dtype=np.float64) / 255
    assert out["images"][0]["scores"]["user_stages:Brightness"] == pytest.approx(first.mean(), abs=1e-5)


def test_score_ocr_on_rendered_text(tmp_path):
    import matplotlib

    font = ImageFont.truetype(str(Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"), 48)
    folder = tmp_path / "signs"
    folder.mkdir()
    for name, text in (("sign2.png", "OPEN"), ("sign10.png", "HELLO")):  # natural order: sign2 first
        image = Image.new("RGB", (256, 96), "white")
        ImageDraw.Draw(image).text((128, 48), text, fill="black", font=font, anchor="mm")
        image.save(folder / name)
    prompts = tmp_path / "signs.txt"
    prompts.write_text('a sign that says "OPEN"\na sign that says "Hello"\n')
    out = score_json("--reward", "ocr", "--prompts", str(prompts), str(folder))
    assert [r["scores"]["ocr"] for r in out["images"]] == [1.0, 1.0]
    assert out["rewards"]["ocr"]["details"]["exact"] == 1.0 and out["rewards"]["ocr"]["eval_summary"]["headline"] == 1.0


@pytest.fixture(scope="module")
def plain_prompts(toy) -> Path:
    path = toy["root"] / "plain.txt"
    path.write_text("".join(r.prompt + "\n" for r in toy["records"]))
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--reward", "genevel", "{flat}"], "did you mean 'geneval'"),
        (["--reward", "geneval,geneval", "{flat}"], "twice"),
        (["--reward", "geneval", "{empty}"], "no images in"),
        (["--reward", "geneval", "{flat}"], "no prompts were given"),
        (["--reward", "geneval", "--prompts", "{five}", "{flat}"], "12 images but .* has 5 prompts.*multiple of 5"),
        (["--reward", "geneval", "--prompts", "{plain}", "{flat}"], "geneval reward needs GenEval metadata"),
        (["--reward", "ocr", "--prompts", "{plain}", "{flat}"], "needs a quoted target text"),
        (["--reward", "geneval", "-o", "geneval.backnd=x", "{flat}"], "no field 'backnd'; did you mean 'backend'.*signal"),
        (["--reward", "geneval", "-o", "geneval.weight=2", "{flat}"], "training mix"),
        (["--reward", "geneval", "-o", "geneval=2", "{flat}"], "NAME.KEY=VALUE"),
        (["--reward", "geneval", "-o", "ocr.engine=x", "{flat}"], "not among --reward geneval"),
        (["--reward", "geneval", "-o", "geneval.backend=yolo", "{flat}"], "geneval.backend"),
        (["--reward", "clipscore", "-o", "clipscore.model=/nonexistent/clip", "--prompts", "{plain}", "{flat}"], "/nonexistent/clip does not exist"),
    ],
)
def test_score_user_mistakes_exit_2_with_a_message(toy, plain_prompts, tmp_path, args, message):
    import re

    five = tmp_path / "five.txt"
    five.write_text("".join(f"prompt {i}\n" for i in range(5)))
    (tmp_path / "empty").mkdir()
    paths = {"flat": toy["flat"], "empty": tmp_path / "empty", "five": five, "plain": plain_prompts}
    res = run("score", *(a.format(**paths) for a in args))
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "error" in res.output.lower()
    assert re.search(message, res.output), res.output


def test_score_missing_default_weights_says_how_to_fetch_them(toy, plain_prompts, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = run("score", "--reward", "pickscore", "--prompts", str(plain_prompts), str(toy["flat"]))
    assert res.exit_code == 2, res.output
    assert "never downloads" in res.output and "yuvalkirstain/PickScore_v1" in res.output


def test_score_mixed_sizes_and_unreadable_files(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8), (255, 255, 255)).save(folder / "a.png")
    Image.new("RGB", (16, 12), (0, 0, 0)).save(folder / "b.jpg")  # another size: scored in its own batch
    (tmp_path / "one.txt").write_text("anything\n")
    out = score_json("--reward", "user_stages:Brightness", "--prompts", str(tmp_path / "one.txt"), str(folder))
    assert [r["scores"]["user_stages:Brightness"] for r in out["images"]] == [1.0, 0.0]
    (folder / "c.png").write_bytes(b"not a png")
    res = run("score", "--reward", "user_stages:Brightness", "--prompts", str(tmp_path / "one.txt"), str(folder))
    assert res.exit_code == 2 and "cannot read image" in res.output and "c.png" in res.output


def test_score_refuses_incomplete_geneval_layouts(toy, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(toy["layout"], broken)
    (broken / "00002" / "metadata.jsonl").unlink()
    res = run("score", "--reward", "geneval", str(broken))
    assert res.exit_code == 2 and "00002 has samples/ but no metadata.jsonl" in res.output
    mixed = tmp_path / "mixed"
    shutil.copytree(toy["layout"], mixed)
    shutil.copy(toy["flat"] / "img0.png", mixed / "img0.png")
    res = run("score", "--reward", "geneval", str(mixed))
    assert res.exit_code == 2 and "both images" in res.output
