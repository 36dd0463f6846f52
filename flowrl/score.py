"""The library behind `flowrl score`: images on disk matched to prompts, reward configs with `-o`
overrides, scoring in batches, and the report (tables or JSON). flowrl/cli/rewards.py holds the
command.

Matching images to prompts (also in ``flowrl score --help`` and docs/rewards.md):

* flat layout: the PNG/JPG files directly inside IMAGES_DIR, in natural name order (``img2`` before
  ``img10``). With P prompts and N images, N must be a multiple of P; prompt ``p`` gets images
  ``p*k .. p*k+k-1`` with ``k = N / P`` (GenEval generates k = 4 per prompt).
* GenEval's own output layout: ``IMAGES_DIR/<00000>/metadata.jsonl`` (one GenEval record) and
  ``IMAGES_DIR/<00000>/samples/*.png``, folders in natural order. The prompts come from the folders;
  ``--prompts`` is optional and, when given, must agree with them.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowrl.errors import FlowrlError, ModelNotFoundError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Settings of a reward inside a training mix; `flowrl score` reports raw scores, so it refuses them.
MIX_FIELDS = ("kind", "name", "weight", "scale", "clip")
#: Built-in rewards that need GenEval metadata (a .jsonl prompt set), checked before any model loads.
NEEDS_METADATA = ("geneval",)
#: Per-image rows are printed by default up to this many images (more with --per-image).
PER_IMAGE_ROWS = 16


# ------------------------------------------------------------------------------ image discovery


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers by value: "img2.png" < "img10.png" (case-insensitive)."""
    parts = re.split(r"(\d+)", name)
    return (tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), name)


def image_files(folder: Path) -> list[Path]:
    """The PNG/JPG files directly inside `folder`, in natural name order."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: natural_key(p.name))


@dataclass(frozen=True)
class GenEvalFolder:
    """One prompt folder of GenEval's output layout.

    Attributes:
        folder: IMAGES_DIR/<index>.
        record: the PromptRecord of its metadata.jsonl.
        images: its samples/*.png|jpg in natural order.
    """

    folder: Path
    record: Any
    images: tuple[Path, ...]


def geneval_folders(root: Path) -> list[GenEvalFolder]:
    """Prompt folders of GenEval's layout under `root` (empty when `root` is not in that layout).

    Raises:
        FlowrlError: a folder without a readable single-record metadata.jsonl, or without images.
    """
    from flowrl.rewards.geneval.metadata import MetadataError, load_metadata

    subdirs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name))
    candidates = [d for d in subdirs if (d / "metadata.jsonl").is_file() or (d / "samples").is_dir()]
    out, problems = [], []
    for d in candidates:
        meta, samples = d / "metadata.jsonl", d / "samples"
        if not meta.is_file():
            problems.append(f"{d} has samples/ but no metadata.jsonl")
            continue
        try:
            records = load_metadata(meta)
        except (MetadataError, FileNotFoundError) as err:
            problems.append(str(err))
            continue
        if len(records) != 1:
            problems.append(f"{meta} holds {len(records)} records; GenEval writes exactly one per prompt folder")
            continue
        images = image_files(samples) if samples.is_dir() else []
        if not images:
            problems.append(f"{d} has no PNG/JPG images in samples/")
            continue
        out.append(GenEvalFolder(d, records[0], tuple(images)))
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  (and {len(problems) - 10} more)" if len(problems) > 10 else "")
        raise FlowrlError(
            f"{root} looks like GenEval's output layout (<index>/metadata.jsonl + <index>/samples/*.png) but "
            f"{len(problems)} folder(s) are incomplete:\n  {shown}\nfix or remove those folders"
        )
    return out


@dataclass(frozen=True)
class ImageSet:
    """Images on disk matched with their prompts.

    Attributes:
        root: IMAGES_DIR.
        layout: "flat" or "geneval".
        paths: N image files.
        prompt_index: N indices into `prompts`, the prompt of each image.
        prompts: the P distinct prompts.
        records: P GenEval records, or () for plain-text prompts.
    """

    root: Path
    layout: str
    paths: tuple[Path, ...]
    prompt_index: tuple[int, ...]
    prompts: tuple[str, ...]
    records: tuple[object, ...]

    def prompt_of(self, i: int) -> str:
        return self.prompts[self.prompt_index[i]]

    def metadata_of(self, idx: Sequence[int]) -> tuple[object, ...]:
        return tuple(self.records[self.prompt_index[i]] for i in idx) if self.records else ()


def match_flat(root: Path, files: Sequence[Path], prompts: Sequence[str], records: Sequence[object], source: str) -> ImageSet:
    """N images in order, P prompts: prompt p gets the k = N / P consecutive images p*k .. p*k+k-1.

    Raises:
        FlowrlError: N is not a multiple of P.
    """
    n, p = len(files), len(prompts)
    if n % p:
        near = " or ".join(str(m) for m in ((n // p) * p, (n // p + 1) * p) if m)
        raise FlowrlError(
            f"{root} holds {n} images but {source} has {p} prompts; each prompt gets N/P consecutive images "
            f"(in natural name order), so the number of images must be a multiple of {p} ({near}). "
            "Remove the extra images, or give the prompt file the images were generated from"
        )
    k = n // p
    return ImageSet(root, "flat", tuple(files), tuple(i // k for i in range(n)), tuple(prompts), tuple(records))


def match_geneval(root: Path, folders: Sequence[GenEvalFolder], prompt_set: Any | None) -> ImageSet:
    """Images of GenEval's layout, each with its folder's record.

    When a prompt set is given too, folder ``<i>`` (or the i-th folder, for non-numeric names) must
    hold its i-th prompt.

    Raises:
        FlowrlError: a folder whose prompt differs from the prompt set's.
    """
    if prompt_set is not None:
        bad = []
        for pos, f in enumerate(folders):
            i = int(f.folder.name) if f.folder.name.isdigit() else pos
            expected = prompt_set.prompts[i] if i < len(prompt_set) else None
            if expected != f.record.prompt:
                bad.append(f"{f.folder.name}: folder has {f.record.prompt!r}, --prompts line {i + 1} has {expected!r}")
        if bad:
            raise FlowrlError(
                f"{root} is in GenEval's layout and its folders' metadata.jsonl disagree with --prompts "
                f"{prompt_set.source}:\n  " + "\n  ".join(bad[:5]) + "\nleave out --prompts (the folders carry their "
                "own prompts) or give the metadata file the images were generated from"
            )
    paths, index = [], []
    for i, f in enumerate(folders):
        paths += f.images
        index += [i] * len(f.images)
    records = tuple(f.record for f in folders)
    return ImageSet(root, "geneval", tuple(paths), tuple(index), tuple(r.prompt for r in records), records)


def collect_images(root: Path, prompts_spec: str | None) -> ImageSet:
    """Find the images of `root` and match them with prompts (see the module docstring).

    Raises:
        FlowrlError: no images, both layouts at once, flat images without --prompts, or a count
            that is not a multiple of the number of prompts.
    """
    from flowrl.prompts import load_prompt_set

    files = image_files(root)
    folders = geneval_folders(root)
    prompt_set = load_prompt_set(prompts_spec) if prompts_spec is not None else None
    if files and folders:
        raise FlowrlError(
            f"{root} holds both images ({len(files)} PNG/JPG files) and GenEval prompt folders ({len(folders)}); "
            "point IMAGES_DIR at one layout: the flat folder of images or the GenEval output folder"
        )
    if folders:
        return match_geneval(root, folders, prompt_set)
    if not files:
        raise FlowrlError(
            f"no images in {root}: expected PNG/JPG files directly inside it, or GenEval's layout "
            "<index>/metadata.jsonl + <index>/samples/*.png"
        )
    if prompt_set is None:
        raise FlowrlError(
            f"{root} holds {len(files)} images but no prompts were given; pass --prompts with a GenEval-metadata "
            ".jsonl, a .txt file with one prompt per line, or a built-in set name (e.g. toy-test)"
        )
    return match_flat(root, files, prompt_set.prompts, prompt_set.metadata, prompt_set.source)


# ------------------------------------------------------------------------------ reward configs


def settable_fields(config_cls: type) -> list[str]:
    """Fields of a reward Config that `-o` may set (all but the mix settings)."""
    return [f for f in config_cls.model_fields if f not in MIX_FIELDS]


def parse_override(text: str, classes: Mapping[str, type]) -> tuple[str, str, Any]:
    """'clipscore.model=/models/clip' -> ('clipscore', 'model', '/models/clip').

    The value is read as `flowrl.config.split_override` reads it (YAML; what YAML cannot read stays
    a string).

    Args:
        text: NAME.KEY=VALUE.
        classes: reward name -> stage class, the rewards chosen with --reward.

    Raises:
        FlowrlError: malformed text, a reward not chosen, or a field the reward does not have (with
            its valid fields and the nearest one).
    """
    from flowrl.config import split_reward_override

    name, key, value = split_reward_override(text, list(classes), "clipscore.model=/models/clip-vit-large-patch14")
    fields = settable_fields(classes[name].Config)
    if key in MIX_FIELDS:
        raise FlowrlError(
            f"-o {text!r}: `{key}` is a setting of a reward inside a training mix; flowrl score reports each "
            f"reward's raw score. Fields of {name!r} you can set: {', '.join(fields)}"
        )
    if key not in fields:
        near = difflib.get_close_matches(key, fields, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise FlowrlError(f"-o {text!r}: reward {name!r} has no field {key!r}{hint} Its fields: {', '.join(fields)}")
    return name, key, value


def build_configs(names: Sequence[str], overrides: Sequence[str]) -> list[Any]:
    """Validated Config of each named reward with the -o overrides applied.

    Raises:
        FlowrlError: an unknown reward (with the nearest name), a bad override, or a value the
            reward's Config refuses (every problem listed).
    """
    from pydantic import ValidationError

    from flowrl import registry
    from flowrl.config import issues_from_validation

    classes = {n: registry.lookup("reward", n) for n in names}
    fields: dict[str, dict[str, Any]] = {n: {} for n in names}
    for text in overrides:
        name, key, value = parse_override(text, classes)
        if key in fields[name]:
            raise FlowrlError(f"-o sets {name}.{key} twice; give each field once")
        fields[name][key] = value
    configs, problems = [], []
    for n, cls in classes.items():
        try:
            configs.append(cls.Config.model_validate({"kind": n, **fields[n]}))
        except ValidationError as err:
            problems += [f"{i.key}: {i.message}" for i in issues_from_validation(err, cls.Config, (n,))]
    if problems:
        raise FlowrlError("invalid reward settings (-o NAME.KEY=VALUE):\n  " + "\n  ".join(problems))
    return configs


def needs_metadata(cls: type) -> bool:
    """Whether a reward class scores against GenEval metadata (a `needs_metadata` attribute wins)."""
    return bool(getattr(cls, "needs_metadata", getattr(cls, "stage_name", None) in NEEDS_METADATA))


# ------------------------------------------------------------------------------------ scoring


def batches(paths: Sequence[Path], size: int) -> Iterator[tuple[list[int], Any]]:
    """Image indices and uint8 [b, H, W, 3] tensors, at most `size` images of one pixel size each,
    read lazily (one batch in memory at a time).

    Raises:
        FlowrlError: a file PIL cannot read.
    """
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    idx: list[int] = []
    arrays: list[Any] = []
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as err:
            raise FlowrlError(f"cannot read image {path}: {err}; remove it or replace it with a valid PNG/JPG") from None
        if arrays and (len(arrays) == size or arr.shape != arrays[0].shape):
            yield idx, torch.from_numpy(np.stack(arrays))
            idx, arrays = [], []
        idx.append(i)
        arrays.append(arr)
    if arrays:
        yield idx, torch.from_numpy(np.stack(arrays))


@dataclass(frozen=True)
class ScoreReport:
    """Every reward's verdict on an image set.

    Attributes:
        images: the matched images.
        outputs: label -> RewardOutput over all N images (scores [N], details each [N]).
        summaries: label -> the reward's `eval_summary` ('' = headline), for rewards that have one.
    """

    images: ImageSet
    outputs: Mapping[str, Any]
    summaries: Mapping[str, Mapping[str, float]]


def score_images(images: ImageSet, configs: Sequence[Any], batch_size: int, progress=None) -> ScoreReport:
    """Score every image with every reward (each reward built once, a `RewardMix`)."""
    import torch

    from flowrl.rewards.mix import RewardMix
    from flowrl.types import RewardOutput

    try:
        mix = RewardMix(configs)
    except ModelNotFoundError as err:
        raise ModelNotFoundError(
            f"{err}. With flowrl score, set a reward's fields with -o, e.g. -o NAME.model=/local/folder"
        ) from None
    parts: dict[str, list[Any]] = {label: [] for label in mix.labels}
    for idx, pixels in batches(images.paths, batch_size):
        out = mix(pixels, [images.prompt_of(i) for i in idx], images.metadata_of(idx))
        for label in mix.labels:
            parts[label].append(out.parts[label])
        if progress is not None:
            progress(len(idx))
    outputs, summaries = {}, {}
    metadata = images.metadata_of(range(len(images.paths)))
    for reward, label in zip(mix, mix.labels, strict=True):
        chunks = parts[label]
        details = {k: torch.cat([c.details[k].float() for c in chunks]) for k in chunks[0].details}
        whole = RewardOutput(
            scores=torch.cat([c.scores.float() for c in chunks]), details=details, failures=sum(c.failures for c in chunks)
        )
        outputs[label] = whole
        if hasattr(reward, "eval_summary"):
            summaries[label] = dict(reward.eval_summary(whole, metadata))
    return ScoreReport(images, outputs, summaries)


def stats(values: Any) -> dict[str, float | int]:
    """mean, std (population), min, max and n of a [N] tensor."""
    v = values.double()
    return {
        "mean": float(v.mean()),
        "std": float(v.std(unbiased=False)),
        "min": float(v.min()),
        "max": float(v.max()),
        "n": int(v.numel()),
    }


def structured_summary(summary: Mapping[str, float]) -> dict[str, Any]:
    """An `eval_summary` dict as JSON: '' -> "headline", "tag/<t>" -> "per_tag"[t], the rest as is."""
    out: dict[str, Any] = {}
    per_tag = {k.removeprefix("tag/"): float(v) for k, v in summary.items() if k.startswith("tag/")}
    for k, v in summary.items():
        if not k.startswith("tag/"):
            out["headline" if k == "" else k] = float(v)
    if per_tag:
        out["per_tag"] = per_tag
    return out


def report_json(report: ScoreReport) -> dict[str, Any]:
    """The machine-readable result of `flowrl score --json`."""
    imgs = report.images
    rewards: dict[str, Any] = {}
    for label, out in report.outputs.items():
        entry: dict[str, Any] = stats(out.scores)
        entry["failures"] = int(out.failures)
        entry["details"] = {k: float(v.double().mean()) for k, v in out.details.items()}
        if label in report.summaries:
            entry["eval_summary"] = structured_summary(report.summaries[label])
        rewards[label] = entry
    rows = []
    for i, path in enumerate(imgs.paths):
        rows.append(
            {
                "path": str(path.relative_to(imgs.root)),
                "prompt": imgs.prompt_of(i),
                "prompt_index": imgs.prompt_index[i],
                "scores": {label: float(out.scores[i]) for label, out in report.outputs.items()},
                "details": {label: {k: float(v[i]) for k, v in out.details.items()} for label, out in report.outputs.items()},
            }
        )
    return {
        "images_dir": str(imgs.root),
        "layout": imgs.layout,
        "n_images": len(imgs.paths),
        "n_prompts": len(imgs.prompts),
        "rewards": rewards,
        "images": rows,
    }


def print_report(report: ScoreReport, per_image: bool, console) -> None:
    """Rich tables: per reward summary, eval summaries, and per-image rows when asked or few."""
    from rich.table import Table

    imgs = report.images
    n = len(imgs.paths)
    title = f"{n} images, {len(imgs.prompts)} prompts ({n // max(len(imgs.prompts), 1)} per prompt) in {imgs.root}"
    table = Table(title=title, title_justify="left")
    table.add_column("reward", no_wrap=True)
    for col in ("mean", "std", "min", "max", "n"):
        table.add_column(col, justify="right")
    table.add_column("details (means)")
    any_failures = any(o.failures for o in report.outputs.values())
    if any_failures:
        table.add_column("failures", justify="right")
    for label, out in report.outputs.items():
        s = stats(out.scores)
        details = "  ".join(f"{k} {float(v.double().mean()):.4f}" for k, v in out.details.items())
        row = [label, f"{s['mean']:.4f}", f"{s['std']:.4f}", f"{s['min']:.4f}", f"{s['max']:.4f}", str(s["n"]), details]
        table.add_row(*row, *([str(out.failures)] if any_failures else []))
    console.print(table)
    for label, summary in report.summaries.items():
        t = Table(title=f"{label}: evaluation summary", title_justify="left")
        t.add_column("metric", no_wrap=True)
        t.add_column("value", justify="right")
        for k, v in summary.items():
            t.add_row("headline" if k == "" else k, f"{v:.4f}")
        console.print(t)
    if per_image or n <= PER_IMAGE_ROWS:
        t = Table(title="per image", title_justify="left")
        t.add_column("image", no_wrap=True, overflow="fold")
        t.add_column("prompt", overflow="fold")
        for label in report.outputs:
            t.add_column(label, justify="right")
        for i, path in enumerate(imgs.paths):
            t.add_row(str(path.relative_to(imgs.root)), imgs.prompt_of(i), *(f"{float(o.scores[i]):.4f}" for o in report.outputs.values()))
        console.print(t)
    elif n > PER_IMAGE_ROWS:
        console.print(f"(per-image rows hidden for {n} images; pass --per-image or --json to see them)", style="dim")


# ------------------------------------------------------------------------------------ commands
