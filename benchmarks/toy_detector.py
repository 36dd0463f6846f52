"""Accuracy and speed of the shapes-world detector (`flowrl.toy.detector.ShapesDetector`).

Measures, on renders whose ground truth is known:

1. per-object precision and recall on random scenes (a tag drawn uniformly, then a prompt record of
   that tag, then `sample_scene`), clean, under a Gaussian blur, and blurred with pixel noise; a
   detection matches an object of the same class and colour with box IoU >= 0.5, one to one, at
   GenEval's score thresholds 0.3 and 0.9 (the counting threshold);
2. GenEval strict accuracy of ground-truth renders of the built-in test prompts (4 renders each),
   judged with `flowrl.rewards.geneval.judge`, per tag, clean and blurred;
3. milliseconds per image, batched and one image at a time.

Usage::

    .venv/bin/python benchmarks/toy_detector.py --scenes 1000 --seed 0 [--out results.json]

The numbers are recorded in docs/toy-detector.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from flowrl.rewards.geneval import TAGS, judge
from flowrl.toy.detector import MatchCounts, ShapesDetector, match_objects
from flowrl.toy.prompts import all_records, split_records
from flowrl.toy.render import render
from flowrl.toy.scenes import Scene, sample_scene

THRESHOLDS = (0.3, 0.9)


def degrade(image: np.ndarray, sigma: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    """A float [3, H, W] image Gaussian-blurred by `sigma` px, plus pixel noise of std `noise`."""
    if sigma > 0:
        image = np.stack([gaussian_filter(c, sigma, mode="nearest") for c in image])
    if noise > 0:
        image = image + rng.normal(0.0, noise, image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def random_scenes(n: int, rng: np.random.Generator) -> list[Scene]:
    """`n` scenes: a tag uniformly, a record of that tag uniformly, then a layout for it."""
    by_tag = defaultdict(list)
    for record in all_records():
        by_tag[record.tag].append(record)
    tags = sorted(by_tag)
    scenes = []
    while len(scenes) < n:
        group = by_tag[tags[rng.integers(len(tags))]]
        scenes.append(sample_scene(group[rng.integers(len(group))], rng))
    return scenes


def object_accuracy(
    detector: ShapesDetector,
    scenes: list[Scene],
    sigma: float,
    noise: float,
    rng: np.random.Generator,
    label: str,
) -> dict[float, MatchCounts]:
    """Summed match counts per score threshold over `scenes`, rendered and degraded (`degrade`)."""
    totals = {t: MatchCounts(0, 0, 0) for t in THRESHOLDS}
    for start in range(0, len(scenes), 100):
        chunk = scenes[start : start + 100]
        images = np.stack([degrade(render(s).image, sigma, noise, rng) for s in chunk])
        for scene, found in zip(chunk, detector(images)):
            for t in THRESHOLDS:
                totals[t] = totals[t] + match_objects(found, scene.objects, score_threshold=t)
        done = start + len(chunk)
        print(f"  [{label}] {done}/{len(scenes)} scenes", file=sys.stderr, flush=True)
    return totals


def geneval_accuracy(
    detector: ShapesDetector, renders_per_prompt: int, sigma: float, rng: np.random.Generator
) -> dict[str, tuple[int, int]]:
    """(correct, total) per tag of GenEval's strict rule on ground-truth renders of the test prompts."""
    _, test = split_records(all_records())
    records = [r for r in test for _ in range(renders_per_prompt)]
    images = np.stack([degrade(render(sample_scene(r, rng)).image, sigma, 0.0, rng) for r in records])
    per_tag: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for record, found in zip(records, detector(images)):
        per_tag[record.tag][0] += judge(record, found).correct
        per_tag[record.tag][1] += 1
    return {tag: (per_tag[tag][0], per_tag[tag][1]) for tag in TAGS if tag in per_tag}


def timing(detector: ShapesDetector, scenes: list[Scene], repeats: int = 3) -> dict[str, float]:
    """Best-of-`repeats` milliseconds per image, batched (64 images per call) and one at a time."""
    images = np.stack([render(s).image for s in scenes])
    detector(images[:8])  # warm-up: lookup tables, imports
    batched, single = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for start in range(0, len(images), 64):
            detector(images[start : start + 64])
        batched.append((time.perf_counter() - t0) / len(images))
        t0 = time.perf_counter()
        for image in images:
            detector.detect_one(image)
        single.append((time.perf_counter() - t0) / len(images))
    return {"batched_ms": 1000 * min(batched), "single_ms": 1000 * min(single)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=1000, help="random scenes per condition")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blur", type=float, default=0.7, help="blur sigma (px) of the blurred runs")
    parser.add_argument("--noise", type=float, default=0.03, help="pixel noise std of the noisy run")
    parser.add_argument("--renders", type=int, default=4, help="renders per test prompt for GenEval")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    detector = ShapesDetector()
    rng = np.random.default_rng(args.seed)
    scenes = random_scenes(args.scenes, rng)
    n_objects = sum(len(s.objects) for s in scenes)
    print(f"{len(scenes)} scenes, {n_objects} objects, seed {args.seed}", file=sys.stderr)

    results: dict = {"scenes": len(scenes), "objects": n_objects, "seed": args.seed, "blur": args.blur}
    results["objects_by_condition"] = {}
    conditions = (
        ("clean", 0.0, 0.0),
        (f"blur {args.blur}", args.blur, 0.0),
        (f"blur {args.blur} + noise {args.noise}", args.blur, args.noise),
    )
    for label, sigma, noise in conditions:
        totals = object_accuracy(detector, scenes, sigma, noise, rng, label)
        results["objects_by_condition"][label] = {
            str(t): {"precision": c.precision, "recall": c.recall, **c.__dict__} for t, c in totals.items()
        }
    results["geneval"] = {}
    for label, sigma in (("clean", 0.0), (f"blur {args.blur}", args.blur)):
        print(f"  [geneval {label}] judging test prompts", file=sys.stderr, flush=True)
        results["geneval"][label] = geneval_accuracy(detector, args.renders, sigma, rng)
    results["timing"] = timing(detector, scenes[:200])
    results["machine"] = f"{platform.processor() or platform.machine()}, Python {platform.python_version()}"

    print("\nPer-object precision / recall (same class and colour, box IoU >= 0.5, one-to-one)")
    print("| condition | score > 0.3: precision | recall | score > 0.9: precision | recall |")
    print("|---|---|---|---|---|")
    for label, by_t in results["objects_by_condition"].items():
        cells = " | ".join(
            f"{c['precision']:.4f} ({c['matched']}/{c['detected']}) | "
            f"{c['recall']:.4f} ({c['matched']}/{c['expected']})"
            for c in (by_t[str(t)] for t in THRESHOLDS)
        )
        print(f"| {label} | {cells} |")

    print("\nGenEval strict accuracy of ground-truth renders of the test prompts")
    labels = list(results["geneval"])
    print("| tag | images | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for tag in results["geneval"][labels[0]]:
        n = results["geneval"][labels[0]][tag][1]
        cells = " | ".join(f"{results['geneval'][lb][tag][0] / n:.4f}" for lb in labels)
        print(f"| {tag} | {n} | {cells} |")
    overall = []
    for lb in labels:
        correct = sum(c for c, _ in results["geneval"][lb].values())
        total = sum(n for _, n in results["geneval"][lb].values())
        overall.append(f"{correct / total:.4f}")
    print(f"| overall | {total} | " + " | ".join(overall) + " |")

    t = results["timing"]
    print(f"\nSpeed: {t['batched_ms']:.2f} ms per image batched, {t['single_ms']:.2f} ms one at a time "
          f"({results['machine']})")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
