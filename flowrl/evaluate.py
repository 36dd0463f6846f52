"""The evaluation harness behind `flowrl eval`: sample a target's images for a prompt set, score them
with one or more rewards, and write per-image results, a summary and a grid. Resumable.

Targets:

* a run folder (``RUN/pipeline.yaml`` + ``RUN/checkpoints/``): its newest complete checkpoint;
* a checkpoint folder (``RUN/checkpoints/epoch-N``): its run's ``pipeline.yaml`` is two levels up;
* a base model (a diffusers folder such as ``assets/toy-sd3``, or a hub id): no adapters, and the
  defaults of :class:`flowrl.config.PipelineConfig` stand in for a pipeline.

Seeding: image ``i`` of an evaluation (prompt ``i // K``, sample ``i % K`` with K images per prompt)
starts from ``torch.Generator().manual_seed(seed + i)`` noise, ``seed`` = 0 by default. This is the
rule of ``flowrl toy sample``, so the embedded model's base score in the README (0.601, 20-step
Euler, no CFG) is reproduced exactly; it does not depend on the batch size. The trainer's periodic
evaluation uses the same rule (``eval.seed + i``), so a run's epoch -1 score is this one
(docs/eval.md).

Output folder (``--out``; default ``TARGET/eval/<tag>`` for runs and checkpoints, and
``outputs/eval/<model>/<tag>`` for base models, which keeps shipped model folders clean)::

    settings.json     what determines every image and score (checked on resume)
    results.jsonl     one line per image: GenEval's field names plus flowrl's scores
    images/00000.png  image i at the model's resolution
    summary.json      overall, per tag, per reward, and the settings
    grid.png          the first 64 images; green border = correct (GenEval strict), red = wrong

Rerunning with the same settings skips every image already scored and recorded in results.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flowrl.errors import FlowrlError
from flowrl.training.checkpoint import CHECKPOINTS, STATE_FILE, folder_epoch, latest_checkpoint, write_atomic

RESULTS = "results.jsonl"
SUMMARY = "summary.json"
SETTINGS = "settings.json"
GRID = "grid.png"
IMAGES = "images"
#: Everything `--force` removes from an output folder (nothing else is touched).
OWNED = (RESULTS, SUMMARY, SETTINGS, GRID, IMAGES)
#: Quantiles of each reward's score distribution in summary.json.
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
GRID_IMAGES = 64
#: Images per prompt of a reward's own evaluation protocol (GenEval draws 4 per prompt).
PROTOCOL_IMAGES_PER_PROMPT = {"geneval": 4}
#: Fields of a reward entry that belong to a training mix; eval reports raw scores, so they are unset.
MIX_FIELDS = ("name", "weight", "scale", "clip")
#: The embedded toy model's card kind; a base model with this card defaults to the toy test prompts.
TOY_KIND = "flowrl-toy-sd3"
TOY_TEST_PROMPTS = "toy-test"


# ----------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """What `flowrl eval` was pointed at.

    Attributes:
        kind: "run", "checkpoint" or "model".
        spec: TARGET as given on the command line.
        location: absolute path of the folder, or the hub id of a base model not on disk.
        run: the run folder (runs and checkpoints), else None.
        checkpoint: the checkpoint folder evaluated (runs and checkpoints), else None.
        epoch: the checkpoint's epoch, else None.
    """

    kind: str
    spec: str
    location: str
    run: Path | None = None
    checkpoint: Path | None = None
    epoch: int | None = None


def _is_hub_id(spec: str) -> bool:
    """'org/name' as the Hugging Face hub spells model ids (not a path such as ./x, /x, ~/x, a/b/c)."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec) is not None


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds any snapshot of model `repo_id`."""
    from flowrl.rewards.models import hub_cache_dir

    snapshots = Path(hub_cache_dir()) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def _is_checkpoint(folder: Path) -> bool:
    from flowrl.policy import ADAPTERS

    return (folder / STATE_FILE).is_file() or any((folder / f"{a}.safetensors").is_file() for a in ADAPTERS)


def resolve_target(spec: str) -> Target:
    """Classify TARGET (see the module docstring); loads nothing.

    Raises:
        FlowrlError: TARGET does not exist (and is not a hub id), is a file, is a folder of another
            kind, or is a run without a complete checkpoint.
    """
    from flowrl.policy import resolve_model_path

    path = Path(spec).expanduser()
    if not path.exists():
        repo_relative = Path(resolve_model_path(spec))
        if repo_relative.exists():
            path = repo_relative
        elif _is_hub_id(spec) and _in_hub_cache(spec):
            return Target("model", spec, spec)
        elif _is_hub_id(spec):
            from flowrl.rewards.models import hub_cache_dir

            raise FlowrlError(
                f"TARGET {spec} is not a folder here, and as a hub id it is not in the local Hugging Face cache "
                f"{hub_cache_dir()}; check the path of the run/checkpoint/model folder, or fetch the model with "
                f"`hf download {spec}` (flowrl never downloads weights implicitly)"
            )
        else:
            raise FlowrlError(
                f"TARGET {spec} does not exist; give a run folder (with pipeline.yaml and checkpoints/), a "
                "checkpoint folder (RUN/checkpoints/epoch-N), a diffusers model folder (e.g. assets/toy-sd3) "
                "or a hub id (org/name)"
            )
    path = path.resolve()
    if not path.is_dir():
        raise FlowrlError(
            f"TARGET {spec} is a file; give the folder that holds it: a run folder, a checkpoint folder "
            "(RUN/checkpoints/epoch-N) or a diffusers model folder"
        )
    if (path / "pipeline.yaml").is_file():
        found = latest_checkpoint(path)
        if found is None:
            raise FlowrlError(
                f"run {spec} has no complete checkpoint in {path / CHECKPOINTS} yet (a checkpoint is written "
                "every checkpoint.every epochs and at the end); wait for one, or evaluate the base model"
            )
        epoch, ckpt = found
        return Target("run", spec, str(path), run=path, checkpoint=ckpt, epoch=epoch)
    if _is_checkpoint(path):
        run = path.parent.parent
        if not (run / "pipeline.yaml").is_file():
            raise FlowrlError(
                f"checkpoint {spec} has no run configuration at {run / 'pipeline.yaml'} (two levels up, where the "
                "trainer writes it); evaluate checkpoints inside their run folder"
            )
        return Target("checkpoint", spec, str(path), run=run, checkpoint=path, epoch=folder_epoch(path))
    if (path / "model_index.json").is_file():
        return Target("model", spec, str(path))
    raise FlowrlError(
        f"TARGET {spec} is neither a run folder (no pipeline.yaml), a checkpoint folder (no trainer_state.json "
        "or *.safetensors adapters) nor a diffusers model folder (no model_index.json)"
    )


@dataclass(frozen=True)
class TargetDefaults:
    """What a target says about its own evaluation (its pipeline, or PipelineConfig's defaults).

    Attributes:
        model: the base model and LoRA settings (ModelConfig).
        test_prompts: the default prompt set, or None when there is none (a base model other than the toy).
        eval: the pipeline's eval section (EvalConfig).
        sampler: the eval sampler's validated Config.
        rewards: the pipeline's reward entries (validated Configs); () for a base model.
        seed: the run's train.seed (the adapters' init seed, irrelevant once weights are loaded).
    """

    model: Any
    test_prompts: str | None
    eval: Any
    sampler: Any
    rewards: tuple[Any, ...]
    seed: int = 0


def target_defaults(target: Target) -> TargetDefaults:
    """Read the run's pipeline.yaml, or build the defaults for a base model.

    Raises:
        ConfigError: the run's pipeline.yaml no longer validates (every problem listed).
    """
    from flowrl.config import EvalConfig, ModelConfig, load_pipeline, validate_stage

    if target.run is not None:
        p = load_pipeline(target.run / "pipeline.yaml")
        c = p.config
        return TargetDefaults(c.model, c.prompts.test, c.eval, p.eval_sampler, tuple(p.rewards), c.train.seed)
    model = ModelConfig(path=target.location)
    eval_cfg = EvalConfig()
    sampler, issues = validate_stage("sampler", eval_cfg.sampler, ("eval", "sampler"), {})
    assert sampler is not None, issues  # the schema's own default always validates
    test = TOY_TEST_PROMPTS if is_toy_model(target.location) else None
    return TargetDefaults(model, test, eval_cfg, sampler, ())


def is_toy_model(location: str) -> bool:
    """Whether a model folder is the embedded toy model (its flowrl card says so)."""
    from flowrl.toy.model import read_card

    path = Path(location)
    return path.is_dir() and read_card(path).get("kind") == TOY_KIND


# ------------------------------------------------------------------------------ settings parts


def _parse_reward_override(text: str, names: Sequence[str]) -> tuple[str, str, Any]:
    """'geneval.backend=hf-mask2former' -> ('geneval', 'backend', 'hf-mask2former'); the value is
    read as `flowrl.config.split_override` reads it."""
    from flowrl.config import split_reward_override

    name, key, value = split_reward_override(text, names, "geneval.backend=hf-mask2former")
    if key in MIX_FIELDS or key == "kind":
        raise FlowrlError(
            f"-o {text!r}: `{key}` is a setting of a reward inside a training mix; flowrl eval reports each "
            "reward's raw score, so it cannot be set here"
        )
    return name, key, value


def reward_configs(names: Sequence[str], run_rewards: Sequence[Any] = (), overrides: Sequence[str] = ()) -> tuple[Any, ...]:
    """The Config of each reward to evaluate with.

    A NAME that is the label (or, failing that, the kind) of one of the run's reward entries takes
    that entry's own settings (e.g. its GenEval detector backend); any other NAME is a registered
    reward kind with its defaults. ``-o NAME.KEY=VALUE`` overrides come last. Mix settings (weight,
    scale, clip) are dropped: eval reports raw scores, labelled by NAME.

    Raises:
        FlowrlError: an unknown reward (with the nearest name), a bad override, or values the
            reward's Config refuses (every problem listed).
    """
    from pydantic import ValidationError

    from flowrl import registry
    from flowrl.config import issues_from_validation

    data: dict[str, dict[str, Any]] = {}
    classes: dict[str, type] = {}
    for name in names:
        entry = next((r for r in run_rewards if r.label == name), None) or next((r for r in run_rewards if r.kind == name), None)
        kind = entry.kind if entry is not None else name
        classes[name] = registry.lookup("reward", kind)
        own = entry.model_dump(exclude=set(MIX_FIELDS)) if entry is not None else {"kind": kind}
        data[name] = own | ({"name": name} if name != kind else {})
    seen: set[tuple[str, str]] = set()
    for text in overrides:
        name, key, value = _parse_reward_override(text, names)
        if (name, key) in seen:
            raise FlowrlError(f"-o sets {name}.{key} twice; give each field once")
        seen.add((name, key))
        data[name][key] = value
    configs, problems = [], []
    for name in names:
        try:
            configs.append(classes[name].Config.model_validate(data[name]))
        except ValidationError as err:
            problems += [f"{i.key}: {i.message}" for i in issues_from_validation(err, classes[name].Config, (name,))]
    if problems:
        raise FlowrlError("invalid reward settings (-o NAME.KEY=VALUE):\n  " + "\n  ".join(problems))
    return tuple(configs)


def needs_metadata(config: Any) -> bool:
    """Whether a reward scores against GenEval metadata (a class attribute `needs_metadata` wins)."""
    from flowrl import registry

    cls = registry.lookup("reward", config.kind)
    return bool(getattr(cls, "needs_metadata", getattr(cls, "stage_name", None) == "geneval"))


def sampler_config(base: Any, kind: str | None = None, steps: int | None = None, guidance: float | None = None) -> Any:
    """The eval sampler: the pipeline's eval sampler with --sampler / --steps / --guidance applied.

    A new kind keeps the base's steps, guidance and shift (its own noise parameters take their
    defaults).

    Raises:
        FlowrlError: an unknown sampler (with the nearest name) or a value its Config refuses.
    """
    from pydantic import ValidationError

    from flowrl import registry

    data = base.model_dump(mode="json")
    if kind is not None and kind != data["kind"]:
        data = {"kind": kind, **{k: data[k] for k in ("steps", "guidance", "shift") if k in data}}
    if steps is not None:
        data["steps"] = steps
    if guidance is not None:
        data["guidance"] = guidance
    cls = registry.lookup("sampler", data["kind"])
    try:
        return cls.Config.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise FlowrlError(f"invalid sampler settings (--sampler/--steps/--guidance): {problems}") from None


def prompt_digest(prompts: Sequence[str], metadata: Sequence[Any]) -> str:
    """sha256 of the prompts and their GenEval records: an edited prompt file is a new evaluation."""
    h = hashlib.sha256()
    for i, text in enumerate(prompts):
        h.update(text.encode())
        if metadata:
            h.update(json.dumps(metadata[i].to_json(), sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def settings_tag(
    epoch: int | None, weights: str, sampler: Any, prompts_name: str, images_per_prompt: int, seed: int, rewards: Sequence[str]
) -> str:
    """The default output folder's name, e.g. ``epoch9-ema_euler20-cfg1_toy-test-k4_seed0_geneval``."""
    who = "base" if epoch is None else f"epoch{epoch}-{weights}"
    how = f"{sampler.kind}{sampler.steps}-cfg{sampler.guidance:g}"
    return "_".join([who, how, f"{_slug(prompts_name)}-k{images_per_prompt}", f"seed{seed}", _slug("+".join(rewards))])


def default_out(target: Target, tag: str) -> Path:
    """TARGET/eval/<tag> for runs and checkpoints; outputs/eval/<model name>/<tag> for base models,
    so that a shipped model folder (or a hub id, which has none) never receives evaluation files."""
    if target.kind != "model":
        return Path(target.location) / "eval" / tag
    local = Path(target.location)
    name = local.name if local.is_dir() else target.location.replace("/", "--")
    return Path("outputs") / "eval" / _slug(name) / tag


# --------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class EvalRequest:
    """What the user asked for (the command line); None means "the target's own setting".

    Attributes:
        target: TARGET (run folder, checkpoint folder, model folder or hub id).
        rewards: reward names (registered kinds, or labels of the run's rewards).
        prompts: prompt set (GenEval .jsonl, .txt, or a built-in name).
        limit: only the first N prompts.
        images_per_prompt: K images per prompt.
        batch: images sampled and scored together.
        weights: "ema" or "policy" adapter of a checkpoint.
        sampler, steps, guidance: eval sampler overrides.
        seed: image i uses seed + i.
        out: output folder.
        force: start over in an output folder that holds another evaluation.
        overrides: "NAME.KEY=VALUE" reward settings.
    """

    target: str
    rewards: tuple[str, ...]
    prompts: str | None = None
    limit: int | None = None
    images_per_prompt: int | None = None
    batch: int = 32
    weights: str | None = None
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    out: Path | None = None
    force: bool = False
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageSpec:
    """One image to draw: image `index` is sample `index % K` of prompt `prompt_index`, seed `seed`."""

    index: int
    prompt_index: int
    prompt: str
    record: Any  # PromptRecord for GenEval sets, else None
    seed: int

    @property
    def filename(self) -> str:
        return f"{IMAGES}/{self.index:05d}.png"


@dataclass(frozen=True)
class EvalPlan:
    """Everything an evaluation needs, resolved and checked; no weights loaded.

    Attributes:
        target: the classified TARGET.
        model: ModelConfig of the base model (and LoRA settings of the run).
        weights: "ema" / "policy" (an adapter of the checkpoint) or "base" (adapters off).
        sampler: the eval sampler's Config.
        prompts: the PromptSet; the first `n_prompts` prompts are evaluated.
        prompts_spec: how the prompt set was named (--prompts, or the target's default).
        n_prompts: prompts evaluated (after --limit).
        images_per_prompt: K.
        seed: image i uses seed + i.
        rewards: the rewards' Configs, labelled by the names given.
        out: the output folder.
        batch: images per sampling and scoring call.
        limit: --limit as given (not part of the identity: a larger limit extends an evaluation).
        force: start over in `out`.
        init_seed: seed of the adapters' initialisation before the checkpoint overwrites them.
    """

    target: Target
    model: Any
    weights: str
    sampler: Any
    prompts: Any
    prompts_spec: str
    n_prompts: int
    images_per_prompt: int
    seed: int
    rewards: tuple[Any, ...]
    out: Path
    batch: int
    limit: int | None = None
    force: bool = False
    init_seed: int = 0

    @property
    def n_images(self) -> int:
        return self.n_prompts * self.images_per_prompt

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(c.label for c in self.rewards)

    def images(self) -> list[ImageSpec]:
        """Every image of the evaluation, in index order (prompt-major, K per prompt)."""
        k, meta = self.images_per_prompt, self.prompts.metadata
        return [
            ImageSpec(i, i // k, self.prompts.prompts[i // k], meta[i // k] if meta else None, self.seed + i)
            for i in range(self.n_images)
        ]

    def identity(self) -> dict[str, Any]:
        """What determines every image and score; a resumed evaluation must match it exactly."""
        t = self.target
        return {
            "target": t.location,
            "target_kind": t.kind,
            "checkpoint": str(t.checkpoint) if t.checkpoint else None,
            "epoch": t.epoch,
            "weights": self.weights,
            "model": _model_identity(self.model),
            "sampler": self.sampler.model_dump(mode="json"),
            "prompts_file": self.prompts.source,
            "prompts_sha256": prompt_digest(self.prompts.prompts, self.prompts.metadata),
            "images_per_prompt": self.images_per_prompt,
            "seed": self.seed,
            "rewards": [c.model_dump(mode="json") for c in self.rewards],
        }

    def settings(self) -> dict[str, Any]:
        """The identity plus how this evaluation was asked for (recorded in summary.json)."""
        from flowrl import __version__

        s = self.sampler
        return {
            "target": self.target.spec,
            "weights": self.weights,
            "epoch": self.target.epoch,
            "sampler": s.kind,
            "steps": s.steps,
            "guidance": s.guidance,
            "prompts": self.prompts_spec,
            "n_prompts": self.n_prompts,
            "images_per_prompt": self.images_per_prompt,
            "n_images": self.n_images,
            "limit": self.limit,
            "seeds": {"rule": "image i uses seed + i", "first": self.seed, "last": self.seed + self.n_images - 1},
            "batch": self.batch,
            "rewards": list(self.labels),
            "flowrl_version": __version__,
            "identity": self.identity(),
        }


def _model_identity(model: Any) -> dict[str, Any]:
    """The model settings of an evaluation's identity. model.finetune is left out for LoRA, the only
    kind before it existed, so that evaluations recorded before then still resume."""
    data = model.model_dump(mode="json")
    if data.get("finetune") == "lora":
        del data["finetune"]
    return data


def plan_eval(req: EvalRequest) -> EvalPlan:
    """Resolve a request into a plan, refusing every user mistake before any weights are loaded.

    Raises:
        FlowrlError: a bad target, reward, sampler setting or prompt set, or a prompt set the
            rewards cannot use.
    """
    from flowrl.prompts import load_prompt_set

    from flowrl.rewards.mix import split_reward_names

    names = split_reward_names(",".join(req.rewards))
    target = resolve_target(req.target)
    d = target_defaults(target)
    configs = reward_configs(names, d.rewards, req.overrides)
    if target.kind == "model":
        if req.weights is not None:
            raise FlowrlError(
                f"--weights {req.weights} picks an adapter of a checkpoint, but {req.target} is a base model "
                "without adapters; leave out --weights, or point TARGET at a run or checkpoint folder"
            )
        weights = "base"
    else:
        weights = req.weights or d.eval.weights
    sampler = sampler_config(d.sampler, req.sampler, req.steps, req.guidance)
    spec = req.prompts or d.test_prompts
    if spec is None:
        raise FlowrlError(
            f"{req.target} is a base model other than the embedded toy model, so it has no default prompt set; "
            "pass --prompts with GenEval's evaluation_metadata.jsonl, a GenEval-format .jsonl, a .txt file "
            "(one prompt per line) or a built-in set name"
        )
    prompt_set = load_prompt_set(spec)
    if not prompt_set.metadata:
        needy = [c.label for c in configs if needs_metadata(c)]
        if needy:
            raise FlowrlError(
                f"the {needy[0]} reward needs GenEval metadata (tag, objects, counts, colours, positions) for every "
                f"prompt, but {prompt_set.source} holds plain-text prompts; pass --prompts with a GenEval-format "
                ".jsonl (such as toy-test or GenEval's evaluation_metadata.jsonl), or drop that reward"
            )
    n_prompts = min(len(prompt_set), req.limit or len(prompt_set))
    k = req.images_per_prompt
    if k is None:
        k = max((PROTOCOL_IMAGES_PER_PROMPT.get(c.kind, 0) for c in configs), default=0) or d.eval.images_per_prompt
    for name, value in (("--batch", req.batch), ("--images-per-prompt", k), ("--limit", req.limit)):
        if value is not None and value < 1:
            raise FlowrlError(f"{name} must be a positive integer, got {value}")
    if req.seed < 0:
        raise FlowrlError(f"--seed must be >= 0, got {req.seed}")
    out = req.out
    if out is None:
        tag = settings_tag(target.epoch, weights, sampler, Path(prompt_set.source).stem, k, req.seed, [c.label for c in configs])
        out = default_out(target, tag)
    return EvalPlan(
        target=target,
        model=d.model,
        weights=weights,
        sampler=sampler,
        prompts=prompt_set,
        prompts_spec=spec,
        n_prompts=n_prompts,
        images_per_prompt=k,
        seed=req.seed,
        rewards=configs,
        out=Path(out),
        batch=req.batch,
        limit=req.limit,
        force=req.force,
        init_seed=d.seed,
    )


# ----------------------------------------------------------------------------- output folder


def _jsonable(value: Any) -> Any:
    """A value as it reads back from JSON (tuples become lists), for comparing identities."""
    return json.loads(json.dumps(value))


def identity_differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """'key: X there, Y now' for every leaf that differs between two identities."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += identity_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            show = lambda v: (json.dumps(v) if len(json.dumps(v)) <= 60 else json.dumps(v)[:57] + "...")  # noqa: E731
            out.append(f"{prefix}{key}: {show(a)} there, {show(b)} now")
    return out


def read_results(path: Path) -> dict[int, dict[str, Any]]:
    """Rows of a results.jsonl by image index; a torn last line (a killed run) is dropped."""
    rows: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            rows[int(row["index"])] = row
        except (ValueError, KeyError, TypeError):
            continue
    return rows


def _remove_owned(out: Path) -> None:
    import shutil

    for name in OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


@dataclass
class FolderState:
    """What an output folder already holds.

    Attributes:
        done: rows already scored (image file present, a score for every reward), by index.
        failures: per reward, images it reported it could not score in earlier calls.
    """

    done: dict[int, dict[str, Any]]
    failures: dict[str, int]


def prepare_folder(plan: EvalPlan) -> FolderState:
    """Create or reopen the output folder and return what it already holds (to be skipped).

    Raises:
        FlowrlError: the folder holds an evaluation with other settings, more images than the plan
            (a smaller --limit would drop them), or foreign files.
    """
    out = plan.out
    settings_file = out / SETTINGS
    if plan.force and out.exists():
        _remove_owned(out)
    previous: dict[str, Any] = {}
    if settings_file.is_file():
        try:
            previous = json.loads(settings_file.read_text())
            old = previous["identity"]
        except (ValueError, KeyError, TypeError):
            old = None
        new = _jsonable(plan.identity())
        if old != new:
            diffs = identity_differences(old, new) if isinstance(old, Mapping) else [f"{SETTINGS} is unreadable"]
            raise FlowrlError(
                f"{out} holds an evaluation with other settings:\n  " + "\n  ".join(diffs[:8])
                + "\nrerun with the same settings to resume it, pass --out to write elsewhere, or --force to start over"
            )
    elif out.exists() and any(out.iterdir()):
        raise FlowrlError(
            f"{out} already holds files but no evaluation ({SETTINGS} is missing); pass --out with an empty or new "
            "folder, or --force to write the evaluation beside them"
        )
    rows = read_results(out / RESULTS)
    beyond = sorted(i for i in rows if i >= plan.n_images)
    if beyond:
        raise FlowrlError(
            f"{out} already holds {len(rows)} scored images, more than the {plan.n_images} asked for now "
            f"({plan.n_prompts} prompts x {plan.images_per_prompt}); rerun without the smaller --limit to keep "
            "them, pass --out to write this smaller evaluation elsewhere, or --force to start over"
        )
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    failures = {k: int(previous.get("failures", {}).get(k, 0)) for k in plan.labels}
    write_settings(plan, failures)
    labels = set(plan.labels)
    done = {i: r for i, r in rows.items() if labels <= set(r.get("scores", {})) and (out / r.get("filename", "")).is_file()}
    # Rewrite without torn or incomplete lines, so the appends that follow stay one JSON object per line.
    write_atomic(out / RESULTS, "".join(json.dumps(done[i]) + "\n" for i in sorted(done)))
    return FolderState(done, failures)


def write_settings(plan: EvalPlan, failures: Mapping[str, int]) -> None:
    """settings.json: the plan's settings (with its identity) and the failures counted so far."""
    write_atomic(plan.out / SETTINGS, json.dumps({**plan.settings(), "failures": dict(failures)}, indent=2) + "\n")


# ------------------------------------------------------------------------------- pure helpers


def result_row(
    spec: ImageSpec, scores: Mapping[str, float], details: Mapping[str, Mapping[str, float]], correct: bool | None
) -> dict[str, Any]:
    """One line of results.jsonl.

    Field names follow GenEval's evaluate_images.py where they exist: ``filename`` (relative to
    the output folder), ``tag``, ``prompt``, ``correct`` and ``metadata`` (the prompt's record as
    a JSON string, so GenEval's summary_scores.py can group by it). flowrl adds ``index``,
    ``prompt_index``, ``seed``, ``scores`` (label -> raw score) and ``details`` (label -> name ->
    value, e.g. GenEval's ``strict`` and ``dense``). ``tag``, ``metadata`` and ``correct`` are
    present only for GenEval prompt sets / rewards with a strict verdict.
    """
    row: dict[str, Any] = {"index": spec.index, "filename": spec.filename}
    if spec.record is not None:
        row["tag"] = spec.record.tag
    row["prompt"] = spec.prompt
    if correct is not None:
        row["correct"] = bool(correct)
    if spec.record is not None:
        row["metadata"] = json.dumps(spec.record.to_json())
    row |= {"prompt_index": spec.prompt_index, "seed": spec.seed}
    row["scores"] = {k: float(v) for k, v in scores.items()}
    row["details"] = {k: {n: float(x) for n, x in d.items()} for k, d in details.items()}
    return row


def score_stats(values: Sequence[float]) -> dict[str, Any]:
    """mean, std (n - 1; 0 for one value), min, max, n and QUANTILES of scores [N] (linear interpolation)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("score_stats needs at least one score")
    return {
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "min": float(x.min()),
        "max": float(x.max()),
        "n": int(x.size),
        "quantiles": {f"p{round(q * 100):02d}": float(np.quantile(x, q)) for q in QUANTILES},
    }


def strict_label(rows: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> str | None:
    """The first reward whose details carry GenEval's strict verdict (it fills `correct`)."""
    if not rows:
        return None
    return next((k for k in labels if "strict" in rows[0]["details"].get(k, {})), None)


def summarize_rows(rows: Sequence[Mapping[str, Any]], records: Sequence[Any], configs: Sequence[Any]) -> dict[str, Any]:
    """summary.json's numbers from results rows (one per image, index order).

    Per reward: score_stats of its raw scores, detail means, and the reward class's own
    ``eval_summary(output, metadata)`` (a static method, as GenEval's) when it has one (GenEval: overall = mean of per-tag strict accuracy, ``tag/*``,
    ``dense``). Top level, when a reward gives a strict verdict: GenEval's ``overall``, ``per_tag``
    and the share of prompts with at least one correct image.

    Args:
        rows: results rows, len N.
        records: the PromptRecord of each row's prompt (len N), or () for plain-text prompts.
        configs: the rewards' Configs (labels in table order).
    """
    import torch

    from flowrl import registry
    from flowrl.types import RewardOutput

    out: dict[str, Any] = {"n_images": len(rows), "n_prompts": len({r["prompt_index"] for r in rows})}
    rewards: dict[str, Any] = {}
    for c in configs:
        label = c.label
        entry = score_stats([r["scores"][label] for r in rows])
        names = list(rows[0]["details"].get(label, {}))
        details = {n: torch.tensor([r["details"][label][n] for r in rows], dtype=torch.float64) for n in names}
        entry["details"] = {n: float(v.mean()) for n, v in details.items()}
        cls = registry.lookup("reward", c.kind)
        if hasattr(cls, "eval_summary") and (records or not needs_metadata(c)):
            scores = torch.tensor([r["scores"][label] for r in rows], dtype=torch.float64)
            entry["eval_summary"] = {k: float(v) for k, v in cls.eval_summary(RewardOutput(scores, details), list(records)).items()}
        rewards[label] = entry
    out["rewards"] = rewards
    strict = strict_label(rows, [c.label for c in configs])
    if strict is not None and records:
        from flowrl.rewards.geneval import summarize

        s = summarize(zip(records, [bool(r["correct"]) for r in rows]))
        out = {"overall": s.overall, "per_tag": s.per_tag, "prompt_share": s.prompt_share, "strict_reward": strict, **out}
    return out


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of at most `size` items."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def load_images(paths: Sequence[Path]):
    """PNG files -> float32 [B, 3, H, W] in [0, 1]."""
    import torch
    from PIL import Image

    arrays = []
    for p in paths:
        with Image.open(p) as im:
            arrays.append(np.asarray(im.convert("RGB")))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def save_png(image, path: Path) -> None:
    """One image [3, H, W] in [0, 1] as an 8-bit PNG (round to nearest, as viz.to_uint8)."""
    from PIL import Image

    from flowrl.viz import to_uint8

    Image.fromarray(to_uint8(image[None])[0]).save(path)


# ------------------------------------------------------------------------------------ running


@dataclass
class EvalResult:
    """The outcome of an evaluation.

    Attributes:
        out: the output folder.
        summary: summary.json's content.
        rows: results rows in index order.
        skipped: images found already scored (resume).
        sampled: images sampled and scored by this call.
    """

    out: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    skipped: int = 0
    sampled: int = 0
    failures: dict[str, int] = field(default_factory=dict)


def _check_classes(mix: Any, records: Sequence[Any]) -> None:
    """Refuse prompts whose classes a GenEval reward's detector cannot report, before sampling."""
    from flowrl.rewards.geneval.reward import _check_classes as check

    for reward in mix:
        detector = getattr(reward, "detector", None)
        names = getattr(detector, "class_names", None)
        if names is not None and records:
            check(records, names, getattr(reward.config, "backend", reward.config.kind))


def load_policy(plan: EvalPlan, device):
    """The base model with the plan's adapter loaded from the checkpoint (none for "base").

    A full fine-tune's checkpoint (the run's model.finetune: full) holds whole transformers: the one
    copy asked for is made and overwritten, so evaluation holds one transformer, not three.
    """
    from safetensors.torch import load_file

    from flowrl.policy import FlowPolicy

    if plan.weights != "base" and plan.model.finetune == "full":
        policy = FlowPolicy.from_config(plan.model, device, copies=(plan.weights,))
    else:
        policy = FlowPolicy.from_config(plan.model, device, seed=plan.init_seed)
    if plan.weights != "base":
        file = plan.target.checkpoint / f"{plan.weights}.safetensors"
        if not file.is_file():
            raise FlowrlError(
                f"checkpoint {plan.target.checkpoint} has no {file.name}; a complete checkpoint holds policy, old "
                "and ema adapters: pick another --weights or another checkpoint"
            )
        policy.load_adapter_state(plan.weights, {k: v.to(device) for k, v in load_file(file).items()})
    return policy


ProgressFactory = Callable[[str, int], AbstractContextManager]


def run_eval(plan: EvalPlan, log: Callable[[str], None] = print, progress: ProgressFactory | None = None) -> EvalResult:
    """Sample, score and record every image of `plan` not yet in its output folder, then write the
    summary and grid from all of them.

    Args:
        plan: from plan_eval.
        log: one-line status messages.
        progress: ``progress(label, total)`` -> context yielding ``advance(n)`` (default: rich bar
            on a TTY, plain lines otherwise).

    Returns:
        EvalResult with summary.json's content and every row.

    Raises:
        FlowrlError: settings mismatch with the folder, prompts the detector cannot use, missing
            weights.
    """
    import torch

    from flowrl import registry
    from flowrl.progress import count_progress
    from flowrl.rewards.mix import RewardMix
    from flowrl.training.rollout import encode_batch, roll_out
    from flowrl.types import PromptBatch

    progress = progress or count_progress
    state = prepare_folder(plan)
    done, failures = state.done, state.failures
    specs = plan.images()
    todo = [s for s in specs if s.index not in done]
    if done:
        log(f"resuming {plan.out}: {len(done)} of {len(specs)} images already scored, {len(todo)} to go")
    if todo:
        mix = RewardMix(plan.rewards)
        _check_classes(mix, [s.record for s in specs if s.record is not None])
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        policy = load_policy(plan, device)
        sampler = registry.lookup("sampler", plan.sampler.kind)(plan.sampler)
        which = "ref" if plan.weights == "base" else plan.weights
        with_negative = plan.sampler.guidance != 1.0
        labels = plan.labels
        with progress(f"eval {len(todo)} images", len(todo)) as advance, open(plan.out / RESULTS, "a", encoding="utf-8") as f:
            for chunk in batches(todo, plan.batch):
                prompts = [s.prompt for s in chunk]
                metadata = tuple(s.record for s in chunk) if chunk[0].record is not None else ()
                with torch.no_grad():
                    cond = encode_batch(policy, prompts, with_negative)
                    batch = PromptBatch(prompts, torch.tensor([s.prompt_index for s in chunk]), metadata)
                    images = roll_out(policy, sampler, batch, cond, [s.seed for s in chunk], which, len(chunk)).images.float().cpu()
                scored = mix(images, prompts, metadata)
                for label in labels:
                    failures[label] += int(scored.parts[label].failures)
                strict = next((k for k in labels if "strict" in scored.parts[k].details), None)
                for j, s in enumerate(chunk):
                    save_png(images[j], plan.out / s.filename)
                    scores = {k: float(scored.parts[k].scores[j]) for k in labels}
                    details = {k: {n: float(v[j]) for n, v in scored.parts[k].details.items()} for k in labels}
                    correct = bool(scored.parts[strict].details["strict"][j]) if strict else None
                    row = result_row(s, scores, details, correct)
                    done[s.index] = row
                    f.write(json.dumps(row) + "\n")
                f.flush()
                if any(scored.parts[k].failures for k in labels):
                    write_settings(plan, failures)
                advance(len(chunk))
    for label, n in failures.items():
        if n:
            log(f"warning: reward {label!r} reported {n} image(s) it could not score (counted in summary.json's failures)")
    rows = [done[s.index] for s in specs]
    records = [s.record for s in specs] if specs[0].record is not None else []
    summary = summarize_rows(rows, records, plan.rewards)
    summary["failures"] = failures
    summary["settings"] = plan.settings()
    write_atomic(plan.out / RESULTS, "".join(json.dumps(r) + "\n" for r in rows))
    write_atomic(plan.out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    from flowrl.viz import save_grid

    shown = rows[:GRID_IMAGES]
    marks = [r["correct"] for r in shown] if "correct" in shown[0] else None
    k = plan.images_per_prompt
    ncol = k * max(1, 8 // k) if k <= 8 else 8  # whole prompts per row where they fit
    save_grid(load_images([plan.out / r["filename"] for r in shown]), plan.out / GRID, ncol=ncol, marks=marks)
    return EvalResult(plan.out, summary, rows, skipped=len(specs) - len(todo), sampled=len(todo), failures=failures)


def evaluate(req: EvalRequest, log: Callable[[str], None] = print, progress: ProgressFactory | None = None) -> EvalResult:
    """plan_eval then run_eval: the whole of `flowrl eval` without the printing."""
    return run_eval(plan_eval(req), log, progress)


__all__ = [
    "EvalPlan",
    "EvalRequest",
    "EvalResult",
    "ImageSpec",
    "Target",
    "TargetDefaults",
    "evaluate",
    "plan_eval",
    "reward_configs",
    "resolve_target",
    "result_row",
    "run_eval",
    "sampler_config",
    "score_stats",
    "settings_tag",
    "summarize_rows",
    "target_defaults",
]
