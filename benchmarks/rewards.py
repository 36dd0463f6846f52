"""Reward throughput on this machine: images per second of each reward at a fixed batch size.

Rows:

* ``geneval-shapes``: the toy world's classical detector and GenEval's rules, on ground-truth renders
  of the built-in test prompts (32 px, the toy world's size). Real: it has no weights.
* ``ocr-rapidocr``: rapidocr with the PP-OCR det/rec ONNX models shipped in its wheel, on 512 px
  signs with one word of DejaVu Sans each. Real.
* ``clipscore``, ``aesthetic``, ``pickscore``, ``geneval-hf-mask2former``: the published weights when
  they are in the local Hugging Face cache; otherwise random weights in the real transformers classes
  (CLIPModel, CLIPTokenizer, Mask2FormerForUniversalSegmentation), saved to a temporary folder and
  loaded through the rewards' own loading code. By default these random models have tiny towers
  (2 layers, width 32) at the published input size, so their images/s measures preprocessing and the
  reward code around the network, not the network; ``--full-size`` builds them at the published
  architecture (ViT-L/14, ViT-H/14, Swin-S Mask2Former) instead, which gives the compute cost of the
  real models (slow on a CPU: minutes).

Each reward is built, called once (warm-up, not timed), then called on the same batch until
`--calls` calls or `--budget` seconds have passed (at least two calls); the median call time gives
images/s. Usage::

    .venv/bin/python benchmarks/rewards.py [--threads 2] [--batch 16] [--full-size] [--out docs/rewards-benchmark.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

#: A few COCO classes (as transformers' Mask2Former names them) for the random detector and its prompts.
COCO_SUBSET = ("person", "bicycle", "car", "dog", "cat", "bench", "bottle", "cup")
WORDS = ("OPEN", "HELLO", "FLOWRL", "CAFE", "EXIT", "SALE", "BAKERY", "TAXI")


# ----------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Result:
    """One row of the table.

    Attributes:
        name: the reward and its setting, e.g. "ocr-rapidocr".
        weights: "real", "published (HF cache)", "random, tiny config" or "random, published size".
        inputs: what one batch holds, e.g. "16 x 512 px signs".
        load_s: seconds to build the reward (models loaded from disk).
        first_s: seconds of the first (warm-up) call.
        call_s: median seconds of the timed calls.
        calls: number of timed calls.
        batch: images per call.
    """

    name: str
    weights: str
    inputs: str
    load_s: float
    first_s: float
    call_s: float
    calls: int
    batch: int

    @property
    def images_per_s(self) -> float:
        return self.batch / self.call_s


def measure(
    name: str, weights: str, inputs: str, build: Callable[[], object], batch: tuple, min_calls: int, max_calls: int, budget_s: float
) -> Result:
    """Build a reward, warm it up on `batch` = (images, prompts, metadata), then time calls."""
    t0 = time.perf_counter()
    reward = build()
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    reward(*batch)
    first = time.perf_counter() - t0
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or (len(times) < max_calls and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        out = reward(*batch)
        times.append(time.perf_counter() - t0)
    assert out.scores.shape == (len(batch[1]),)
    return Result(name, weights, inputs, load, first, statistics.median(times), len(times), len(batch[1]))


# ------------------------------------------------------------------------------------- inputs


def toy_batch(n: int, seed: int = 0) -> tuple:
    """n ground-truth renders of toy-test prompts [n, 3, 32, 32], prompts, GenEval records."""
    from flowrl.prompts import load_prompt_set
    from flowrl.toy.render import render
    from flowrl.toy.scenes import sample_scene

    records = list(load_prompt_set("toy-test").metadata)
    rng = np.random.default_rng(seed)
    chosen = [records[i] for i in rng.choice(len(records), size=n, replace=n > len(records))]
    images = torch.from_numpy(np.stack([render(sample_scene(r, rng)).image for r in chosen]))
    return images, [r.prompt for r in chosen], chosen


def sign_batch(n: int, size: int = 512) -> tuple:
    """n images [n, 3, size, size] of one dark word on a light background, prompts quoting it."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"), size // 7)
    images, prompts = [], []
    for i in range(n):
        word = WORDS[i % len(WORDS)]
        im = Image.new("RGB", (size, size), (235, 225 - 5 * (i % 8), 200))
        ImageDraw.Draw(im).text((size // 2, size // 2), word, fill=(20, 20, 30), font=font, anchor="mm")
        images.append(np.asarray(im))
        prompts.append(f'a shop sign that says "{word}"')
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return pixels, prompts, ()


def coco_batch(n: int, size: int = 512) -> tuple:
    """Random-texture images [n, 3, size, size] with GenEval records over COCO_SUBSET classes."""
    from flowrl.rewards.geneval import Clause, PromptRecord

    gen = torch.Generator().manual_seed(0)
    low = torch.rand(n, 3, size // 16, size // 16, generator=gen)
    images = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    records = []
    for i in range(n):
        a, b = COCO_SUBSET[i % 4 + 2], COCO_SUBSET[(i + 1) % 4 + 2]
        records.append(
            [
                PromptRecord("single_object", f"a photo of a {a}", (Clause(a, 1),)),
                PromptRecord("colors", f"a photo of a red {a}", (Clause(a, 1, color="red"),)),
                PromptRecord("two_object", f"a photo of a {a} and a {b}", (Clause(a, 1), Clause(b, 1))),
                PromptRecord("counting", f"a photo of two {a}s", (Clause(a, 2),), (Clause(a, 3),)),
            ][i % 4]
        )
    return images.clamp(0, 1), [r.prompt for r in records], records


# ------------------------------------------------------------------------------ random models


#: (text, vision, projection) tower sizes: tiny, and the published ViT-L/14 (OpenAI CLIP) and
#: ViT-H/14 (LAION, PickScore) architectures.
CLIP_SIZES = {
    "tiny": (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        None,
    ),
    "vit-l-14": (
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        768,
    ),
    "vit-h-14": (
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16),
        1024,
    ),
}


def save_random_clip(folder: Path, size: str, projection_dim: int) -> Path:
    """A random CLIPModel (224 px, 14 px patches, towers of `size`) and a CLIPTokenizer in `folder`.

    The tokenizer is flowrl's offline toy tokenizer (byte fallback), so the text embedding table is
    smaller than CLIP's 49408 tokens; that table is a lookup and costs no compute.
    """
    from transformers import CLIPConfig, CLIPModel

    from flowrl.toy.model import build_tokenizer

    tokenizer = build_tokenizer(77, extra_words=tuple(w.lower() for w in WORDS) + ("shop", "sign", "says"))
    text, vision, proj = CLIP_SIZES[size]
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, **ids, **text),
        vision_config=dict(image_size=224, patch_size=14, **vision),
        projection_dim=proj or projection_dim,
    )
    torch.manual_seed(0)
    CLIPModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_random_head(path: Path) -> Path:
    """Random weights of the LAION aesthetic head (768 -> 1024 -> 128 -> 64 -> 16 -> 1)."""
    gen = torch.Generator().manual_seed(0)
    dims = (768, 1024, 128, 64, 16, 1)
    keys = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")
    state = {}
    for key, d_in, d_out in zip(keys, dims[:-1], dims[1:], strict=True):
        state[f"{key}.weight"] = torch.randn(d_out, d_in, generator=gen) / math.sqrt(d_in)
        state[f"{key}.bias"] = torch.zeros(d_out)
    torch.save(state, path)
    return path


def save_random_mask2former(folder: Path, full_size: bool) -> Path:
    """A random Mask2FormerForUniversalSegmentation labelled with COCO_SUBSET: a tiny Swin, or the
    Swin-S / 100-query architecture of facebook/mask2former-swin-small-coco-instance."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    stages = ["stage1", "stage2", "stage3", "stage4"]
    if full_size:
        backbone = SwinConfig(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7, out_features=stages)
        sizes: dict = dict(num_queries=100)
    else:
        backbone = SwinConfig(patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, out_features=stages)
        sizes = dict(
            feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32, encoder_layers=1,
            decoder_layers=2, num_attention_heads=2, dim_feedforward=32, num_queries=6,
        )
    id2label = dict(enumerate(COCO_SUBSET))
    config = Mask2FormerConfig(
        backbone_config=backbone, num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()}, **sizes
    )
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(config).eval().save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------- cases


def published_or_none(cls, **fields):
    """The reward with its published weights from the local cache, or None when they are absent."""
    from flowrl.errors import ModelNotFoundError

    try:
        return cls(cls.Config(device="cpu", **fields))
    except ModelNotFoundError:
        return None


def run_cases(args, tmp: Path) -> list[Result]:
    from flowrl.rewards.aesthetic import AestheticReward
    from flowrl.rewards.clipscore import ClipScoreReward
    from flowrl.rewards.geneval.reward import GenEvalReward
    from flowrl.rewards.models import clear_shared
    from flowrl.rewards.ocr import OCRReward
    from flowrl.rewards.pickscore import PickScoreReward

    b = args.batch
    timing = dict(min_calls=2, max_calls=args.calls, budget_s=args.budget)
    results = []

    def row(*a, **kw) -> None:
        results.append(measure(*a, **kw, **timing))
        r = results[-1]
        print(f"{r.name:28s} {r.weights:24s} {r.images_per_s:9.1f} img/s  (load {r.load_s:.1f}s)", file=sys.stderr, flush=True)
        clear_shared()  # one model in memory at a time

    wanted = set(args.only.split(",")) if args.only else None

    def on(name: str) -> bool:
        return wanted is None or name in wanted

    if on("geneval-shapes"):
        row("geneval-shapes", "real (no weights)", f"{b} x 32 px toy renders", lambda: GenEvalReward(GenEvalReward.Config()), toy_batch(b))
    signs = sign_batch(b)
    if on("ocr-rapidocr"):
        cfg = OCRReward.Config(device="cpu", threads=args.threads)
        row("ocr-rapidocr", "real (shipped in wheel)", f"{b} x 512 px signs", lambda: OCRReward(cfg), signs)

    size = "full" if args.full_size else "tiny"
    random_label = "random, published size" if args.full_size else "random, tiny config"
    clip_l = clip_h = None

    def clip_folder(kind: str) -> Path:
        nonlocal clip_l, clip_h
        if kind == "l":
            clip_l = clip_l or save_random_clip(tmp / "clip-l", "vit-l-14" if args.full_size else "tiny", 768)
            return clip_l
        clip_h = clip_h or save_random_clip(tmp / "clip-h", "vit-h-14" if args.full_size else "tiny", 1024)
        return clip_h

    inputs = f"{b} x 512 px -> 224 px"
    if on("clipscore"):
        real = published_or_none(ClipScoreReward)
        if real is not None:
            row("clipscore", "published (HF cache)", inputs, lambda: real, signs)
        else:
            folder = clip_folder("l")
            row("clipscore", random_label, inputs, lambda: ClipScoreReward(ClipScoreReward.Config(model=str(folder), device="cpu")), signs)
    if on("aesthetic"):
        real = published_or_none(AestheticReward)
        if real is not None:
            row("aesthetic", "published (HF cache)", inputs, lambda: real, signs)
        else:
            folder, head = clip_folder("l"), save_random_head(tmp / "head.pth")
            cfg = AestheticReward.Config(model=str(folder), head=str(head), device="cpu")
            row("aesthetic", random_label, inputs, lambda: AestheticReward(cfg), signs)
    if on("pickscore"):
        real = published_or_none(PickScoreReward)
        if real is not None:
            row("pickscore", "published (HF cache)", inputs, lambda: real, signs)
        else:
            folder = clip_folder("h")
            cfg = PickScoreReward.Config(model=str(folder), processor=str(folder), device="cpu")
            row("pickscore", random_label, inputs, lambda: PickScoreReward(cfg), signs)
    if on("geneval-hf-mask2former"):
        coco = coco_batch(b)
        m2f_inputs = f"{b} x 512 px -> 800 px"
        real = published_or_none(GenEvalReward, backend="hf-mask2former")
        if real is not None:
            row("geneval-hf-mask2former", "published (HF cache)", m2f_inputs, lambda: real, coco)
        else:
            det = save_random_mask2former(tmp / f"m2f-{size}", args.full_size)
            cfg = GenEvalReward.Config(backend="hf-mask2former", model=str(det), clip_model=str(clip_folder("l")), device="cpu")
            row("geneval-hf-mask2former", random_label, m2f_inputs, lambda: GenEvalReward(cfg), coco)
    return results


# ------------------------------------------------------------------------------------- report


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "transformers", "rapidocr", "onnxruntime"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


def markdown(results: Sequence[Result], args, wall_s: float, load: float) -> str:
    """The results page: machine, settings, table, notes, how to rerun."""
    from flowrl.precision import cpu_name

    lines = [
        "# Reward throughput (CPU)",
        "",
        "Images per second of each reward on one CPU machine, written by `benchmarks/rewards.py`.",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {cpu_name()}, {os.cpu_count()} logical cores visible, {platform.system()} {platform.release()}",
        f"- threads: torch {torch.get_num_threads()}, onnxruntime (rapidocr) {args.threads}",
        f"- batch: {args.batch} images per call; median of at least 2 timed calls after one warm-up call",
        f"- software: Python {platform.python_version()}, {versions()}",
        f"- whole run: {wall_s:.0f} s; 1-minute load average before it: {load:.2f}"
        + (" (other processes were using the cores: the numbers are lower bounds)" if load > 0.5 else ""),
        "",
        "| reward | weights | one batch | images/s | s per batch | load s | first call s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| `{r.name}` | {r.weights} | {r.inputs} | {r.images_per_s:.1f} | {r.call_s:.2f} | {r.load_s:.1f} | {r.first_s:.2f} |"
        )
    lines += [
        "",
        "## Reading the numbers",
        "",
        "- **real** rows run exactly what training runs: `geneval-shapes` is the toy world's classical",
        "  detector plus GenEval's rules on 32 px renders; `ocr-rapidocr` is rapidocr with the PP-OCR",
        "  det/rec ONNX models shipped in its wheel, on 512 px images of one word (the detector",
        "  resizes so the longest side is at most 960 px, so 512 px images are not resized).",
        "- **random, tiny config** rows use the real transformers classes (CLIPModel, Mask2Former) and",
        "  the rewards' own loading and preprocessing code, but with random towers of 2 layers and",
        "  width 32, because the published weights are not on this machine and are never downloaded.",
        "  They measure the cost around the network (resizing 512 px images to 224 px or 800 px,",
        "  tokenising, CLIP colour crops for GenEval) and are an upper bound on real throughput, not",
        "  an estimate of it. `--full-size` builds random networks of the published architectures",
        "  (ViT-L/14 for clipscore and aesthetic, ViT-H/14 for pickscore, Swin-S Mask2Former with 100",
        "  queries), whose cost is that of the real models.",
        "- **published (HF cache)** rows appear when the published weights are in the local Hugging",
        "  Face cache; they are measured as they are.",
        "- The random Mask2Former reports a detection for many (query, class) pairs of every image, so",
        "  GenEval's mask post-processing and colour crops see more detections than with real weights;",
        "  its row is a rough figure, not an upper bound.",
        "- On a GPU every model reward is far faster; these are CPU numbers for planning CPU runs and",
        "  tests.",
        "",
        "## Rerun",
        "",
        "```bash",
        ". .venv/bin/activate",
        "python benchmarks/rewards.py                    # about 75 s on 2 busy cores; rewrites this page",
        "python benchmarks/rewards.py --full-size --out /tmp/full.md   # published-size random networks: slow",
        "python benchmarks/rewards.py --only ocr-rapidocr,geneval-shapes --out /tmp/some.md",
        "```",
        "",
        "Options: `--threads N` (torch and onnxruntime threads, default 2), `--batch N` (default 16),",
        "`--calls N` and `--budget S` (at most N timed calls or S seconds per reward).",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    parser.add_argument("--batch", type=int, default=16, help="images per reward call")
    parser.add_argument("--calls", type=int, default=5, help="at most this many timed calls per reward")
    parser.add_argument("--budget", type=float, default=15.0, help="stop timing a reward after this many seconds")
    parser.add_argument("--full-size", action="store_true", help="random networks of the published sizes (slow)")
    parser.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "rewards-benchmark.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flowrl.hf import quiet

    quiet()  # no loading bars between the result lines
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flowrl-reward-bench-") as tmp:
        results = run_cases(args, Path(tmp))
    args.out.write_text(markdown(results, args, time.perf_counter() - start, load))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
