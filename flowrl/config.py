"""The pipeline YAML: schema, loading with line numbers, command-line overrides, error reports.

One file says everything about a run. The top-level sections are pydantic models defined here; the
stage sections (sampler, rewards, estimator, objective, advantage) are validated against the
``Config`` model of the stage their ``kind`` names (see registry.py), so every default lives in
exactly one place: the schema here or the stage's own Config.

Errors are collected, not stopped at the first. Each one names file:line, the dotted key, what was
found, what is allowed, and the nearest valid name.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flowrl.errors import FlowrlError

STAGE_SECTIONS = ("sampler", "estimator", "objective", "advantage")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraConfig(Strict):
    rank: int = Field(32, gt=0, description="LoRA rank r.")
    alpha: float = Field(64.0, gt=0, description="LoRA alpha (scale = alpha / rank).")
    init: Literal["gaussian", "default"] = Field("gaussian", description="peft init_lora_weights.")
    targets: tuple[str, ...] = Field(
        ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
        min_length=1,
        description="Module names of the transformer that get adapters.",
    )


class ModelConfig(Strict):
    path: str = Field("assets/toy-sd3", description="diffusers folder or hub id of the base model.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    finetune: Literal["lora", "full"] = Field(
        "lora",
        description="What training changes. lora: LoRA adapters (model.lora) on the frozen base; the policy, old "
        "policy and EMA are three adapters of one transformer, the reference is the base. full: every transformer "
        "weight; model.lora is then ignored. The policy, old policy and EMA are separate float32 copies of the "
        "transformer (the policy computes in model.dtype) and the reference is a frozen copy of the base, kept only "
        "when a KL term needs it (objective.kl.beta > 0): 3 to 4 copies of the transformer, plus float32 gradients "
        "and AdamW's two float32 moments. With several processes every copy, the gradients and the optimizer state "
        "are sharded with FSDP2 (docs/distributed.md). Fixed for the life of a run.",
    )
    lora: LoraConfig = Field(LoraConfig(), description="LoRA settings (model.finetune: lora; ignored with full).")
    max_sequence_length: int | None = Field(
        None, ge=0, le=512, description="T5 tokens; None reads the model card (toy) or uses 256."
    )
    gradient_checkpointing: bool = False


class PromptsConfig(Strict):
    train: str = Field("toy-train", description="Built-in set name or GenEval-metadata / text file.")
    test: str = Field("toy-test", description="Prompts of periodic evaluation.")
    group_size: int = Field(8, gt=0, description="Images per prompt (advantage group); divides train.batch_size.")
    sampling: Literal["uniform", "by-tag"] = Field(
        "uniform",
        description="How an epoch picks its train prompts. uniform: every prompt equally likely (no repeats "
        "while the set has enough). by-tag: every task tag equally likely, whatever its number of prompts "
        "(GenEval's score is the mean over tags; needs a .jsonl set with tags).",
    )
    tag_weights: dict[str, float] | None = Field(
        None,
        description="With sampling: by-tag, each tag's relative share of an epoch's prompts, e.g. {position: 2, "
        "single_object: 0.5}; a tag not named weighs 1, weight 0 leaves it out. None: every tag the same share.",
    )

    @field_validator("tag_weights")
    @classmethod
    def _weights_not_negative(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        from flowrl.prompts import check_tag_weights

        if v:
            check_tag_weights(v, None)  # the sign here; the tag names once the train set is read
        return v


class OptimizerConfig(Strict):
    lr: float = Field(3e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-4, ge=0)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(5.0, gt=0)
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="Learning rate over the run: constant (the paper), or cosine decay to min_lr_ratio * lr."
    )
    warmup_epochs: int = Field(0, ge=0, description="Epochs of linear warm-up from 0 to lr.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr of the cosine schedule, as a share of lr.")


class OldPolicyConfig(Strict):
    """The old policy's soft update after each epoch's optimizer steps: old <- d old + (1 - d) theta,
    d = 0 before `start`, then min(rate * (s - start), max), s the optimizer steps taken so far (the
    paper's and DiffusionNFT's return_decay(global_step); their decay types 1 and 2 are
    (rate 0.001, max 0.5, start 0) and (0.0075, 0.999, 75))."""

    rate: float = Field(0.001, ge=0, description="d = min(rate * (s - start), max) in old <- d old + (1-d) theta, s = optimizer steps so far.")
    max: float = Field(0.5, ge=0, lt=1, description="The most d grows to.")
    start: int = Field(0, ge=0, description="Optimizer steps during which d stays 0 (old = theta after each epoch).")


class TrainConfig(Strict):
    epochs: int = Field(100, gt=0)
    batch_size: int = Field(64, gt=0, description="Images per epoch (prompts per epoch = batch_size / group_size).")
    micro_batch: int = Field(16, gt=0, description="Images per forward/backward (gradient accumulation).")
    steps_per_epoch: int = Field(1, gt=0, description="Optimizer steps per epoch (batch split evenly).")
    seed: int = 0
    ema_decay: float = Field(0.9, ge=0, lt=1)
    old: OldPolicyConfig = OldPolicyConfig()
    rollout_policy: Literal["old", "policy"] = Field("old", description="Weights that sample rollouts.")
    reward_aggregation: Literal["sum-then-normalize", "normalize-then-sum"] = "sum-then-normalize"
    threads: int | None = Field(None, gt=0, description="torch CPU threads (None: torch's default).")
    compile: bool | Literal["auto"] = Field(
        False,
        description="Run the transformer through torch.compile (LoRA only). auto: on CPUs whose kernels run at "
        "AVX2, with a C++ compiler, for runs of 20 epochs or more (flowrl/precision.py), where the toy's epoch "
        "takes about 0.75x the time after compiling (benchmarks/toy_epoch.py); eager elsewhere.",
    )
    rollout_precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Autocast dtype of the no-grad rollout passes (sampling and decoding). auto: bfloat16 "
        "where the device multiplies it natively (CUDA with bf16, CPUs with AMX or AVX512-BF16, confirmed by "
        "a 0.1 s probe), float32 elsewhere: on AVX2-only CPUs bf16 is 10-20x slower (flowrl/precision.py). "
        "The choice is logged and written into the run's pipeline.yaml. Estimators recompute every "
        "likelihood from the stored latents in the training dtype, so the ratio stays exactly 1 at the "
        "start. Evaluation always samples in the model dtype.",
    )
    max_bad_steps: int = Field(
        3,
        gt=0,
        description="Stop the run with an error after this many optimizer steps in a row were skipped "
        "because the loss or the gradients were not finite (NaN or inf). A skipped step leaves the "
        "weights, the optimizer state and the EMA untouched; it is counted in train/skipped_steps.",
    )
    on_reward_error: Literal["fail", "drop-group"] = Field(
        "fail",
        description="What a reward that raises or returns NaN/inf for some images does to training. "
        "fail: stop with an error naming the reward and the exception. drop-group: the prompt groups "
        "holding a failed image get zero advantage and are left out of the logged reward means; the "
        "failures are counted in reward/<label>/failures and reward/dropped_groups.",
    )


class EvalConfig(Strict):
    every: int = Field(10, ge=0, description="Evaluate every N epochs (0: never, except at the end).")
    sampler: dict[str, Any] = Field(default_factory=lambda: {"kind": "euler", "steps": 20})
    images_per_prompt: int = Field(4, gt=0)
    weights: Literal["ema", "policy"] = "ema"
    limit: int | None = Field(None, gt=0, description="Only the first N test prompts.")
    seed: int = Field(0, ge=0, description="Image i of an evaluation uses seed + i (as flowrl eval and flowrl toy sample do).")


class CheckpointConfig(Strict):
    every: int = Field(10, ge=0, description="Checkpoint every N epochs (0: only at the end).")
    keep_last: int = Field(3, gt=0)


class LoggingConfig(Strict):
    tensorboard: bool = False
    sample_grid: bool = True


class PipelineConfig(Strict):
    """The whole of pipeline.yaml."""

    name: str = "run"
    output: str = Field("runs/run", description="Run folder (metrics, checkpoints, samples).")
    model: ModelConfig = ModelConfig()
    prompts: PromptsConfig = PromptsConfig()
    sampler: dict[str, Any] = Field(default_factory=lambda: {"kind": "dpm2"})
    rewards: list[dict[str, Any]] = Field(
        min_length=1, description="Each: {kind, name?, weight, scale, clip, <the reward's own fields>}."
    )
    estimator: dict[str, Any] = Field(default_factory=lambda: {"kind": "elbo"})
    objective: dict[str, Any] = Field(default_factory=lambda: {"kind": "pepg"})
    advantage: dict[str, Any] = Field(default_factory=lambda: {"kind": "exact"})
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()


# --------------------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Issue:
    """One problem of a pipeline file."""

    key: str  # dotted key, e.g. "objective.kl.beta"
    message: str  # what was found, what is allowed, and how to fix it
    line: int | None = None

    def format(self, file: str) -> str:
        where = f"{file}:{self.line}" if self.line else file
        return f"{where}: {self.key or '<top>'}: {self.message}"


class ConfigError(FlowrlError):
    """Every problem found in a pipeline file, reported together."""

    def __init__(self, file: str, issues: Sequence[Issue]):
        self.file, self.issues = file, list(issues)
        lines = "\n".join("  " + i.format(file) for i in self.issues)
        n = len(self.issues)
        super().__init__(f"{n} problem{'s' * (n != 1)} in {file}:\n{lines}")


# ------------------------------------------------------------------------------ YAML with lines


def _walk(node: yaml.Node, path: tuple, out: dict[tuple, int]) -> None:
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            out[path + (key,)] = k.start_mark.line + 1
            _walk(v, path + (key,), out)
            out[path + (key,)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _walk(v, path + (i,), out)


def read_yaml(text: str, file: str) -> tuple[dict, dict[tuple, int]]:
    """Parse YAML text into (data, line of each key path).

    Raises:
        ConfigError: malformed YAML (with its line) or a top level that is not a mapping.
    """
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(file, [Issue("", f"malformed YAML: {problem}; fix the syntax at this line", line)]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(file, [Issue("", f"the file must be a mapping of sections, found a {type(data).__name__}", 1)])
    lines: dict[tuple, int] = {}
    if node is not None:
        _walk(node, (), lines)
    return data, lines


def split_override(text: str) -> tuple[list[str], Any] | None:
    """'a.b.c=value' -> (['a', 'b', 'c'], value); None when `text` has no '=' or nothing before it.

    The one reading of `key=value` overrides (`flowrl train` / `validate` arguments, and the reward
    settings of `flowrl eval -o` and `flowrl score -o`). The value is read as YAML (``true``, ``3``,
    ``0.5``, ``null``, ``[0, 1]``); what YAML cannot read, and an empty value, stay strings.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        return None
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def split_reward_override(text: str, names: Sequence[str], example: str) -> tuple[str, str, Any]:
    """'NAME.KEY=VALUE' of `flowrl eval -o` and `flowrl score -o` -> (name, key, value), read as
    `split_override` reads it (NAME may hold dots: a user reward's dotted path).

    Raises:
        FlowrlError: not of that form (the message shows `example`), or NAME is not among `names`
            (the rewards chosen with --reward).
    """
    parts = split_override(text)
    name, key, value = (".".join(parts[0][:-1]), parts[0][-1], parts[1]) if parts else ("", "", None)
    if not name or not key:
        raise FlowrlError(f"-o {text!r}: expected NAME.KEY=VALUE, e.g. -o {example}")
    if name not in names:
        raise FlowrlError(f"-o {text!r} sets reward {name!r}, which is not among --reward {','.join(names)}")
    return name, key, value


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a','b','c'], value parsed as YAML); see `split_override`.

    Raises:
        FlowrlError: `text` is not of the form key.sub=value.
    """
    parts = split_override(text)
    if parts is None:
        raise FlowrlError(f"override {text!r} is not of the form key.sub=value (e.g. train.epochs=20)")
    return parts


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """A copy of `data` with each 'key.sub=value' set (list items by index: rewards.0.weight=2)."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = data
        for i, k in enumerate(keys[:-1]):
            if isinstance(node, list):
                if not k.isdigit() or int(k) >= len(node):
                    raise FlowrlError(f"override {text!r}: {'.'.join(keys[:i])} has {len(node)} items, {k!r} is not an index")
                node = node[int(k)]
            else:
                node = node.setdefault(k, {})
                if not isinstance(node, (dict, list)):
                    raise FlowrlError(f"override {text!r}: {'.'.join(keys[: i + 1])} is a value, not a section")
        last = keys[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise FlowrlError(f"override {text!r}: {last!r} is not an index of a {len(node)}-item list")
            node[int(last)] = value
        else:
            node[last] = value
    return data


# ----------------------------------------------------------------------------------- validation


def _fields_at(model: type[BaseModel], loc: Sequence) -> list[str]:
    """Field names of the pydantic model found by walking `loc` (for nearest-name hints)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        current = _model_in(ann)
    return list(getattr(current, "model_fields", {}) or {})


def _model_in(annotation: Any) -> Any:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def issues_from_validation(err: ValidationError, model: type[BaseModel], prefix: tuple = (), lines=None) -> list[Issue]:
    """Turn pydantic's errors into Issues with dotted keys, lines and nearest-name hints."""
    lines = lines or {}
    out = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        full = prefix + loc
        key = ".".join(str(p) for p in full)
        line = _line_of(lines, full)
        if e["type"] == "extra_forbidden":
            allowed = _fields_at(model, loc[:-1])
            near = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            msg = f"unknown key {str(loc[-1])!r}{hint} Allowed here: {', '.join(allowed) or 'none'}"
        elif e["type"] == "missing":
            msg = "required key is missing; add it"
        else:
            found = f" (found {_describe(e.get('input'))})" if "input" in e else ""
            text = e["msg"].removeprefix("Value error, ")  # a validator's own message reads better bare
            msg = f"{text}{found}"
        out.append(Issue(key, msg, line))
    return out


def _line_of(lines: Mapping[tuple, int], loc: tuple) -> int | None:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def validate_stage(kind: str, section: Any, prefix: tuple, lines: Mapping[tuple, int]) -> tuple[Any, list[Issue]]:
    """Validate a stage section against its registered Config; returns (config or None, issues)."""
    from flowrl import registry

    line = _line_of(lines, prefix)
    key = ".".join(map(str, prefix))
    if not isinstance(section, dict):
        return None, [Issue(key, f"must be a mapping with a 'kind', found {_describe(section)}", line)]
    name = section.get("kind")
    if not isinstance(name, str):
        known = ", ".join(registry.names(kind))
        return None, [Issue(key + ".kind", f"missing 'kind'; choose one of: {known}", line)]
    kind_line = _line_of(lines, prefix + ("kind",))
    try:
        cls = registry.lookup(kind, name)
    except FlowrlError as err:
        return None, [Issue(key + ".kind", str(err), kind_line)]
    except Exception as err:  # importing a user's "package.module:Class" runs their code
        return None, [Issue(key + ".kind", _user_stage_problem(kind, name, err), kind_line)]
    config_model = getattr(cls, "Config", None)
    if not (isinstance(config_model, type) and issubclass(config_model, BaseModel)):
        return None, [Issue(key + ".kind", f"{kind} {name!r} has no pydantic `Config` model; see flowrl/registry.py", kind_line)]
    try:
        return config_model.model_validate(section), []
    except ValidationError as err:
        return None, issues_from_validation(err, config_model, prefix, lines)
    except Exception as err:  # a user Config's own validator may raise anything
        return None, [Issue(key, f"the Config of {kind} {name!r} failed: {type(err).__name__}: {err}", line)]


def _user_stage_problem(kind: str, name: str, err: Exception) -> str:
    """What went wrong importing a user stage "package.module:Class", and how to fix it."""
    module, _, attr = name.partition(":")
    if not module or not attr:
        return f"{name!r} is not a user {kind} path; write it as 'package.module:Class' (both parts non-empty)"
    return (
        f"importing user {kind} {name!r} failed: {type(err).__name__}: {err}. Fix the module, or give "
        "the path as 'package.module:Class' with the package importable (installed or on PYTHONPATH)"
    )


@dataclass(frozen=True)
class ResolvedPipeline:
    """A validated pipeline: the top-level config plus each stage's typed Config."""

    config: PipelineConfig
    sampler: Any
    estimator: Any
    objective: Any
    advantage: Any
    eval_sampler: Any
    rewards: tuple[Any, ...]
    source: str

    def to_dict(self) -> dict:
        """The fully resolved configuration (every default filled in), as plain data."""
        data = self.config.model_dump(mode="json")
        for name in STAGE_SECTIONS:
            data[name] = getattr(self, name).model_dump(mode="json")
        data["eval"]["sampler"] = self.eval_sampler.model_dump(mode="json")
        data["rewards"] = [r.model_dump(mode="json") for r in self.rewards]
        return data


def resolve(data: dict, file: str = "<pipeline>", lines: Mapping[tuple, int] | None = None) -> ResolvedPipeline:
    """Validate plain data as a pipeline; raises ConfigError listing every problem."""
    lines = lines or {}
    issues: list[Issue] = []
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as err:
        config = None
        issues += issues_from_validation(err, PipelineConfig, (), lines)
    stages: dict[str, Any] = {}
    raw = data if isinstance(data, dict) else {}
    defaults = PipelineConfig.model_fields
    for name in STAGE_SECTIONS:
        section = raw.get(name, defaults[name].default_factory())
        stages[name], found = validate_stage("sampler" if name == "sampler" else name, section, (name,), lines)
        issues += found
    eval_raw = raw.get("eval") or {}
    if isinstance(eval_raw, dict):  # a non-mapping `eval` is already reported by the schema pass
        section = eval_raw.get("sampler", EvalConfig().sampler)
        stages["eval_sampler"], found = validate_stage("sampler", section, ("eval", "sampler"), lines)
        issues += found
    rewards = []
    raw_rewards = raw.get("rewards")
    if isinstance(raw_rewards, list):
        for i, section in enumerate(raw_rewards):
            reward, found = validate_stage("reward", section, ("rewards", i), lines)
            issues += found
            rewards.append(reward)
        labels = [r.label for r in rewards if r is not None]
        for dup in sorted({n for n in labels if labels.count(n) > 1}):
            issues.append(Issue("rewards", f"two rewards are labelled {dup!r}; give each a distinct `name`", _line_of(lines, ("rewards",))))
    stages["rewards"] = tuple(rewards)
    issues += _nonfinite_issues(config, stages, lines)
    if issues or config is None:
        raise ConfigError(file, _dedupe(issues))
    from flowrl.graph import check_graph

    resolved = ResolvedPipeline(config=config, source=file, **stages)
    problems = check_graph(resolved)
    if problems:
        raise ConfigError(file, [Issue(k, m, _line_of(lines, tuple(int(p) if p.isdigit() else p for p in k.split(".")))) for k, m in problems])
    return resolved


def _nonfinite_issues(config: PipelineConfig | None, stages: Mapping[str, Any], lines: Mapping[tuple, int]) -> list[Issue]:
    """A NaN or infinite number anywhere in the validated sections (YAML's .nan/.inf, or "inf"
    which pydantic reads as a float): no setting means anything with one."""
    import math

    parts: list[tuple[tuple, Any]] = []
    if config is not None:
        exclude = {**{name: True for name in (*STAGE_SECTIONS, "rewards")}, "eval": {"sampler"}}
        parts.append(((), config.model_dump(exclude=exclude)))
    for name in STAGE_SECTIONS:
        if stages.get(name) is not None:
            parts.append(((name,), stages[name].model_dump()))
    if stages.get("eval_sampler") is not None:
        parts.append((("eval", "sampler"), stages["eval_sampler"].model_dump()))
    for i, reward in enumerate(stages.get("rewards", ())):
        if reward is not None:
            parts.append((("rewards", i), reward.model_dump()))
    issues = []
    for prefix, data in parts:
        for key, value in flatten_config(data).items():
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                loc = prefix + tuple(int(k) if k.isdigit() else k for k in key.split("."))
                issues.append(Issue(".".join(map(str, loc)), f"must be a finite number, found {value!r}; write a finite value", _line_of(lines, loc)))
    return issues


def _dedupe(issues: list[Issue]) -> list[Issue]:
    seen, out = set(), []
    for i in issues:
        if (i.key, i.message) not in seen:
            seen.add((i.key, i.message))
            out.append(i)
    return out


def load_pipeline(path: str | Path, overrides: Sequence[str] = ()) -> ResolvedPipeline:
    """Read, override and validate a pipeline file (no weights are loaded).

    Raises:
        ConfigError: every problem of the file, each with file:line and dotted key.
        FlowrlError: a missing file or a malformed override.
    """
    path = Path(path)
    if not path.is_file():
        raise FlowrlError(f"pipeline file {path} does not exist; ready pipelines are in pipelines/ (e.g. pipelines/toy-geneval.yaml)")
    data, lines = read_yaml(path.read_text(), str(path))
    data = apply_overrides(data, overrides)
    return resolve(data, str(path), lines)


# ------------------------------------------------------------------------------ comparing configs


@dataclass(frozen=True)
class Change:
    """One setting that differs between two resolved pipelines.

    Attributes:
        key: dotted key, list items by index (``rewards.0.weight``).
        old: the value before (meaningless when ``added``).
        new: the value after (meaningless when ``removed``).
        added: the key exists only in the new pipeline.
        removed: the key exists only in the old pipeline.
    """

    key: str
    old: Any = None
    new: Any = None
    added: bool = False
    removed: bool = False

    def format(self) -> str:
        """``key: old -> new`` with values as compact JSON (``(absent)`` for a missing side)."""
        before = "(absent)" if self.added else _compact(self.old)
        after = "(absent)" if self.removed else _compact(self.new)
        return f"{self.key}: {before} -> {after}"


def _compact(value: Any) -> str:
    import json

    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def flatten_config(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings (and lists of mappings) as {dotted key: leaf value}.

    Lists of mappings are walked by index (``rewards.0.kind``); other lists (``optimizer.betas``)
    and tuples are leaves, compared as lists.
    """
    out: dict[str, Any] = {}
    if isinstance(data, Mapping):
        for k, v in data.items():
            out.update(flatten_config(v, f"{prefix}{k}."))
    elif isinstance(data, (list, tuple)) and data and all(isinstance(x, Mapping) for x in data):
        for i, v in enumerate(data):
            out.update(flatten_config(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = list(data) if isinstance(data, tuple) else data
    return out


def diff_configs(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """Every leaf setting that differs between two pipelines given as plain data (e.g. two
    ``ResolvedPipeline.to_dict()``), in the order of `new` then keys only `old` has."""
    a, b = flatten_config(old), flatten_config(new)
    changes = []
    for key, value in b.items():
        if key not in a:
            changes.append(Change(key, new=value, added=True))
        elif _normal(a[key]) != _normal(value):
            changes.append(Change(key, a[key], value))
    changes += [Change(key, old=value, removed=True) for key, value in a.items() if key not in b]
    return changes


def _normal(value: Any) -> Any:
    """Tuples and lists compare equal; 1 and 1.0 compare equal (YAML may write either)."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    return value
